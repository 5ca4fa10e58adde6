"""SASRec training throughput: plain loop vs Ray Train (1 and 2 workers) streaming from Ray Data.

Usage:  python bench/train_throughput.py [--users 6040 --items 3706 --epochs 3 --max-len 50]

Data: the synthetic source at MovieLens-1M size (6,040 users, 3,706 items, ~1M events).
Throughput = training sequences per second of the last epoch (steady state; the first
epoch pays for warm-up), read back from the run's MLflow history. The plain loop is
measured with 1 and with all torch threads; a Ray worker with 1 CPU runs 1 thread
(Ray sets OMP_NUM_THREADS from the worker's CPUs), so the data-path comparison is
Ray 1 worker vs plain at 1 thread.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayrec import recipes  # noqa: E402
from rayrec.config.schema import FilterConfig, JobConfig  # noqa: E402
from rayrec.data.dataset import source_reader  # noqa: E402
from rayrec.data.prepare import prepare  # noqa: E402
from rayrec.tracking.mlflow_tracking import Tracker  # noqa: E402


def make_data(root: Path, users: int, items: int) -> Path:
    out = root / f"synth_{users}x{items}"
    if not out.exists():
        synth = {"users": users, "items": items, "topics": 20, "mean_len": 165, "seed": 0, "images": False}
        prepare(source_reader("synthetic", None, on_bad_line="error", synth=synth), out, source="synthetic",
                params={"synth": synth}, filters=FilterConfig(), split="leave_one_out")
    return out


def job(data: Path, work: Path, args, name: str, workers: int, cpu: float) -> JobConfig:
    return JobConfig.model_validate({
        "data": {"path": str(data), "prepare_if_missing": False},
        "model": {"name": "sasrec", "hidden": 64, "num_blocks": 2, "dropout": 0.2, "max_len": args.max_len},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "shuffle_buffer": 1024,
                  "early_stopping": {"patience": 100}, "eval": {"ks": [10], "batch_size": 512}},
        "scaling": {"num_workers": workers, "resources_per_worker": {"CPU": cpu}},
        "tracking": {"uri": f"sqlite:///{work}/mlflow.db", "experiment": "bench"},
        "run": {"name": name, "storage_path": str(work / "runs"), "seed": 0},
    })


def steady_throughput(cfg: JobConfig, *, local: bool) -> tuple[float, float]:
    start = time.perf_counter()
    out = recipes.run(cfg, local=local)
    wall = time.perf_counter() - start
    hist = Tracker(cfg.tracking.uri.replace("sqlite:///", "sqlite:///"), out.mlflow_run_id).history("train/seqs_per_s")
    return hist[-1][1], wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=6040)
    p.add_argument("--items", type=int, default=3706)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    work = Path(tempfile.mkdtemp(prefix="rayrec-bench-"))
    data = make_data(work, args.users, args.items)
    threads = torch.get_num_threads()
    rows = []

    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        sps, wall = steady_throughput(job(data, work, args, f"plain_t{t}", 1, 1.0), local=True)
        rows.append({"setup": f"plain loop, in-memory, {t} thread(s)", "seqs_per_s": sps, "wall_s": wall})
    torch.set_num_threads(threads)

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    for workers, cpu in ((1, 1.0), (2, 0.5)):
        sps, wall = steady_throughput(job(data, work, args, f"ray_w{workers}", workers, cpu), local=False)
        rows.append({"setup": f"Ray Train {workers} worker(s) x {cpu:g} CPU, Ray Data", "seqs_per_s": sps, "wall_s": wall})
    ray.shutdown()

    base = rows[0]["seqs_per_s"]
    for r in rows:
        r["ratio_vs_plain_1_thread"] = r["seqs_per_s"] / base
    print(f"\nSASRec training throughput ({args.users} users x {args.items} items, max_len {args.max_len}, "
          f"batch {args.batch_size}, epoch {args.epochs} of {args.epochs})")
    print(f"{'setup':<48} {'seqs/s':>9} {'ratio':>7} {'wall s':>8}")
    for r in rows:
        print(f"{r['setup']:<48} {r['seqs_per_s']:>9.1f} {r['ratio_vs_plain_1_thread']:>7.2f} {r['wall_s']:>8.1f}")
    result = {"benchmark": "train_throughput", "args": {k: str(v) for k, v in vars(args).items()},
              "machine": {"cpus": os.cpu_count(), "torch_threads": threads, "python": platform.python_version(),
                          "torch": torch.__version__}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
