"""The ``sft`` recipe: LoRA SFT of a causal LM on semantic-ID prompts (TRL ``SFTTrainer`` + PEFT).

prepare: DeepSpeed config, dataset -> SID index (read or built, checked against the items)
         -> prompt tables -> the base model (a tiny one is written under the run) -> LoRA
         targets resolved on a weightless copy.
worker:  each Ray Train worker builds the PEFT model and runs TRL's trainer. Prompt tables
         travel as Ray Datasets that are *not* split: the HF Trainer (through accelerate)
         already gives each rank its part with a distributed sampler, so splitting them in
         Ray Data too would train each worker on 1/W^2 of the data. ``prepare_trainer`` is
         applied as Ray documents, and ``RayTrainReportCallback`` reports each epoch's
         checkpoint (adapter, extended tokenizer, trainer state, ``genrec.json``).
local:   the same trainer in this process; checkpoints under ``run_dir/checkpoints``.
outcome: the checkpoint best by ``cfg.selection_metric`` (its ``checkpoint/`` folder is the adapter).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrec.config.genrec import GenRecJobConfig
from rayrec.config.loader import dump_job
from rayrec.errors import ConfigError
from rayrec.genrec.inputs import (
    GenRecInputs,
    check_targets,
    fit_inputs,
    log_inputs,
    materialize_base,
    prepare_inputs,
    prompt_tokenizer,
)
from rayrec.runs import Outcome, Recipe, Run, TrainerParts
from rayrec.secrets import redact_uri
from rayrec.train.checkpoint import seed_everything
from rayrec.workers.hf import (
    best_local,
    chosen_metrics,
    console_callback,
    dataset_rows,
    setup_hf_worker,
    single_process_group,
    train_resuming,
    write_table,
)

TRAIN_KEY, VALID_KEY = "sft_train", "sft_valid"


@dataclass
class Inputs:
    data: GenRecInputs
    base: str  # the base model folder (or hub id)
    deepspeed: dict | None
    job: str = ""  # the resolved job (``dump_job``), kept in every checkpoint's genrec.json

    def loop_config(self, run: Run) -> dict[str, Any]:
        """What the trainer needs besides the job (same keys locally and in workers)."""
        tracker = run.tracker
        return {"base": self.base, "sid_vocab": self.data.index.vocab(), "deepspeed": self.deepspeed,
                "sid_index": {k: list(v) for k, v in self.data.index.tokens.items()},
                "item_sids": self.data.item_sids, "run_name": run.dir.name,
                "meta": {"config": self.job, "base": self.base, "data": str(self.data.ds.path.resolve()),
                         "sids_source": self.data.index.source, "mlflow_run_id": tracker.run_id,
                         "tracking_uri": redact_uri(tracker.uri)}}


def prepare(cfg: GenRecJobConfig, run: Run) -> Inputs:
    from rayrec.genrec.lm import resolve_deepspeed

    deepspeed = resolve_deepspeed(cfg.train.deepspeed)
    data = prepare_inputs(cfg)
    distinct = len(set(data.item_sids.values()))  # shared SIDs (sids.shared=share) name one item each
    if cfg.train.val_rows and cfg.eval.num_beams > distinct:
        raise ConfigError(f"eval.num_beams={cfg.eval.num_beams} exceeds the {distinct} distinct SIDs that validation "
                          "can decode; lower eval.num_beams")
    run.dir.mkdir(parents=True, exist_ok=True)
    base = materialize_base(cfg, run.dir, data)
    fit_inputs(cfg, data, prompt_tokenizer(cfg, data, base))  # the answer and its EOS always survive
    check_targets(base, cfg.train.lora.target_modules)
    return Inputs(data, base, deepspeed, dump_job(cfg))


def share(cfg: GenRecJobConfig) -> None:
    """A sweep: the dataset and the SID index (built here when missing, so trials never build it
    concurrently), checked against the items once."""
    from rayrec.data.dataset import ensure_prepared
    from rayrec.genrec.semantic_ids import load_or_build

    items = ensure_prepared(cfg.data).table("items")
    index, _ = load_or_build(cfg.sids, items, seed=cfg.run.seed)  # and the shared-SID policy applied (written) once
    index.for_items(items)  # unknown or missing SIDs fail here, not in every trial


# ----------------------------------------------------------------------------- callbacks


def sft_callbacks(cfg: GenRecJobConfig, loop: dict[str, Any], model, tokenizer, tracker, valid_rows, *,
                  show: bool) -> list:
    """Metric names + MLflow, checkpoint metadata, (``train.val_rows`` > 0) validation ranking, console."""
    from rayrec.genrec.evaluate import val_ranking_callback
    from rayrec.genrec.lm import make_callbacks

    meta = {**loop["meta"], "embedding_rows": int(model.get_input_embeddings().weight.shape[0])}
    callbacks = make_callbacks(tracker, meta, loop["sid_index"])
    if cfg.train.val_rows and valid_rows:
        records = valid_rows[: cfg.train.val_rows]
        callbacks.append(val_ranking_callback(records, loop["item_sids"], tokenizer, cfg, tracker))
    if show:
        callbacks.append(console_callback())
    return callbacks


# ----------------------------------------------------------------------------- in this process


def local(cfg: GenRecJobConfig, inputs: Inputs, run: Run) -> Outcome:
    import datasets

    from rayrec.genrec.lm import build_trainer, pick_dtype, prepare_base

    datasets.disable_progress_bars()
    if inputs.deepspeed is not None:
        single_process_group()
    loop = inputs.loop_config(run)
    seed_everything(cfg.run.seed)  # the SID rows' mean-resizing draws from torch's RNG before HF's Trainer seeds it
    model, tokenizer, new_ids = prepare_base(inputs.base, loop["sid_vocab"], pick_dtype(cfg.model.dtype, False))
    valid = inputs.data.valid.to_dict("records")
    callbacks = sft_callbacks(cfg, loop, model, tokenizer, run.tracker, valid, show=run.console)
    trainer = build_trainer(cfg, model, tokenizer, new_ids, inputs.data.train.to_dict("records"), valid,
                            run.dir / "checkpoints", use_gpu=False, deepspeed=inputs.deepspeed, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=run.resume_from)
    history: dict[str, float] = {}
    for entry in trainer.state.log_history:
        history.update(entry)
    adapter = best_local(trainer.state.log_history, run.dir / "checkpoints", *cfg.selection_metric)
    metrics = {k: float(v) for k, v in history.items() if "/" in k} | chosen_metrics(trainer.state.log_history, adapter)
    return Outcome(metrics, run.dir, adapter, run.tracker.run_id)


# ----------------------------------------------------------------------------- on Ray Train


def sft_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker: build the PEFT model and run TRL's trainer."""
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    from rayrec.genrec.lm import build_trainer, pick_dtype, prepare_base

    w = setup_hf_worker(config, GenRecJobConfig, "sft")
    cfg, use_gpu = w.cfg, w.cfg.scaling.use_gpu
    model, tokenizer, new_ids = prepare_base(config["base"], config["sid_vocab"], pick_dtype(cfg.model.dtype, use_gpu))
    train_rows, valid_rows = dataset_rows(TRAIN_KEY), dataset_rows(VALID_KEY)
    callbacks = sft_callbacks(cfg, config, model, tokenizer, w.tracker, valid_rows, show=w.show) + [RayTrainReportCallback()]
    trainer = build_trainer(cfg, model, tokenizer, new_ids, train_rows, valid_rows, w.output_dir,
                            use_gpu=use_gpu, deepspeed=config.get("deepspeed"), callbacks=callbacks)
    train_resuming(prepare_trainer(trainer), config.get("resume_from"))


def trainer_parts(cfg: GenRecJobConfig, inputs: Inputs, run: Run) -> TrainerParts:
    """The prompt tables as lazy Parquet reads from the run folder (shared storage on a cluster).

    Lazy on purpose: ``ray.data.from_pandas`` runs tasks at once, which wait for a free CPU,
    so a cluster without room would hang here instead of failing by ``scaling.start_timeout_s``.
    """
    import os

    import ray.data
    import ray.train

    valid = inputs.data.valid
    folder = run.dir / "prompts"
    datasets = {TRAIN_KEY: ray.data.read_parquet(write_table(inputs.data.train[["prompt", "completion"]],
                                                             folder / "train.parquet"))}
    if valid is not None:
        datasets[VALID_KEY] = ray.data.read_parquet(write_table(valid[["prompt", "completion", "target"]],
                                                                folder / "valid.parquet"))
    metric, mode = cfg.selection_metric
    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True  # validation ranking scores the first train.val_rows rows
    return TrainerParts(
        loop=sft_worker, config=inputs.loop_config(run), datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=opts),
        score=(metric if valid is not None else None, mode),
        env={"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "TOKENIZERS_PARALLELISM": "false"},
    )


def outcome(cfg: GenRecJobConfig, result, run: Run) -> Outcome:
    """The checkpoint best by the selection metric, with the validation scores it was chosen by (the
    run's other metrics are its last report's)."""
    best, (metric, mode) = result.checkpoint, cfg.selection_metric
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if "/" in k}
    if result.best_checkpoints and any(metric in m for _, m in result.best_checkpoints):
        best = result.get_best_checkpoint(metric, mode)
        chosen = next((m for c, m in result.best_checkpoints if c.path == best.path), {})
        metrics |= {k: float(v) for k, v in chosen.items() if k.startswith("val/")}
    adapter = str(Path(best.path) / "checkpoint") if best else None
    return Outcome(metrics, run.dir, adapter, run.tracker.run_id)


def console_keys(cfg: GenRecJobConfig) -> list[str]:
    metric, _ = cfg.selection_metric
    k = metric.partition("@")[2]
    return ["train/loss", "val/loss", *([f"val/ndcg@{k}", f"val/hr@{k}"] if k else [])]


RECIPE = Recipe(
    name="sft", prepare=prepare,
    record=lambda tracker, inputs: log_inputs(tracker, inputs.data), local=local, trainer=trainer_parts,
    outcome=outcome, console_keys=console_keys, share=share,
    curves=("train/loss", "val/loss", "val/ndcg@10", "val/hr@10"),
    tags=lambda cfg: {"rayrec.model": "genrec-sft", "rayrec.base": cfg.model.base},
    checkpoint_label="adapter",
)
