"""The seed models against SASRec on real data: MiniOneRec's Amazon Industrial_and_Scientific and
Office_Products (real interactions, real item titles and descriptions).

Usage:  python bench/real_data.py [--datasets industrial office] [--models popularity sasrec joint ...]
                                  [--seeds 0 1 2] [--out bench/results/real_data.json]
        python bench/real_data.py --models joint --skip-models --ablations [NAME ...] [--ablation-seeds 0]
        python bench/real_data.py --merge part1.json part2.json     # runs made in parallel -> --out

Build the data first: ``python bench/real_data_prepare.py --source PATH/TO/MiniOneRec`` (and, for the
joint model, ``rayrec prefs generate jobs/ur4rec_<dataset>.yaml``). Each model is its job file
``jobs/<job>_<dataset>.yaml`` (popularity: the SASRec job's data with the popularity model), trained
in this process with the job's own settings and seed 0..2. Test metrics (HR@10, NDCG@10, MRR; full
ranking, seen items masked) come from the best validation epoch's weights; 95 % intervals from a
bootstrap over the test rows (the same resampled rows for every seed, so a model's mean over seeds
gets an interval too). Prints a table and writes ``bench/results/real_data.json``; every run is in
MLflow (experiment ``real_<dataset>``), so ``rayrec compare real_industrial`` reads them back.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from rayrec import recipes  # noqa: E402
from rayrec.config.schema import JobConfig  # noqa: E402
from rayrec.data.atomic import atomic_write  # noqa: E402
from rayrec.data.dataset import open_prepared  # noqa: E402
from rayrec.train.checkpoint import load_state  # noqa: E402
from rayrec.train.evaluation import evaluate  # noqa: E402
from rayrec.train.inputs import data_info  # noqa: E402
from rayrec.train.local import PlainBatches  # noqa: E402
from rayrec.train.specs import build, spec_of  # noqa: E402

DATASETS = {"industrial": "Industrial_and_Scientific", "office": "Office_Products"}
#: model name in the results -> job file prefix (jobs/<prefix>_<dataset>.yaml)
JOBS = {"popularity": "sasrec", "sasrec": "sasrec", "joint": "ur4rec", "multi_interest": "multi_interest"}
#: ablation name -> (model, dotted overrides of its job)
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "joint - user_pref": ("joint", ["model.retriever.experts=[item_text]"]),
    "joint - item_text": ("joint", ["model.retriever.experts=[user_pref]"]),
    # the joint stage trains both modules every step (no switching); its distillation as tuned
    "joint - alternation": ("joint", ["model.stages.joint_finetune.strategies=[{name: distillation, weight: 0.0096, "
                                      "temperature: 2.0}]"]),
    "joint - content prior": ("joint", ["model.retriever.content_prior=0"]),
    "multi_interest - vae": ("multi_interest", ["model.vae.enabled=false"]),
    "multi_interest - causal": ("multi_interest", ["model.causal.enabled=false"]),
    "multi_interest K=1": ("multi_interest", ["model.num_interests=1"]),
    # e2e (the tuned job) vs seed 003's phases: components (causal frozen), joint, end to end at 0.2x LR
    "multi_interest phased": ("multi_interest", [
        "train.phases=[{name: components, until_epoch: 10, loss_weights: {recon: 1.0, causal: 0.0, diversity: 0.1, "
        "orthogonality: 0.1}, freeze: [causal]}, {name: joint, until_epoch: 30, loss_weights: {recon: 0.2, causal: 0.1, "
        "diversity: 0.05, orthogonality: 0.05}}, {name: end_to_end, loss_weights: {recon: 0.01, causal: 0.001, "
        "diversity: 0.001, orthogonality: 0.001}, lr_mult: 0.2}]"]),
}
METRICS = ("hr@10", "ndcg@10", "mrr")
BOOTSTRAP = 1000


def job_of(model: str, dataset: str, seed: int, overrides: list[str], work: Path) -> JobConfig:
    """The model's job on ``dataset`` for ``seed``, its runs and MLflow records under ``work``."""
    from rayrec.config.loader import apply_overrides

    raw = yaml.safe_load((ROOT / "jobs" / f"{JOBS[model]}_{dataset}.yaml").read_text())
    if model == "popularity":
        raw["model"] = {"name": "popularity"}
    tag = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]  # the same run name in every process
    name = f"{model}_{dataset}_s{seed}" + (f"_{tag}" if overrides else "")
    apply_overrides(raw, [*overrides, f"run.seed={seed}", f"run.name={name}", f"run.storage_path={work}/runs",
                          f"data.path={ROOT / 'data' / 'real' / DATASETS[dataset]}", "run.checkpoint.num_to_keep=1"],
                    JobConfig)
    return JobConfig.model_validate(raw)


def test_ranks(cfg: JobConfig, checkpoint: str | None) -> np.ndarray:
    """1-based rank of each test row's target under the checkpoint's best weights (seen items masked)."""
    ds = open_prepared(cfg.data.path)
    info = data_info(ds, cfg)
    model = build(cfg, info)
    if spec_of(cfg.model.name).parameter_free:
        model.fit(ds.table("train")["seq"])  # fitted from counts, as the recipe does (no checkpoint)
    else:
        state = load_state(checkpoint)
        model.load_state_dict(state["best_model"] or state["model"])
    ranks: list[torch.Tensor] = []
    evaluate(model, PlainBatches(cfg, ds, info).test(), cfg, info.num_items, torch.device("cpu"), prefix="test/",
             on_ranks=lambda batch, r: ranks.append(r.cpu()))
    return torch.cat(ranks).numpy().astype(np.float64)


def row_metrics(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row HR@10, NDCG@10 and reciprocal rank."""
    hit = ranks <= 10
    return {"hr@10": hit.astype(float), "ndcg@10": np.where(hit, 1 / np.log2(ranks + 1), 0.0), "mrr": 1 / ranks}


def with_intervals(per_seed: list[dict[str, np.ndarray]], rows: np.ndarray) -> dict[str, Any]:
    """Mean of each metric over seeds, and 95 % bootstrap intervals (rows resampled alike for all seeds)."""
    out: dict[str, Any] = {}
    for m in METRICS:
        stacked = np.stack([s[m] for s in per_seed])  # [seeds, rows]
        boot = stacked[:, rows].mean(axis=(0, 2))  # [resamples]
        out[m] = float(stacked.mean())
        out[f"{m}_ci"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    return out


def run_model(model: str, dataset: str, seeds: list[int], overrides: list[str], work: Path,
              rows: np.ndarray) -> dict[str, Any]:
    per_seed, seeds_out = [], {}
    for seed in seeds:
        cfg = job_of(model, dataset, seed, overrides, work)
        t0 = time.perf_counter()
        out = recipes.run(cfg, local=True)
        wall = time.perf_counter() - t0
        metrics = row_metrics(test_ranks(cfg, out.checkpoint))
        per_seed.append(metrics)
        seeds_out[str(seed)] = {**with_intervals([metrics], rows), "best_epoch": out.metrics.get("best_epoch"),
                                "wall_s": round(wall, 1), "mlflow_run_id": out.mlflow_run_id}
        print(f"  {dataset} {model}{' ' + ' '.join(overrides) if overrides else ''} seed {seed}: "
              f"ndcg@10 {seeds_out[str(seed)]['ndcg@10']:.4f} ({wall:.0f} s)", flush=True)
    return {"seeds": seeds_out, "mean": with_intervals(per_seed, rows), "overrides": overrides}


def print_table(results: dict[str, Any]) -> None:
    for dataset, models in results["datasets"].items():
        print(f"\n{DATASETS[dataset]} (test, full ranking, seen masked; mean over the seeds, 95 % CI)")
        print(f"{'model':<26}{'seeds':>6}" + "".join(f"{m:>26}" for m in METRICS))
        for name, r in {**models, **results["ablations"].get(dataset, {})}.items():
            mean = r["mean"]
            cells = "".join(f"{mean[m]:>9.4f} [{mean[m + '_ci'][0]:.4f}, {mean[m + '_ci'][1]:.4f}]" for m in METRICS)
            print(f"{name:<26}{len(r['seeds']):>6}{cells}")


def merge(out: Path, parts: list[Path]) -> int:
    """Add the models and ablations of ``parts`` to ``out`` (a later file wins for the same entry)."""
    results = json.loads(out.read_text()) if out.is_file() else {
        "benchmark": "real_data", "seeds": [0, 1, 2], "bootstrap": BOOTSTRAP, "datasets": {}, "ablations": {}}
    for part in parts:
        other = json.loads(part.read_text())
        if other.get("bootstrap") != results["bootstrap"]:
            sys.exit(f"{part}: bootstrap {other.get('bootstrap')} != {results['bootstrap']} of {out}")
        for key in ("datasets", "ablations"):
            for dataset, entries in other.get(key, {}).items():
                results[key].setdefault(dataset, {}).update(entries)
    atomic_write(out, json.dumps(results, indent=2))
    print_table(results)
    print(f"\nwrote {out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--models", nargs="+", default=list(JOBS), choices=list(JOBS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ablations", nargs="*", metavar="NAME", default=None,
                   help="also these ablations (none named: all of the chosen models'), e.g. 'joint - user_pref'")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=None, help="seeds of the ablations (default: --seeds)")
    p.add_argument("--skip-models", action="store_true", help="run the ablations only (keep the models' results)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "real_data", help="run folders and MLflow store")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "real_data.json")
    p.add_argument("--fresh", action="store_true", help="start a new results file (default: add to --out)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="add these results files (runs made in parallel, each with its own --out) to --out and exit")
    args = p.parse_args()
    if args.merge:
        return merge(args.out, args.merge)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict[str, Any] = {"benchmark": "real_data", "seeds": args.seeds, "bootstrap": BOOTSTRAP,
                               "datasets": {}, "ablations": {}}
    if args.out.is_file() and not args.fresh:  # add to the models measured before (same seeds only)
        before = json.loads(args.out.read_text())
        if before.get("seeds") == args.seeds:
            results.update(datasets=before["datasets"], ablations=before.get("ablations", {}))
        elif args.skip_models:
            sys.exit(f"{args.out} holds seeds {before.get('seeds')}, not {args.seeds}: pass those with --skip-models")
    chosen = {} if args.ablations is None else {
        name: ABLATIONS[name] for name in (args.ablations or ABLATIONS) if ABLATIONS[name][0] in args.models}
    unknown = set(args.ablations or ()) - set(ABLATIONS)
    if unknown:
        sys.exit(f"unknown ablations {sorted(unknown)}; known: {sorted(ABLATIONS)}")
    for dataset in args.datasets:
        n = len(open_prepared(ROOT / "data" / "real" / DATASETS[dataset]).table("test"))
        rows = np.random.default_rng(0).integers(0, n, size=(BOOTSTRAP, n))  # the same resamples for every model
        for m in () if args.skip_models else args.models:
            results["datasets"].setdefault(dataset, {})[m] = run_model(m, dataset, args.seeds, [], args.work, rows)
            atomic_write(args.out, json.dumps(results, indent=2))  # after each model: a long run keeps what it has
        for name, (model, overrides) in chosen.items():
            results["ablations"].setdefault(dataset, {})[name] = run_model(
                model, dataset, args.ablation_seeds or args.seeds, overrides, args.work, rows)
            atomic_write(args.out, json.dumps(results, indent=2))
    print_table(results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
