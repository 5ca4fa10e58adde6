"""Evaluate an SFT checkpoint: constrained beam search over the valid/test rows -> HR@K, NDCG@K.

Rows are split into one shard per Ray worker (one per GPU in production); each worker
loads the checkpoint once, builds the SID trie once and decodes its shard in batches;
the driver merges the shards in row order, computes the metrics, writes one results JSON
(``input``, ``target``, ``predictions`` per row, plus the rank of the target), prints a
table with the popularity baseline beside it, and logs to the training run in MLflow.

A target's rank is its 1-based position among the ``num_beams`` returned items (a miss
when absent), so HR@K and NDCG@K are exact for every K <= num_beams.

``eval.task`` picks the prompt task: ``sid_seq`` / ``title_seq`` decode SIDs,
``sid_seq_to_title`` / ``title_seq_to_title`` decode titles, constrained by a trie over the
real titles' tokens, and a hit is an exact title match. When several items share the
decoded answer (a shared SID under ``sids.shared: share``, or identical titles), the answer
names all of them: the target's rank is that of its answer, and the rows whose target
shares its answer are counted (``ambiguous_targets``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayrec.config.genrec import GenRecJobConfig
from rayrec.config.schema import PopularityConfig
from rayrec.data.dataset import Prepared, ensure_prepared
from rayrec.errors import DataError
from rayrec.eval.metrics import HR, NDCG, MetricSums, full_ranks, metric_key
from rayrec.genrec import prompts as P
from rayrec.genrec.lm import META_FILE, SID_FILE, load_tokenizer
from rayrec.genrec.semantic_ids import read_index
from rayrec.models.popularity import Popularity

log = logging.getLogger(__name__)


def rank_of(target: int, predictions: list[int | None]) -> int | None:
    """1-based position of ``target`` in ``predictions``; None when it is absent."""
    return predictions.index(target) + 1 if target in predictions else None


def answer_texts(task: str, item_sids: dict[int, tuple[str, ...]], titles: dict[int, str]) -> dict[int, str]:
    """item -> the text a ``task`` answers with (its SID string, or its title)."""
    if P.ANSWER_BY[task] == "title":
        return {i: titles[i] for i in item_sids}
    return {i: "".join(s) for i, s in item_sids.items()}


def result_rows(prompts, ranked, item_sids: dict[int, tuple[str, ...]], canonical: dict[int, int] | None = None,
                titles: dict[int, str] | None = None, task: str = "sid_seq") -> list[dict[str, Any]]:
    """One JSON-ready dict per prompt row (``prompts``: records of ``eval_prompts``; ``ranked``: ``Ranked``).

    ``canonical`` (``SidTrie.canonical``) maps a target to the item its answer names.
    """
    canonical = canonical or {}
    answers = answer_texts(task, item_sids, titles or {})
    shared = {i for i, c in canonical.items() if i != c} | {c for i, c in canonical.items() if i != c}
    out = []
    for row, r in zip(prompts, ranked):
        target = int(row["target"])
        out.append({
            "user_idx": int(row["user_idx"]),
            "input": P.history_input(row["history"], item_sids, titles or {}, P.HISTORY_BY[task]),
            "target": answers[target],
            "target_item": target,
            "predictions": [answers[i] if i is not None else None for i in r.items],
            "predicted_items": r.items,
            "scores": [round(s, 4) if np.isfinite(s) else None for s in r.scores],
            "rank": rank_of(canonical.get(target, target), r.items),
            "ambiguous": target in shared,
        })
    return out


def metrics_from_results(rows: list[dict[str, Any]], ks: list[int], split: str) -> dict[str, float]:
    """HR@K and NDCG@K over the rows' ranks, and the number of invalid (non-item) outputs."""
    if not rows:
        raise DataError("no result rows to score")
    ranks = torch.tensor([float(r["rank"]) if r.get("rank") else float("inf") for r in rows], dtype=torch.float64)
    means = MetricSums(ks).update(ranks).means(split)
    wanted = {metric_key(split, name, k) for k in ks for name in (HR, NDCG)}
    out = {k: v for k, v in means.items() if k in wanted}
    out[f"{split}/invalid"] = float(sum(p is None for r in rows for p in r["predicted_items"]))
    out[f"{split}/rows"] = float(len(rows))
    out[f"{split}/ambiguous_targets"] = float(sum(bool(r.get("ambiguous")) for r in rows))
    return out


def popularity_metrics(ds: Prepared, targets: list[int], ks: list[int], split: str,
                       canonical: dict[int, int] | None = None) -> dict[str, float]:
    """The most-popular baseline on the same rows (train counts, seen items not masked, as the LLM).

    With ``canonical`` (``SidTrie.canonical``: items sharing a SID or a title), it ranks what the
    model can return: one entry per shared answer, with the summed count of its items, and a
    target is found at its answer's rank, as the model's are.
    """
    model = Popularity(ds.num_items, PopularityConfig()).fit(ds.table("train")["seq"])
    t = torch.tensor(targets, dtype=torch.long)
    scores = model.score(t[:, None])  # [B, N+1], the same row for every target
    if canonical and any(i != c for i, c in canonical.items()):
        n = scores.shape[1]
        reps = torch.tensor([canonical.get(i, i) for i in range(n)], dtype=torch.long)  # [N+1]
        counts = model.counts.double()
        grouped = torch.zeros(n, dtype=torch.float64).index_add_(0, reps, counts)
        row = torch.where(reps == torch.arange(n), grouped + (scores[0] - counts), float("-inf"))
        row[0] = float("-inf")
        scores, t = row.expand_as(scores), reps[t]
    ranks = full_ranks(scores, t)
    means = MetricSums(ks).update(ranks).means(f"{split}_popularity")
    return {k: v for k, v in means.items() if "/hr@" in k or "/ndcg@" in k}


def answer_trie(tokenizer, task: str, item_sids: dict[int, tuple[str, ...]], titles: dict[int, str]):
    """The decoding trie of a task: over SIDs, or over the real titles' tokens."""
    from rayrec.genrec.constrained import build_title_trie, build_trie

    if P.ANSWER_BY[task] == "title":
        return build_title_trie(tokenizer, {i: titles[i] for i in item_sids})
    return build_trie(tokenizer, item_sids)


def decode_shard(adapter: str, records: list[dict], item_sids: dict[int, tuple[str, ...]], settings: dict,
                 device: str = "cpu") -> list[dict[str, Any]]:
    """Load the checkpoint, build the trie once, and rank items for ``records`` (one worker's shard)."""
    from rayrec.genrec.constrained import beam_rank
    from rayrec.genrec.lm import load_for_eval

    if not records:
        return []
    _quiet_loading()
    model, tokenizer, _ = load_for_eval(adapter, device=device)
    task, titles = settings.get("task", "sid_seq"), settings.get("titles") or {}
    trie = answer_trie(tokenizer, task, item_sids, titles)
    ranked = beam_rank(model, tokenizer, [r["prompt"] for r in records], trie, num_beams=settings["num_beams"],
                       batch_size=settings["batch_size"], max_prompt_tokens=settings["max_prompt_tokens"])
    return result_rows(records, ranked, item_sids, trie.canonical, titles, task)


def _quiet_loading() -> None:
    """No weight-loading bars or deprecation notices of transformers on the console while decoding."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def _decode_ray(cfg: GenRecJobConfig, adapter: str, records: list[dict], item_sids, settings) -> list[dict]:
    """One Ray task per worker over contiguous shards; results come back in row order."""
    import ray

    from rayrec.cluster import ensure_ray

    ensure_ray()
    res = dict(cfg.scaling.resources_per_worker)
    num_gpus = res.pop("GPU", 1.0 if cfg.scaling.use_gpu else 0.0)
    task = ray.remote(decode_shard).options(num_cpus=res.pop("CPU", 1.0), num_gpus=num_gpus, resources=res or None)
    shards = np.array_split(np.arange(len(records)), min(cfg.scaling.num_workers, len(records)))
    device = "cuda" if cfg.scaling.use_gpu else "cpu"
    refs = [task.remote(adapter, [records[i] for i in s], item_sids, settings, device) for s in shards]
    return [row for part in ray.get(refs) for row in part]


def metric_prefix(split: str, task: str) -> str:
    """``test`` for the default task, ``test_sid_seq_to_title`` for another one."""
    return split if task == "sid_seq" else f"{split}_{task}"


@dataclass
class EvalOutcome:
    metrics: dict[str, float]
    results_path: Path
    rows: list[dict[str, Any]]


def evaluate_adapter(cfg: GenRecJobConfig, adapter: str | Path, *, split: str | None = None, local: bool = False,
                     out: Path | None = None) -> EvalOutcome:
    """Decode ``split`` with the checkpoint in ``adapter``, score it, write and log the results."""
    from rayrec.errors import ConfigError
    from rayrec.genrec.inputs import token_counter

    split = split or cfg.eval.split
    adapter = Path(adapter).resolve()
    if not (adapter / SID_FILE).is_file() or not (adapter / META_FILE).is_file():
        raise ConfigError(f"--adapter {adapter}: not an SFT checkpoint (needs {SID_FILE} and {META_FILE}); pass the "
                          "adapter folder printed by `rayrec sft`")
    ds = ensure_prepared(cfg.data)
    task = cfg.eval.task
    item_sids = read_index(adapter / SID_FILE).for_items(ds.table("items"))
    titles = P.titles_of(ds)
    prompts = P.eval_prompts(ds, split, item_sids, cfg.prompts, cfg.eval.max_rows, task=task)
    tokenizer = load_tokenizer(adapter)
    trie = answer_trie(tokenizer, task, item_sids, titles)  # checked here; each decoding worker builds its own
    if cfg.eval.num_beams > trie.num_items:
        raise ConfigError(f"eval.num_beams={cfg.eval.num_beams} exceeds the {trie.num_items} distinct answers of "
                          f"task {task}; lower it")
    budget = cfg.model.max_length - trie.max_len  # the longest answer and its EOS always fit
    if budget < 16:
        raise ConfigError(f"model.max_length={cfg.model.max_length} leaves {budget} prompt tokens once the longest "
                          f"answer of task {task} ({trie.max_len} tokens with EOS) is reserved; raise model.max_length")
    prompts, fit = P.fit_lengths(prompts, token_counter(tokenizer, eos=False), budget, item_sids, titles,
                                 with_answer=False, drop=False)
    records = prompts.to_dict("records")
    settings = {"num_beams": cfg.eval.num_beams, "batch_size": cfg.eval.batch_size, "max_prompt_tokens": budget,
                "task": task, "titles": titles}
    if local:
        rows = decode_shard(str(adapter), records, item_sids, settings)
    else:
        rows = _decode_ray(cfg, str(adapter), records, item_sids, settings)
    prefix = metric_prefix(split, task)
    metrics = metrics_from_results(rows, cfg.eval.ks, prefix)
    metrics.update(popularity_metrics(ds, prompts["target"].tolist(), cfg.eval.ks, prefix, trie.canonical))
    metrics[f"{prefix}/prompts_history_cut"] = float(fit.total_truncated)
    metrics[f"{prefix}/prompts_over_budget"] = float(fit.over_budget)
    out = Path(out) if out else adapter.parent / f"eval_{prefix}.json"
    out.write_text(json.dumps(rows, indent=1))
    out.with_name(out.stem + "_metrics.json").write_text(json.dumps(metrics, indent=2))
    _log_eval(cfg, adapter, metrics, out)
    return EvalOutcome(metrics, out, rows)


def _log_eval(cfg: GenRecJobConfig, adapter: Path, metrics: dict[str, float], results: Path) -> None:
    """Into the training run recorded in the checkpoint, else into a new run of the experiment."""
    from rayrec.secrets import redact_uri
    from rayrec.tracking.mlflow_tracking import Tracker, check_reachable, open_run, resolve_uri

    if not cfg.tracking.enabled:
        return
    meta = json.loads((adapter / META_FILE).read_text())
    uri = resolve_uri(cfg.tracking.uri)
    check_reachable(uri)
    if meta.get("mlflow_run_id") and meta.get("tracking_uri") in (uri, redact_uri(uri)):  # stored redacted
        tracker = Tracker(uri, meta["mlflow_run_id"])
    else:
        tracker = open_run(uri, cfg.tracking.experiment, f"{adapter}:eval", f"eval-{cfg.run.name}",
                           tags={"rayrec.adapter": str(adapter)})
    tracker.log_metrics(metrics, step=int(meta.get("global_step", 0)))
    tracker.log_file(results, "eval")
    if meta.get("mlflow_run_id") != tracker.run_id:
        tracker.finish("FINISHED")


def summary_rows(metrics: dict[str, float], split: str, ks: list[int]) -> list[tuple[str, str, str]]:
    """(metric, model, popularity) rows for the console table."""
    rows = []
    for name in (HR, NDCG):
        for k in ks:
            key = metric_key(split, name, k)
            pop = metrics.get(key.replace(f"{split}/", f"{split}_popularity/"))
            rows.append((f"{name}@{k}", f"{metrics[key]:.4f}", f"{pop:.4f}" if pop is not None else "-"))
    rows.append(("invalid outputs", f"{metrics[f'{split}/invalid']:.0f}", "-"))
    rows.append(("rows", f"{metrics[f'{split}/rows']:.0f}", "-"))
    if metrics.get(f"{split}/ambiguous_targets"):
        rows.append(("targets sharing their answer", f"{metrics[f'{split}/ambiguous_targets']:.0f}", "-"))
    if metrics.get(f"{split}/prompts_history_cut"):
        rows.append(("prompts with history cut", f"{metrics[f'{split}/prompts_history_cut']:.0f}", "-"))
    if metrics.get(f"{split}/prompts_over_budget"):
        rows.append(("prompts cut by tokens (1 item too long)", f"{metrics[f'{split}/prompts_over_budget']:.0f}", "-"))
    return rows


def show_cases(path: Path, *, correct: bool | None, limit: int) -> list[str]:
    """Lines describing result rows (hits when ``correct``, misses when False, all when None)."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read results JSON ({e})") from None
    picked = [r for r in rows if correct is None or (r.get("rank") is not None) == correct][:limit]
    lines = [f"{len(picked)} of {len(rows)} rows ({'hits' if correct else 'misses' if correct is False else 'all'})"]
    for r in picked:
        rank = r.get("rank")
        shown = rank if rank else f"> {len(r['predictions'])}"
        lines.append(f"\nuser {r.get('user_idx')}  target {r['target']}  rank {shown}")
        lines.append(f"  input: {r['input']}")
        top = [f"{i + 1}. {p}{' *' if p == r['target'] else ''}" for i, p in enumerate(r["predictions"][:10])]
        lines.append("  top:   " + "  ".join(top))
    return lines


def val_ranking_callback(records: list[dict], item_sids: dict[int, tuple[str, ...]], tokenizer, cfg, tracker,
                         on: str = "evaluate"):
    """A ``TrainerCallback`` adding val/hr@K and val/ndcg@K after each evaluation (``on="evaluate"``, SFT)
    or at each checkpoint (``on="save"``, GRPO: it must come before ``RayTrainReportCallback``).

    Every rank decodes an equal slice of ``records`` (the first ``train.val_rows`` valid
    prompts) with the trie built once here, and the metric sums are all-reduced, so the
    numbers are those of one pass over all rows. They are added to the last log entry,
    which ``RayTrainReportCallback`` reports with the epoch's checkpoint (``on_save``
    follows ``on_evaluate``), and rank 0 logs them to MLflow.
    """
    import torch.distributed as dist
    from transformers import TrainerCallback

    from rayrec.genrec.constrained import beam_rank, build_trie

    trie = build_trie(tokenizer, item_sids)
    canonical = trie.canonical
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    per_rank = -(-len(records) // world)
    mine = records[rank * per_rank : (rank + 1) * per_rank]
    mine += mine[-1:] * (per_rank - len(mine)) if mine else []  # equal work on every rank (ZeRO-3 generate)

    class ValRanking(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            if on == "evaluate":  # the checkpoint of this step is written next
                self.rank(args, state, model, append=False)

        def on_save(self, args, state, control, model=None, **kwargs):
            if on == "save":  # the checkpoint of this step is written: its state gets the scores too
                self.rank(args, state, model, append=True)
                if state.is_world_process_zero and Path(self.checkpoint(args, state)).is_dir():
                    state.save_to_json(str(Path(self.checkpoint(args, state)) / "trainer_state.json"))

        @staticmethod
        def checkpoint(args, state) -> str:
            return str(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        def keep_best(self, args, state, named: dict[str, float]) -> None:
            """Name the best checkpoint so far in the state: HF's rotation (``save_total_limit``) keeps it."""
            metric, mode = cfg.selection_metric
            value = named.get(metric)
            if value is None:
                return
            better = state.best_metric is None or (value > state.best_metric if mode == "max" else
                                                   value < state.best_metric)
            if better:
                state.best_metric, state.best_global_step = value, state.global_step
                state.best_model_checkpoint = self.checkpoint(args, state)

        def rank(self, args, state, model, append: bool) -> None:
            was_training = model.training
            model.eval()
            ranked = beam_rank(model, tokenizer, [r["prompt"] for r in mine], trie, num_beams=cfg.eval.num_beams,
                               batch_size=cfg.eval.batch_size)
            model.train(was_training)
            ranks = [rank_of(canonical.get(int(r["target"]), int(r["target"])), x.items) for r, x in zip(mine, ranked)]
            valid = len(records) - rank * per_rank  # padded copies do not count
            sums = MetricSums(cfg.eval.ks).update(torch.tensor(
                [float(k) if k else float("inf") for k in ranks[: max(0, valid)]], dtype=torch.float64))
            flat = sums.to_tensor()
            if world > 1:  # nccl needs the tensor on the GPU
                flat = flat.to(next(model.parameters()).device)
                dist.all_reduce(flat)
                flat = flat.cpu()
            means = MetricSums.from_tensor(flat, cfg.eval.ks).means("val")
            named = {k: v for k, v in means.items() if "/hr@" in k or "/ndcg@" in k}
            if append:  # a checkpoint's own entry: the local path picks the best checkpoint by its step
                state.log_history.append({"step": state.global_step, "epoch": state.epoch, **named})
            elif state.log_history:
                state.log_history[-1].update(named)
            self.keep_best(args, state, named)
            if state.is_world_process_zero:
                tracker.log_metrics(named, step=state.global_step)

    return ValRanking()
