"""`rayrec prefs generate`: select users/items, check the backend, generate with a cache, write.

Order matters: requests are built (from training sequences only) and the backend is
checked (API key present, endpoint reachable) before a single request is sent; each result
is cached as it arrives; outputs merge with those of earlier runs, so ``--skip-users`` /
``--num-users`` batches add up.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from rayrec.config.joint import PrefsConfig
from rayrec.config.schema import JobConfig
from rayrec.data.atomic import atomic_path
from rayrec.prefs.backends import BackendError, make_backend
from rayrec.prefs.cache import PromptCache
from rayrec.prefs.prompts import Request, item_facts, item_request, user_request

log = logging.getLogger(__name__)

USERS_FILE, ITEMS_FILE, SUMMARY_FILE, CACHE_FILE = "user_prefs.parquet", "item_descriptions.parquet", "summary.json", "cache.jsonl"


def prefs_out_dir(cfg: PrefsConfig, data_path: Path) -> Path:
    return Path(cfg.out_dir) if cfg.out_dir else Path(data_path) / "prefs"


@dataclass
class Selection:
    num_users: int | None = None
    num_items: int | None = None
    skip_users: int = 0
    skip_items: int = 0


@dataclass
class Summary:
    backend: str
    model: str
    requested: int = 0
    cached: int = 0
    generated: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    errors: list[str] = field(default_factory=list)


def build_requests(data_path: Path, cfg: PrefsConfig, sel: Selection) -> tuple[list[Request], dict]:
    """User requests from ``train.parquet`` (training items only) and item requests, as selected."""
    items = pd.read_parquet(data_path / "items.parquet").sort_values("item_idx")
    facts = item_facts(items)
    train = pd.read_parquet(data_path / "train.parquet").sort_values("user_idx")
    users = train.iloc[sel.skip_users : None if sel.num_users is None else sel.skip_users + sel.num_users]
    reqs = [user_request(int(u), list(s), facts, cfg.history_items) for u, s in zip(users["user_idx"], users["seq"], strict=True) if len(s)]
    chosen = items.iloc[sel.skip_items : None if sel.num_items is None else sel.skip_items + sel.num_items]
    reqs += [item_request(int(i), facts[int(i)]) for i in chosen["item_idx"]]
    return reqs, facts


def generate_prefs(job: JobConfig, data_path: Path, sel: Selection, *, dry_run: bool = False,
                   echo: Callable[[str], None] = print) -> Summary:
    """Generate (or print, with ``dry_run``) the selected users' preferences and items' descriptions."""
    cfg = job.model.prefs
    reqs, facts = build_requests(Path(data_path), cfg, sel)
    summary = Summary(cfg.backend, cfg.model if cfg.backend == "openai" else "template", requested=len(reqs))
    if dry_run:
        for r in reqs:
            echo(f"--- {r.kind} {r.idx}\n{r.prompt_text()}")
        return summary
    backend = make_backend(cfg, facts)
    backend.check()  # missing key / unreachable endpoint: fail before any request
    out = prefs_out_dir(cfg, Path(data_path))
    cache = PromptCache(out / CACHE_FILE)
    results = _run(reqs, backend, cache, cfg, summary)
    _write_outputs(out, results)
    summary.cost = (summary.prompt_tokens * cfg.price_per_1k_prompt + summary.completion_tokens * cfg.price_per_1k_completion) / 1000
    (out / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2))
    return summary


def _settings(cfg: PrefsConfig) -> dict:
    return {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens}


def _run(reqs: list[Request], backend, cache: PromptCache, cfg: PrefsConfig, summary: Summary) -> dict[tuple[str, int], str]:
    """Cached results first, then the rest with at most ``max_concurrency`` requests in flight."""
    model = cfg.model if backend.name == "openai" else "template"
    results, todo = {}, []
    for r in reqs:
        key = PromptCache.key(backend.name, model, _settings(cfg), r.cache_payload())
        hit = cache.get(key)
        if hit:
            results[(r.kind, r.idx)] = hit["text"]
            summary.cached += 1
        else:
            todo.append((key, r))
    workers = cfg.max_concurrency if backend.name == "openai" else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(backend.complete, r): (key, r) for key, r in todo}
        for fut in as_completed(futures):
            key, r = futures[fut]
            try:
                c = fut.result()
            except BackendError as e:
                summary.failed += 1
                summary.errors.append(str(e))
                log.warning("%s", e)
                continue
            cache.put(key, {"kind": r.kind, "idx": r.idx, "text": c.text, "prompt_tokens": c.prompt_tokens,
                            "completion_tokens": c.completion_tokens})
            results[(r.kind, r.idx)] = c.text
            summary.generated += 1
            summary.prompt_tokens += c.prompt_tokens
            summary.completion_tokens += c.completion_tokens
    return results


def _write_outputs(out: Path, results: dict[tuple[str, int], str]) -> None:
    """Merge this run's texts into the output tables (written via a temporary file and a rename)."""
    out.mkdir(parents=True, exist_ok=True)
    for kind, name, idx_col, text_col in (("user", USERS_FILE, "user_idx", "pref_text"),
                                          ("item", ITEMS_FILE, "item_idx", "description")):
        new = {i: t for (k, i), t in results.items() if k == kind}
        path = out / name
        old = dict(zip(*pd.read_parquet(path)[[idx_col, text_col]].T.values, strict=True)) if path.is_file() else {}
        merged = {**{int(k): v for k, v in old.items()}, **new}
        if not merged:
            continue
        df = pd.DataFrame({idx_col: list(merged), text_col: list(merged.values())}).sort_values(idx_col)
        df[idx_col] = df[idx_col].astype("int32")
        with atomic_path(path) as tmp:
            df.to_parquet(tmp, index=False)
