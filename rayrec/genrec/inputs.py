"""What an SFT (and later GRPO) job prepares on the driver: dataset, SID index, prompt tables, base model.

Everything that can fail cheaply is checked here, before a worker starts: the SID index
against the dataset (unknown items, missing items, duplicates), and the LoRA targets (on a
weightless ``meta``-device copy of the model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrec.data.dataset import Prepared, ensure_prepared
from rayrec.errors import RayrecError
from rayrec.genrec import prompts as P
from rayrec.genrec.config import GenRecJobConfig
from rayrec.genrec.semantic_ids import SidIndex, describe_index, load_or_build
from rayrec.genrec.sft import lora_targets
from rayrec.tracking.mlflow_tracking import Tracker


@dataclass
class SFTInputs:
    """What the driver prepares once and hands to the workers."""

    ds: Prepared
    index: SidIndex
    item_sids: dict[int, tuple[str, ...]]
    train: Any  # pandas DataFrame of prompts
    valid: Any
    report: dict | None


def prepare_inputs(cfg: GenRecJobConfig, index: SidIndex | None = None) -> SFTInputs:
    """Dataset, SID index (read or built; or ``index``, e.g. an adapter's) checked against the items,
    and the prompt tables."""
    ds = ensure_prepared(cfg.data)
    items = ds.table("items")
    report = None
    if index is None:
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
