"""The `rayrec sft` recipe: check -> data -> SIDs -> prompts -> base -> tracking -> train -> report.

Everything that can fail cheaply is checked before a worker starts: the config, the
SID index against the dataset (unknown items, missing items, duplicates), the DeepSpeed
config file, the LoRA targets (on a weightless ``meta``-device copy of the model), the
MLflow store and the cluster size.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrec.config.loader import dump_job, flatten
from rayrec.data.dataset import Prepared, ensure_prepared
from rayrec.errors import RayrecError
from rayrec.genrec import prompts as P
from rayrec.genrec.config import GenRecJobConfig
from rayrec.genrec.semantic_ids import SidIndex, describe_index, load_or_build
from rayrec.genrec.sft import VAL_LOSS, lora_targets, resolve_deepspeed
from rayrec.tracking.mlflow_tracking import Tracker, check_reachable, open_run, resolve_uri
from rayrec.train.run import COMPLETE_MARKER, check_storage, pick_run_dir

log = logging.getLogger(__name__)


@dataclass
class SFTOutcome:
    metrics: dict[str, float]
    run_dir: Path
    adapter: str | None  # folder with adapter_model.safetensors, tokenizer, genrec.json
    mlflow_run_id: str | None


@dataclass
class SFTInputs:
    """What the driver prepares once and hands to the workers."""

    ds: Prepared
    index: SidIndex
    item_sids: dict[int, tuple[str, ...]]
    train: Any  # pandas DataFrame of prompts
    valid: Any
    report: dict | None


def prepare_inputs(cfg: GenRecJobConfig) -> SFTInputs:
    """Dataset, SID index (read or built) checked against the items, and the prompt tables."""
    ds = ensure_prepared(cfg.data)
    items = ds.table("items")
    index, report = load_or_build(cfg.sids, items, seed=cfg.run.seed)
    item_sids = index.for_items(items)
    train = P.train_prompts(ds, item_sids, cfg.prompts, seed=cfg.run.seed)
    valid = P.eval_prompts(ds, "valid", item_sids, cfg.prompts)
    return SFTInputs(ds, index, item_sids, train, valid, report)


def materialize_base(cfg: GenRecJobConfig, run_dir: Path, inputs: SFTInputs) -> str:
    """The base model folder: ``model.base`` as given, or a tiny model written under the run."""
    if cfg.model.base != "tiny":
        return cfg.model.base
    from rayrec.genrec.tiny import save_tiny_base

    out = run_dir / "base"
    if not (out / "config.json").is_file():
        test = P.eval_prompts(inputs.ds, "test", inputs.item_sids, cfg.prompts)
        corpus = P.tokenizer_corpus(inputs.train, inputs.valid, test, titles=P.titles_of(inputs.ds))
        t = cfg.model.tiny
        save_tiny_base(out, corpus, hidden=t.hidden, layers=t.layers, heads=t.heads, kv_heads=t.kv_heads,
                       tie_embeddings=t.tie_embeddings, seed=cfg.run.seed)
    return str(out.resolve())


def check_targets(base: str, spec) -> list[str]:
    """Resolve LoRA targets on a weightless copy of the model (no memory, no download of weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base)
    except OSError as e:
        raise RayrecError(f"model.base {base!r}: no model config ({e})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return lora_targets(model, spec)


def open_tracking(cfg: GenRecJobConfig, run_dir: Path, source: str | None) -> Tracker:
    if not cfg.tracking.enabled:
        return Tracker.null()
    uri = resolve_uri(cfg.tracking.uri)
    check_reachable(uri)
    tracker = open_run(uri, cfg.tracking.experiment, str(run_dir), run_dir.name,
                       tags={"rayrec.model": "genrec-sft", "rayrec.base": cfg.model.base,
                             "rayrec.job_file": source or ""})
    tracker.log_params(flatten(cfg))
    tracker.log_text(dump_job(cfg), "config/resolved.yaml")
    return tracker


def log_inputs(tracker: Tracker, inputs: SFTInputs) -> None:
    """SID report and a sample of each prompt task, so a run says what it trained on."""
    d = describe_index(inputs.index)
    codes = {f"sids/codes_level_{i}": n for i, n in enumerate(d["distinct_codes"])}
    tracker.log_metrics({**codes, "sids/levels": d["levels"], "sids/collision_rate": d["collision_rate"]})
    if inputs.report:
        tracker.log_text(json.dumps(inputs.report, indent=2), "sids/report.json")
        usage = {f"sids/usage_level_{i}": u for i, u in enumerate(inputs.report["usage"])}
        tracker.log_metrics({**usage, "sids/collision_rate_raw": inputs.report["collision_rate_raw"]})
    sample = inputs.train.groupby("task").head(2)
    text = "\n\n".join(f"[{r.task}]\n{r.prompt}{r.completion}" for r in sample.itertuples())
    tracker.log_text(text, "prompts/sample.txt")
    tracker.log_metrics({"data/train_prompts": len(inputs.train), "data/valid_prompts": len(inputs.valid)})
    tracker.log_file(inputs.ds.path / "manifest.json", "data")


def run_sft(cfg: GenRecJobConfig, *, local: bool = False, source: str | None = None,
            resume_from: str | None = None, callbacks: list | None = None,
            tracker: Tracker | None = None) -> SFTOutcome:
    """LoRA-SFT ``cfg`` end to end; return the final metrics and the best adapter folder.

    ``callbacks``: Ray Train callbacks of the ``TorchTrainer`` (a sweep's report callback).
    ``tracker``: an MLflow run opened by the caller (a sweep trial's child run) that gets the
    inputs, the per-epoch metrics and the adapter tag instead of a new run; the caller ends it.
    """
    storage = check_storage(cfg.run.storage_path)
    deepspeed = resolve_deepspeed(cfg.train.deepspeed)
    inputs = prepare_inputs(cfg)
    run_dir = pick_run_dir(storage, cfg.run.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    base = materialize_base(cfg, run_dir, inputs)
    check_targets(base, cfg.train.lora.target_modules)
    owned = tracker is None
    if tracker is None:
        tracker = open_tracking(cfg, run_dir, source)
    log_inputs(tracker, inputs)
    loop = {"base": base, "sid_vocab": inputs.index.vocab(), "deepspeed": deepspeed, "resume_from": resume_from,
            "sid_index": {k: list(v) for k, v in inputs.index.tokens.items()}, "item_sids": inputs.item_sids,
            "tracking_uri": tracker.uri,
            "mlflow_run_id": tracker.run_id,
            "meta": {"base": base, "data": str(inputs.ds.path.resolve()), "sids_source": inputs.index.source,
                     "mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri}}
    try:
        if local:
            outcome = _train_local(cfg, run_dir, inputs, loop, tracker)
        else:
            outcome = _train_ray(cfg, run_dir, inputs, loop, callbacks)
    except BaseException:
        if owned:
            tracker.finish("FAILED")
        raise
    _finish(tracker, outcome, end=owned)
    (run_dir / COMPLETE_MARKER).write_text(outcome.mlflow_run_id or "")
    return outcome


def single_process_group() -> None:
    """A one-process gloo group on this host, for DeepSpeed outside Ray (``--local``, tests)."""
    import os
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:  # a free port, so parallel runs on one host do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    dist.init_process_group("gloo")


def _train_local(cfg: GenRecJobConfig, run_dir: Path, inputs: SFTInputs, loop: dict, tracker: Tracker) -> SFTOutcome:
    """The same trainer in this process (no Ray); checkpoints under ``run_dir/checkpoints``."""
    import datasets

    from rayrec.genrec.ray_sft import sft_callbacks
    from rayrec.genrec.sft import build_trainer, pick_dtype, prepare_base

    datasets.disable_progress_bars()
    if loop["deepspeed"] is not None:
        single_process_group()
    model, tokenizer, new_ids = prepare_base(loop["base"], loop["sid_vocab"], pick_dtype(cfg.model.dtype, False))
    valid = inputs.valid.to_dict("records")
    trainer = build_trainer(cfg, model, tokenizer, new_ids, inputs.train.to_dict("records"), valid,
                            run_dir / "checkpoints", use_gpu=False, deepspeed=loop["deepspeed"],
                            callbacks=sft_callbacks(cfg, loop, model, tokenizer, tracker, valid))
    trainer.train(resume_from_checkpoint=loop["resume_from"])
    history: dict[str, float] = {}
    for entry in trainer.state.log_history:
        history.update(entry)
    adapter = _best_local(trainer.state.log_history, run_dir / "checkpoints", *cfg.selection_metric)
    return SFTOutcome({k: float(v) for k, v in history.items() if "/" in k}, run_dir, adapter, tracker.run_id)


def _best_local(log_history: list[dict], folder: Path, metric: str, mode: str) -> str | None:
    """The saved checkpoint best by ``metric`` (the last one when none was scored)."""
    saved = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    values = {int(e["step"]): e[metric] for e in log_history if metric in e}
    scored = [p for p in saved if int(p.name.split("-")[1]) in values]
    if scored:
        pick = max if mode == "max" else min
        return str(pick(scored, key=lambda p: values[int(p.name.split("-")[1])]))
    return str(saved[-1]) if saved else None


def _train_ray(cfg: GenRecJobConfig, run_dir: Path, inputs: SFTInputs, loop: dict, callbacks) -> SFTOutcome:
    from rayrec.genrec.ray_sft import build_sft_trainer
    from rayrec.train.cluster import ensure_ray, preflight

    ensure_ray()
    preflight(cfg)
    trainer = build_sft_trainer(cfg, run_dir=run_dir, train_rows=inputs.train, valid_rows=inputs.valid, loop=loop,
                                callbacks=callbacks)
    result = trainer.fit()
    if result.error:
        raise RayrecError(f"SFT failed: {result.error}")
    best, (metric, mode) = result.checkpoint, cfg.selection_metric
    if result.best_checkpoints and any(metric in m for _, m in result.best_checkpoints):
        best = result.get_best_checkpoint(metric, mode)
    adapter = str(Path(best.path) / "checkpoint") if best else None
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if "/" in k}
    return SFTOutcome(metrics, run_dir, adapter, loop["mlflow_run_id"])


def _finish(tracker: Tracker, outcome: SFTOutcome, *, end: bool = True) -> None:
    """Driver-side records: the adapter path, learning curves, the run status (``end``)."""
    from rayrec.tracking.plots import learning_curves

    if not tracker.active:
        return
    tracker.set_tags({"rayrec.adapter": outcome.adapter or ""})
    curves = {k: tracker.history(k) for k in ("train/loss", VAL_LOSS, "val/ndcg@10", "val/hr@10")}
    if any(curves.values()):
        tracker.log_figure(learning_curves(curves), "learning_curves.png")
    if end:
        tracker.finish("FINISHED")
