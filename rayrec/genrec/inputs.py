"""What an SFT (and later GRPO) job prepares on the driver: dataset, SID index, prompt tables, base model.

Everything that can fail cheaply is checked here, before a worker starts: the SID index
against the dataset (unknown items, missing items, duplicates), and the LoRA targets (on a
weightless ``meta``-device copy of the model).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayrec.config.genrec import GenRecJobConfig
from rayrec.data.dataset import Prepared, ensure_prepared
from rayrec.errors import RayrecError
from rayrec.genrec import prompts as P
from rayrec.genrec.lm import lora_targets
from rayrec.genrec.semantic_ids import SidIndex, describe_index, load_or_build
from rayrec.tracking.mlflow_tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class GenRecInputs:
    """What the driver prepares once and hands to the workers."""

    ds: Prepared
    index: SidIndex
    item_sids: dict[int, tuple[str, ...]]
    train: Any  # pandas DataFrame of prompts
    valid: Any
    report: dict | None
    valid_total: int = 0  # valid rows of the dataset, before train.val_rows
    fit: dict[str, P.FitReport] = field(default_factory=dict)  # per table, set by ``fit_inputs``


def prepare_inputs(cfg: GenRecJobConfig, index: SidIndex | None = None) -> GenRecInputs:
    """Dataset, SID index (read or built; or ``index``, e.g. an adapter's) checked against the items,
    and the prompt tables."""
    ds = ensure_prepared(cfg.data)
    items = ds.table("items")
    report = None
    if index is None:
        index, report = load_or_build(cfg.sids, items, seed=cfg.run.seed)
    item_sids = index.for_items(items)
    train = P.train_prompts(ds, item_sids, cfg.prompts, seed=cfg.run.seed)
    valid = P.eval_prompts(ds, "valid", item_sids, cfg.prompts, max_rows=cfg.train.val_rows or None)
    total = len(ds.table("valid"))
    log.info("validation uses the first %d of %d valid rows (train.val_rows=%d)", len(valid), total,
             cfg.train.val_rows)
    return GenRecInputs(ds, index, item_sids, train, valid, report, valid_total=total)


def canonical_targets(inputs: GenRecInputs) -> int:
    """With shared SIDs (``sids.shared: share``), targets become the item that a decoded SID names
    (``canonical_items``), so rewards and hits compare SIDs; returns the targets changed."""
    from rayrec.genrec.semantic_ids import canonical_items

    canon = canonical_items(inputs.item_sids)
    changed = 0
    for name in ("train", "valid"):
        table = getattr(inputs, name)
        mapped = table["target"].map(lambda t: canon.get(int(t), int(t)) if int(t) >= 0 else int(t))
        changed += int((mapped != table["target"]).sum())
        setattr(inputs, name, table.assign(target=mapped))
    return changed


def prompt_tokenizer(cfg: GenRecJobConfig, inputs: GenRecInputs, base: str | None = None):
    """The tokenizer training will use, with the SID tokens added: ``base``'s (a folder or hub id,
    default ``model.base``), or for ``tiny`` the word-level one built from the prompts."""
    from rayrec.genrec.lm import extend_tokenizer

    base = base or cfg.model.base
    if base == "tiny":
        from rayrec.genrec.tiny import tiny_tokenizer

        tokenizer = tiny_tokenizer(tiny_corpus(cfg, inputs))
    else:
        from rayrec.genrec.lm import load_tokenizer

        try:
            tokenizer = load_tokenizer(base)
        except OSError as e:
            raise RayrecError(f"model.base {base!r}: no tokenizer ({e})") from None
    extend_tokenizer(tokenizer, inputs.index.vocab())
    return tokenizer


def token_counter(tokenizer, eos: bool):
    """``texts -> token counts`` as TRL counts a prompt-completion example (EOS appended when ``eos``)."""
    suffix = tokenizer.eos_token if eos and tokenizer.eos_token else ""

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer([t + suffix for t in texts])["input_ids"]]

    return count


def fit_inputs(cfg: GenRecJobConfig, inputs: GenRecInputs, tokenizer, answer_tokens: int | None = None
               ) -> dict[str, P.FitReport]:
    """Fit the prompt tables to ``model.max_length`` in place (``P.fit_lengths``) and log what it cut.

    SFT (``answer_tokens`` None): prompt + completion + EOS must fit. Generation (GRPO):
    the prompt must leave ``answer_tokens`` (the longest SID and EOS) free.
    """
    titles = P.titles_of(inputs.ds)
    with_answer = answer_tokens is None
    budget = cfg.model.max_length - (answer_tokens or 0)
    count = token_counter(tokenizer, eos=with_answer)
    for name in ("train", "valid"):
        table = getattr(inputs, name)
        fitted, report = P.fit_lengths(table, count, budget, inputs.item_sids, titles, with_answer=with_answer)
        if fitted.empty:
            raise RayrecError(f"model.max_length={cfg.model.max_length}: no {name} prompt fits, even with one history "
                              "item; raise model.max_length")
        setattr(inputs, name, fitted)
        inputs.fit[name] = report
        if report.total_truncated or report.total_dropped:
            log.warning("%s prompts: %d of %d longer than model.max_length=%d tokens: %d kept their most recent "
                        "history (%d older items cut), %d dropped (%s)", name, report.total_truncated +
                        report.total_dropped, report.examples, cfg.model.max_length, report.total_truncated,
                        report.items_cut, report.total_dropped,
                        ", ".join(f"{t} {n}" for t, n in report.dropped.items()) or "none")
    return inputs.fit


def tiny_corpus(cfg: GenRecJobConfig, inputs: GenRecInputs) -> list[str]:
    """The texts whose words make the tiny tokenizer: the prompt tables, the test prompts and titles."""
    test = P.eval_prompts(inputs.ds, "test", inputs.item_sids, cfg.prompts)
    return P.tokenizer_corpus(inputs.train, inputs.valid, test, titles=P.titles_of(inputs.ds))


def materialize_base(cfg: GenRecJobConfig, run_dir: Path, inputs: GenRecInputs) -> str:
    """The base model folder: ``model.base`` as given, or a tiny model written under the run."""
    if cfg.model.base != "tiny":
        return cfg.model.base
    from rayrec.genrec.tiny import save_tiny_base

    out = run_dir / "base"
    if not (out / "config.json").is_file():
        corpus = tiny_corpus(cfg, inputs)
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


def log_inputs(tracker: Tracker, inputs: GenRecInputs) -> None:
    """SID report and a sample of each prompt task, so a run says what it trained on."""
    d = describe_index(inputs.index)
    codes = {f"sids/codes_level_{i}": n for i, n in enumerate(d["distinct_codes"])}
    tracker.log_metrics({**codes, "sids/levels": d["levels"], "sids/collision_rate": d["collision_rate"]})
    shared = (inputs.report or {}).get("shared")
    if shared:
        tracker.log_metrics({"sids/shared_sids": shared["shared_sids"], "sids/items_sharing": shared["items_sharing"]})
    if inputs.report:
        tracker.log_text(json.dumps(inputs.report, indent=2), "sids/report.json")
    if inputs.report and "usage" in inputs.report:
        usage = {f"sids/usage_level_{i}": u for i, u in enumerate(inputs.report["usage"])}
        tracker.log_metrics({**usage, "sids/collision_rate_raw": inputs.report["collision_rate_raw"]})
    sample = inputs.train.groupby("task").head(2)
    text = "\n\n".join(f"[{r.task}]\n{r.prompt}{r.completion}" for r in sample.itertuples())
    tracker.log_text(text, "prompts/sample.txt")
    tracker.log_metrics({"data/train_prompts": len(inputs.train), "data/valid_prompts": len(inputs.valid),
                         "data/valid_rows_total": inputs.valid_total})
    for name, fit in inputs.fit.items():
        tracker.log_metrics({f"data/{name}_truncated": fit.total_truncated, f"data/{name}_dropped": fit.total_dropped,
                             f"data/{name}_history_items_cut": fit.items_cut})
    tracker.log_file(inputs.ds.path / "manifest.json", "data")
