"""Training on the last window vs on sliding windows of each history, at the same wall-clock budget.

Usage:  python bench/windows.py [--worlds synthetic,ml1m --epochs-last 20,8]

Worlds: the synthetic source's defaults (943 users x 1,682 items, mean length 60) and a
MovieLens-1M-shaped synthetic world (6,040 x 3,706, mean length 165). SASRec (hidden 64, 2 blocks,
max_len 50) runs in the plain loop with all torch threads:

- ``last``: one row per user, ``--epochs-last`` epochs;
- ``sliding``: every window (stride max_len), with as many epochs as fit the same number of
  training rows (``epochs_last x users / windows``, at least 1), so both train on about the same
  number of sequences, the unit of their cost; their wall times are printed beside the metrics.

Both keep the best validation epoch (NDCG@10, patience 100) and report its test metrics. Prints a
table and writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayrec import recipes  # noqa: E402
from rayrec.config.schema import FilterConfig, JobConfig  # noqa: E402
from rayrec.data.atomic import atomic_write  # noqa: E402
from rayrec.data.dataset import open_prepared, source_reader  # noqa: E402
from rayrec.data.prepare import prepare  # noqa: E402
from rayrec.data.rows import train_lengths  # noqa: E402
from rayrec.train.inputs import data_info  # noqa: E402

WORLDS = {"synthetic": (943, 1682, 60), "ml1m": (6040, 3706, 165)}  # users, items, mean length


def synth_of(world: str) -> dict:
    users, items, mean_len = WORLDS[world]
    return {"users": users, "items": items, "topics": 12 if world == "synthetic" else 20, "mean_len": mean_len,
            "seed": 0, "images": False}


def make_data(root: Path, world: str) -> Path:
    out = root / world
    synth = synth_of(world)
    prepare(source_reader("synthetic", None, on_bad_line="error", synth=synth), out, source="synthetic",
            params={"synth": synth}, filters=FilterConfig(), split="leave_one_out")
    return out


def job(data: Path, work: Path, windows: str, epochs: int) -> JobConfig:
    return JobConfig.model_validate({
        "data": {"path": str(data), "prepare_if_missing": False, "synth": synth_of(data.name)},
        "model": {"name": "sasrec", "hidden": 64, "num_blocks": 2, "dropout": 0.2, "max_len": 50},
        "train": {"epochs": epochs, "batch_size": 128, "windows": windows, "optim": {"lr": 0.002, "warmup_steps": 20},
                  "early_stopping": {"patience": 100}, "eval": {"ks": [10]}},
        "tracking": {"enabled": False},
        "run": {"name": f"{data.name}_{windows}", "storage_path": str(work / "runs"), "seed": 0,
                "checkpoint": {"num_to_keep": 1}},
    })


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="synthetic,ml1m")
    p.add_argument("--epochs-last", default="20,8", help="epochs of the `last` run, per world")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "windows.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rayrec-bench-windows-"))
    rows = []
    for world, epochs_last in zip(args.worlds.split(","), (int(e) for e in args.epochs_last.split(","))):
        data = make_data(work, world)
        ds = open_prepared(data)
        n_last = data_info(ds, job(data, work, "last", 1)).train_rows
        n_sliding = data_info(ds, job(data, work, "sliding", 1)).train_rows
        positions = np.maximum(train_lengths(str(data)) - 1, 0)
        events = int(positions.sum())  # next-item events of the training split
        for windows, rows_per_epoch in (("last", n_last), ("sliding", n_sliding)):
            epochs = epochs_last if windows == "last" else max(1, round(epochs_last * n_last / n_sliding))
            targets = int(np.minimum(positions, 50).sum()) if windows == "last" else events
            start = time.perf_counter()
            out = recipes.run(job(data, work, windows, epochs), local=True, console=False)
            wall = time.perf_counter() - start
            m = out.metrics
            rows.append({"world": world, "windows": windows, "rows_per_epoch": rows_per_epoch, "epochs": epochs,
                         "rows_trained": rows_per_epoch * epochs, "train_events": events,
                         "events_trained_per_epoch": targets, "wall_s": wall,
                         "best_epoch": m.get("best_epoch"), "test_ndcg@10": m.get("test/ndcg@10"),
                         "test_hr@10": m.get("test/hr@10"), "val_ndcg@10": m.get("best/val/ndcg@10")})
            print(f"[{world}] {windows}: {rows_per_epoch:,} rows x {epochs} epochs, {wall:.0f} s, "
                  f"test NDCG@10 {m.get('test/ndcg@10'):.4f}", flush=True)
    print(f"\nlast vs sliding windows at about the same training budget (SASRec h64, max_len 50, {torch.get_num_threads()} threads)")
    print(f"{'world':<10} {'windows':<8} {'rows/epoch':>10} {'epochs':>6} {'events/ep':>9} {'wall s':>7} {'best ep':>7} "
          f"{'val NDCG@10':>11} {'test NDCG@10':>12} {'test HR@10':>10}")
    for r in rows:
        print(f"{r['world']:<10} {r['windows']:<8} {r['rows_per_epoch']:>10,} {r['epochs']:>6} {r['events_trained_per_epoch']:>9,} {r['wall_s']:>7.0f} "
              f"{r['best_epoch']:>7} {r['val_ndcg@10']:>11.4f} {r['test_ndcg@10']:>12.4f} {r['test_hr@10']:>10.4f}")
    result = {"benchmark": "windows", "args": {k: str(v) for k, v in vars(args).items()},
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "python": platform.python_version(), "torch": torch.__version__}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
