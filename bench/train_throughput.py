"""SASRec training speed: plain loop vs Ray Train, end to end and per epoch, at two data sizes.

Usage:  python bench/train_throughput.py [--sizes 100k,1m --epochs 8,2 --max-len 50]

Data: the synthetic source at MovieLens-100K size (943 users, 1,682 items, ~100k events) and
MovieLens-1M size (6,040 users, 3,706 items, ~1M events). The same job runs in five setups:
the plain loop at 1 and at all torch threads, Ray Train 1 worker with the in-memory data path
(``data.ingest: memory``, the default ``auto`` picks it here) and with Ray Data streaming
(``data.ingest: stream``), and Ray Train 2 workers x 0.5 CPU (memory). A Ray worker with 1 CPU
runs 1 torch thread, so the data-path comparison is Ray 1 worker vs plain at 1 thread.

Figures per setup: end-to-end wall time of the job (every epoch with its validation, the test,
MLflow; Ray is started once before, and its start is reported on its own line); the median epoch
time (between consecutive epoch reports in MLflow, validation included); the per-epoch overhead
(median epoch minus the plain 1-thread median); training sequences per second of the last epoch.
Rows: every sliding window of each history (``windows: sliding``, a job's default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayrec import recipes  # noqa: E402
from rayrec.config.schema import FilterConfig, JobConfig  # noqa: E402
from rayrec.data.atomic import atomic_write  # noqa: E402
from rayrec.data.dataset import source_reader  # noqa: E402
from rayrec.data.prepare import prepare  # noqa: E402
from rayrec.tracking.mlflow_tracking import Tracker  # noqa: E402

SIZES = {"100k": (943, 1682, 106), "1m": (6040, 3706, 165)}  # users, items, mean sequence length


def synth_of(size: str) -> dict:
    users, items, mean_len = SIZES[size]
    return {"users": users, "items": items, "topics": 20, "mean_len": mean_len, "seed": 0, "images": False}


def make_data(root: Path, size: str) -> Path:
    out = root / f"synth_{size}"
    if not out.exists():
        synth = synth_of(size)
        prepare(source_reader("synthetic", None, on_bad_line="error", synth=synth), out, source="synthetic",
                params={"synth": synth}, filters=FilterConfig(), split="leave_one_out")
    return out


def job(data: Path, work: Path, args, name: str, epochs: int, workers: int, cpu: float, ingest: str) -> JobConfig:
    return JobConfig.model_validate({
        "data": {"path": str(data), "prepare_if_missing": False, "ingest": ingest,
                 "synth": synth_of(data.name.removeprefix("synth_"))},
        "model": {"name": "sasrec", "hidden": 64, "num_blocks": 2, "dropout": 0.2, "max_len": args.max_len},
        "train": {"epochs": epochs, "batch_size": args.batch_size, "shuffle_buffer": 1024, "windows": args.windows,
                  "early_stopping": {"patience": 100}, "eval": {"ks": [10], "batch_size": 1024}},
        "scaling": {"num_workers": workers, "resources_per_worker": {"CPU": cpu}},
        "tracking": {"uri": f"sqlite:///{work}/mlflow.db", "experiment": "bench"},
        "run": {"name": name, "storage_path": str(work / "runs"), "seed": 0},
    })


def measure(cfg: JobConfig, *, local: bool) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    start = time.perf_counter()
    out = recipes.run(cfg, local=local, console=False)
    wall = time.perf_counter() - start
    client = MlflowClient(cfg.tracking.uri)
    loss = sorted(client.get_metric_history(out.mlflow_run_id, "train/loss"), key=lambda m: m.step)
    stamps = [m.timestamp / 1000 for m in loss]
    epochs = [b - a for a, b in zip(stamps, stamps[1:])]
    sps = Tracker(cfg.tracking.uri, out.mlflow_run_id).history("train/seqs_per_s")[-1][1]
    return {"wall_s": wall, "epoch_s": statistics.median(epochs) if epochs else float("nan"), "seqs_per_s": sps,
            "test_ndcg@10": out.metrics.get("test/ndcg@10", float("nan"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100k,1m")
    p.add_argument("--epochs", default="8,2", help="epochs per size")
    p.add_argument("--windows", default="sliding", help="train.windows (sliding: the default of a job)")
    p.add_argument("--stream-sizes", default="100k", help="sizes that also run Ray with data.ingest=stream")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    work = Path(tempfile.mkdtemp(prefix="rayrec-bench-"))
    threads = torch.get_num_threads()
    sizes, epochs = args.sizes.split(","), [int(e) for e in args.epochs.split(",")]
    import ray

    rows = []
    for size, n_epochs in zip(sizes, epochs):
        data = make_data(work, size)
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            m = measure(job(data, work, args, f"{size}_plain_t{t}", n_epochs, 1, 1.0, "memory"), local=True)
            rows.append({"size": size, "setup": f"plain loop, {t} thread(s)", **m})
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        ray_start = time.perf_counter() - t0
        setups = [(1, 1.0, "memory"), (1, 1.0, "stream"), (2, 0.5, "memory")]
        for workers, cpu, ingest in [s for s in setups if s[2] == "memory" or size in args.stream_sizes.split(",")]:
            m = measure(job(data, work, args, f"{size}_ray_w{workers}_{ingest}", n_epochs, workers, cpu, ingest), local=False)
            rows.append({"size": size, "setup": f"Ray Train {workers} x {cpu:g} CPU, {ingest}", **m, "ray_start_s": ray_start})
        ray.shutdown()
        base = next(r for r in rows if r["size"] == size and r["setup"] == "plain loop, 1 thread(s)")
        for r in rows:
            if r["size"] == size:
                r["plain_1t_over_this_wall"] = base["wall_s"] / r["wall_s"]
                r["epoch_overhead_s"] = r["epoch_s"] - base["epoch_s"]
                r["throughput_vs_plain_1t"] = r["seqs_per_s"] / base["seqs_per_s"]

    print(f"\nSASRec end to end (hidden 64, 2 blocks, max_len {args.max_len}, batch {args.batch_size}, windows {args.windows})")
    print(f"{'size':>5} {'setup':<30} {'wall s':>7} {'plain1t/this':>12} {'epoch s':>8} {'overhead s':>10} "
          f"{'seqs/s':>7} {'test ndcg@10':>12}")
    for r in rows:
        print(f"{r['size']:>5} {r['setup']:<30} {r['wall_s']:>7.1f} {r['plain_1t_over_this_wall']:>12.2f} "
              f"{r['epoch_s']:>8.2f} {r['epoch_overhead_s']:>10.2f} {r['seqs_per_s']:>7.0f} {r['test_ndcg@10']:>12.4f}")
    starts = sorted({round(r["ray_start_s"], 1) for r in rows if "ray_start_s" in r})
    print(f"(Ray's own start, once per process before the jobs: {starts} s)")
    result = {"benchmark": "train_throughput", "args": {k: str(v) for k, v in vars(args).items()},
              "machine": {"cpus": os.cpu_count(), "torch_threads": threads, "python": platform.python_version(),
                          "torch": torch.__version__}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
