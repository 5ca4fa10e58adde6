"""How Ray Train hands the streamed splits to its workers (imported only where Ray runs)."""

from __future__ import annotations

import ray.train

EVAL_SPLITS = ("valid", "test")


class SplitEvalConfig(ray.train.DataConfig):
    """Ray Train's ``DataConfig`` that also splits the evaluation datasets, without equalizing them
    (``streaming_split(equal=False)``): each evaluation row reaches exactly one worker, so no worker
    reads all of them. The splits in ``datasets_to_split`` (train) stay equal: DDP needs the same
    number of steps on every rank."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        evals = {k: v for k, v in datasets.items() if k in EVAL_SPLITS}
        rest = {k: v for k, v in datasets.items() if k not in EVAL_SPLITS}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in evals.items():
            ds = ds.copy(ds)
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[i][name] = split
        return output
