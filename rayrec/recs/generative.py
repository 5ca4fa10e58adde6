"""The generative track's top-K: constrained beam search over each user's history prompt.

The prompt, its length budget and the trie are those of ``rayrec eval-genrec`` (``eval.task``,
``prompts.max_history``, ``model.max_length``), so every returned item is a real item and, with
``include_seen`` and K = ``eval.num_beams``, the lists are the ones ``eval-genrec`` scores.

Seen items are excluded after decoding: a row's beam is widened by the number of distinct
answers in its history (capped at the number of answers), the seen answers are dropped and the
best K that remain are kept, so K unseen items come back whenever the catalogue has them. Rows
of one width are decoded together. Several items sharing one answer (shared SIDs, identical
titles) come back as the item the answer names (``SidTrie.canonical``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayrec.errors import ConfigError


def is_adapter(path: Path) -> bool:
    from rayrec.genrec.lm import META_FILE, SID_FILE

    return (path / META_FILE).is_file() and (path / SID_FILE).is_file()


def adapter_job(adapter: Path, job: Path | None):
    """The generative job an adapter was trained with (kept in its genrec.json), else ``job``."""
    import yaml

    from rayrec.config.genrec import GenRecJobConfig, GRPOJobConfig
    from rayrec.config.kinds import kind_named, load_job_file
    from rayrec.genrec.lm import META_FILE

    meta = json.loads((adapter / META_FILE).read_text())
    if job is not None:
        return load_job_file(job, [], expect=(kind_named("genrec"), kind_named("grpo"))), meta
    if not meta.get("config"):
        raise ConfigError(f"{adapter}: this checkpoint predates the job kept in genrec.json; pass the job file it "
                          "was trained with: rayrec recommend ADAPTER JOB.yaml ...")
    cls = GRPOJobConfig if meta.get("stage") == "grpo" else GenRecJobConfig
    return cls.model_validate(yaml.safe_load(meta["config"])), meta


def decode_settings(cfg, adapter: Path, ds, k: int) -> dict[str, Any]:
    """What every decoding actor needs (item SIDs, titles, the prompt budget), checked here once."""
    from rayrec.genrec import prompts as P
    from rayrec.genrec.evaluate import answer_trie
    from rayrec.genrec.lm import SID_FILE, load_tokenizer
    from rayrec.genrec.semantic_ids import read_index

    task = cfg.eval.task
    item_sids = read_index(adapter / SID_FILE).for_items(ds.table("items"))
    titles = P.titles_of(ds)
    trie = answer_trie(load_tokenizer(adapter), task, item_sids, titles)
    if k > trie.num_items:
        raise ConfigError(f"--k {k}: above the {trie.num_items} distinct answers the model can decode (task {task})")
    budget = cfg.model.max_length - trie.max_len
    if budget < 16:
        raise ConfigError(f"model.max_length={cfg.model.max_length} leaves {budget} prompt tokens once the longest "
                          f"answer ({trie.max_len} tokens) is reserved; raise model.max_length")
    return {"task": task, "item_sids": item_sids, "titles": titles, "max_history": cfg.prompts.max_history,
            "max_prompt_tokens": budget, "batch_size": cfg.eval.batch_size, "use_gpu": cfg.scaling.use_gpu}


class GenRecommender:
    """Top-K of a batch of histories (``rayrec.recs.scoring``'s batch and answer) by constrained beam
    search with an SFT or GRPO adapter; built once per Ray Data actor (or once in this process)."""

    def __init__(self, adapter: str, k: int, include_seen: bool, settings: dict[str, Any]) -> None:
        from rayrec.genrec.evaluate import _quiet_loading, answer_trie
        from rayrec.genrec.inputs import token_counter
        from rayrec.genrec.lm import load_for_eval

        _quiet_loading()
        device = "cuda" if settings.get("use_gpu") and torch.cuda.is_available() else "cpu"  # this actor's GPU
        self.model, self.tokenizer, _ = load_for_eval(adapter, device=device)
        self.sids = {int(i): tuple(s) for i, s in settings["item_sids"].items()}
        self.titles = {int(i): t for i, t in settings["titles"].items()}
        self.task, self.settings = settings["task"], settings
        self.trie = answer_trie(self.tokenizer, self.task, self.sids, self.titles)
        self.count = token_counter(self.tokenizer, eos=False)
        self.k, self.include_seen = k, include_seen

    def __call__(self, batch: dict[str, Any], k: int | None = None, include_seen: bool | None = None
                 ) -> dict[str, np.ndarray]:
        from rayrec.genrec import prompts as P
        from rayrec.genrec.constrained import beam_rank

        k = self.k if k is None else k
        include_seen = self.include_seen if include_seen is None else include_seen
        s, canonical = self.settings, self.trie.canonical
        histories = [[int(i) for i in h] for h in batch["history"]]
        frame = P.history_prompts(batch["user_idx"], histories, self.sids, self.titles, s["max_history"], self.task)
        frame, _ = P.fit_lengths(frame, self.count, s["max_prompt_tokens"], self.sids, self.titles,
                                 with_answer=False, drop=False)
        seen = [set() if include_seen else {canonical.get(i, i) for i in h} for h in histories]
        widths = np.array([min(self.trie.num_items, k + len(x)) for x in seen])
        picked: list[list[tuple[int, float]]] = [[] for _ in histories]
        for width in np.unique(widths):
            rows = np.flatnonzero(widths == width)
            ranked = beam_rank(self.model, self.tokenizer, frame["prompt"].iloc[rows].tolist(), self.trie,
                               num_beams=int(width), batch_size=s["batch_size"], max_prompt_tokens=s["max_prompt_tokens"])
            for r, out in zip(rows, ranked):
                picked[r] = [(i, sc) for i, sc in zip(out.items, out.scores)
                             if i is not None and np.isfinite(sc) and i not in seen[r]][:k]
        keys = np.asarray(batch["key"], dtype=np.int64)
        return {"key": np.repeat(keys, [len(p) for p in picked]),
                "rank": np.array([n for p in picked for n in range(1, len(p) + 1)], dtype=np.int64),
                "item_idx": np.array([i for p in picked for i, _ in p], dtype=np.int64),
                "score": np.array([sc for p in picked for _, sc in p], dtype=np.float64)}
