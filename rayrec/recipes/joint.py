"""The ``joint`` recipe: the UR4Rec joint model (SASRec + multimodal retriever), trained in stages.

It is the sequential recipe with three differences:

prepare: also the text/image features, computed (or found up to date) on the driver once,
         with Ray Data unless the run is local, before any worker starts.
worker:  no DDP wrapper: which parameters train changes from step to step under alternation,
         so the worker broadcasts rank 0's weights, then averages the trained parameters'
         gradients itself (one flat all-reduce per step) inside ``fit_joint``.
local:   ``fit_joint`` in this process.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from rayrec.config.schema import JobConfig
from rayrec.console import report_end
from rayrec.data.dataset import ensure_prepared
from rayrec.recipes import sequential
from rayrec.runs import Outcome, Run, TrainerParts
from rayrec.tracking.mlflow_tracking import Tracker
from rayrec.train.inputs import micro_batches_per_epoch, steps_per_epoch
from rayrec.workers import progress_for
from rayrec.workers.torch import RayReporter, all_reduce_grads, all_reduce_sum, broadcast_from_rank0


@dataclass
class Inputs(sequential.Inputs):
    features: dict[str, Any] = dataclasses.field(default_factory=dict)  # the feature manifest (what was encoded, with which model)


def prepare(cfg: JobConfig, run: Run) -> Inputs:
    from rayrec.train.joint import prepare_features

    base = sequential.prepare(cfg, run)
    return Inputs(base.ds, base.info, base.tables, features=prepare_features(cfg, base.ds.path, use_ray=not run.local))


def share(cfg: JobConfig) -> sequential.Shared:
    """A sweep: the dataset, its row tables and the features, computed once (features with Ray
    Data) before any trial."""
    from rayrec.train.joint import prepare_features

    prepare_features(cfg, ensure_prepared(cfg.data).path, use_ray=True)
    return sequential.share(cfg)


def record(tracker: Tracker, inputs: Inputs) -> None:
    tracker.log_text(json.dumps(inputs.features, indent=2), "data/features.json")
    sequential.record(tracker, inputs)


def local(cfg: JobConfig, inputs: Inputs, run: Run) -> Outcome:
    from rayrec.train.joint import fit_joint

    return sequential.local(cfg, inputs, run, loop=fit_joint)


def joint_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker: broadcast weights, then ``fit_joint`` with Ray pieces."""
    from rayrec.train.joint import fit_joint, no_sync

    w = sequential.setup_worker(config)
    w.model.to(w.device)
    broadcast_from_rank0(w.model)
    epochs = w.cfg.model.total_epochs
    progress = progress_for(config, w.rank, epochs=epochs, steps=micro_batches_per_epoch(w.cfg, w.info),
                            initial_epochs=int(w.resume["epoch"]) if w.resume else 0)
    fit_joint(w.model, w.batches, w.cfg, num_items=w.info.num_items,
              device=w.device, reporter=RayReporter(w.rank, w.tracker, score=w.cfg.train.early_stopping.metric), resume=w.resume, reduce=all_reduce_sum,
              sync_grads=all_reduce_grads if w.world > 1 else no_sync, world_size=w.world, progress=progress,
              steps_per_epoch=steps_per_epoch(w.cfg, w.info))
    if progress is not None:
        report_end()


def trainer_parts(cfg: JobConfig, inputs: Inputs, run: Run) -> TrainerParts:
    return sequential.trainer_parts(cfg, inputs, run, loop=joint_worker)


RECIPE = dataclasses.replace(
    sequential.RECIPE, name="joint", prepare=prepare, record=record, local=local, trainer=trainer_parts, share=share,
    in_process=lambda cfg: False,
)
