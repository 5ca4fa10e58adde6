"""Training health: what its checks cost, and runs with NaN losses against clean ones.

1. Overhead: SASRec on the quickstart world in this process, health checks on vs off
   (``train.health.enabled``), training throughput (``train/seqs_per_s``, evaluation excluded),
   alternating on/off runs, median of the repeats.
2. NaN resilience: the loss is made NaN on every 50th training batch; SASRec (quickstart world)
   and the UR4Rec joint quickstart run with and without it, same seed. Reported: skipped steps,
   whether every weight is finite, and test NDCG@10 against the clean run.
3. The joint quickstart's final metrics (the clean UR4Rec run of seed 0); ``--before FILE``
   adds the same job's ``--json`` output from an older checkout for a before/after table.

    python bench/training_health.py                      # ~10 min on 2 cores
    python bench/training_health.py --seeds 0 --repeats 1  # a quick look
    python bench/training_health.py --overhead-only --repeats 5  # only the overhead, on a quiet machine
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from rayrec.config import load_job
from rayrec.data.dataset import ensure_prepared
from rayrec.models.joint import UR4Rec
from rayrec.models.sasrec import SASRec
from rayrec.tracking.mlflow_tracking import Tracker
from rayrec.train.checkpoint import load_state
from rayrec.train.inputs import data_info
from rayrec.train.joint import fit_joint, prepare_features
from rayrec.train.local import run_local, sequential_loop

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
EVERY = 50


def job(name: str, work: Path, *overrides: str):
    return load_job(ROOT / "jobs" / name, [f"run.storage_path={work}/runs", "tracking.enabled=false", *overrides])


def run(cfg, run_dir: Path | None = None) -> tuple[dict, list[dict], dict]:
    ds = ensure_prepared(cfg.data)
    loop = fit_joint if cfg.model.name == "ur4rec" else sequential_loop
    if cfg.model.name == "ur4rec":
        prepare_features(cfg, ds.path, use_ray=False)
    final, rep = run_local(cfg, ds, data_info(ds, cfg), run_dir=run_dir, tracker=Tracker.null(), loop=loop)
    state = load_state(rep.last_checkpoint) if rep.last_checkpoint else {}
    return final, rep.metrics[:-1], state


@contextmanager
def nan_every(n: int):
    """The training loss of every n-th batch is NaN (SASRec's ``loss``, UR4Rec's ``outputs``)."""
    calls = {"n": 0}
    sas, joint = SASRec.loss, UR4Rec.outputs

    def loss(self, batch):
        calls["n"] += 1
        out = sas(self, batch)
        return out * float("nan") if calls["n"] % n == 0 else out

    def outputs(self, batch, losses, needs=frozenset()):
        calls["n"] += 1
        out = joint(self, batch, losses, needs)
        if calls["n"] % n == 0:
            out.losses = {k: v * float("nan") for k, v in out.losses.items()}
        return out

    SASRec.loss, UR4Rec.outputs = loss, outputs
    try:
        yield calls
    finally:
        SASRec.loss, UR4Rec.outputs = sas, joint


def overhead(work: Path, repeats: int) -> dict:
    speeds = {True: [], False: []}
    for _ in range(repeats):
        for on in (True, False):
            cfg = job("quickstart.yaml", work, "train.epochs=2", f"train.health.enabled={str(on).lower()}",
                      f"data.path={work}/quickstart")
            _, epochs, _ = run(cfg)
            speeds[on].append(statistics.median(m["train/seqs_per_s"] for m in epochs))
    on, off = statistics.median(speeds[True]), statistics.median(speeds[False])
    return {"seqs_per_s_health_on": on, "seqs_per_s_health_off": off, "ratio_on_over_off": on / off,
            "repeats": repeats}


def resilience(work: Path, name: str, seeds: list[int], *overrides: str) -> list[dict]:
    rows = []
    for seed in seeds:
        cfg = job(name, work, f"run.seed={seed}", *overrides)
        t0 = time.perf_counter()
        clean, _, _ = run(cfg, work / f"{name}_clean_s{seed}")
        t_clean = time.perf_counter() - t0
        with nan_every(EVERY) as calls:
            nan, epochs, state = run(cfg, work / f"{name}_nan_s{seed}")
        finite = all(torch.isfinite(v).all().item() for v in state["model"].values() if v.is_floating_point())
        skipped = int(sum(m.get("health/skipped_steps", 0) for m in epochs))
        rows.append({"job": name, "seed": seed, "nan_batches": calls["n"] // EVERY, "skipped_steps": skipped,
                     "finite_weights": finite, "ndcg10_clean": clean["test/ndcg@10"], "ndcg10_nan": nan["test/ndcg@10"],
                     "rel_diff": nan["test/ndcg@10"] / clean["test/ndcg@10"] - 1, "clean_final": clean,
                     "seconds_clean": t_clean})
    return rows


def _print_cost(cost: dict) -> None:
    print(f"\nhealth checks: {cost['seqs_per_s_health_on']:.0f} seqs/s on vs {cost['seqs_per_s_health_off']:.0f} off "
          f"(ratio {cost['ratio_on_over_off']:.3f}, median of {cost['repeats']})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--joint-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--before", type=Path, help="the joint quickstart's --json output from an older checkout")
    p.add_argument("--work", type=Path)
    p.add_argument("--overhead-only", action="store_true",
                   help="re-measure only the overhead (on a quiet machine) and update it in the JSON")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="health_bench_"))
    print(f"work folder: {work}")
    cost = overhead(work, args.repeats)
    _print_cost(cost)
    path = RESULTS / "training_health.json"
    if args.overhead_only:
        out = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**out, "overhead": cost}, indent=2, default=float))
        print(f"\nupdated {path}")
        return
    sas = resilience(work, "quickstart.yaml", args.seeds, "train.epochs=6", f"data.path={work}/quickstart")
    joint = resilience(work, "ur4rec_quickstart.yaml", args.joint_seeds, f"data.path={work}/ur4rec_quickstart",
                       f"model.features.cache_dir={ROOT}/.cache/rayrec/features")

    print(f"\nloss NaN on every {EVERY}th batch vs clean, same seed (test NDCG@10)")
    print(f"{'job':<24}{'seed':>5}{'NaN batches':>12}{'skipped':>9}{'finite':>8}{'clean':>9}{'NaN run':>9}{'diff':>8}")
    for r in sas + joint:
        print(f"{r['job']:<24}{r['seed']:>5}{r['nan_batches']:>12}{r['skipped_steps']:>9}{r['finite_weights']!s:>8}"
              f"{r['ndcg10_clean']:>9.4f}{r['ndcg10_nan']:>9.4f}{r['rel_diff'] * 100:>7.2f}%")
    quick = joint[0]["clean_final"] if joint and joint[0]["seed"] == 0 else None
    before = json.loads(args.before.read_text()) if args.before else None
    if quick is not None:
        print("\njoint quickstart (seed 0, --local)" + (" before -> after" if before else ""))
        for k in ("best/val/ndcg@10", "test/ndcg@10", "test/hr@10", "test/ndcg@20", "test/hr@20", "test/mrr"):
            print(f"  {k:<18}" + (f"{before[k]:.4f} -> " if before else "") + f"{quick[k]:.4f}")
    out = {"machine": platform.platform(), "cpus": torch.get_num_threads(), "overhead": cost,
           "nan_every": EVERY, "resilience": [{k: v for k, v in r.items() if k != "clean_final"} for r in sas + joint],
           "joint_quickstart": quick, "joint_quickstart_before": before,
           "max_abs_rel_diff": max((abs(r["rel_diff"]) for r in sas + joint), default=math.nan)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=float))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
