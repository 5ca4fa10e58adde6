"""How time and memory grow with data size: prepare + one epoch, plain loop vs Ray Train 1 and 2 workers.

Usage:  python bench/scale.py [--sizes 100k,1m,20m] [--setups plain,ray1,ray2]

Data: the synthetic source at MovieLens-100K (943 users x 1,682 items, ~100k events), -1M
(6,040 x 3,706, ~1M) and -20M size (138,493 x 26,744, ~20M). Each size is prepared once (timed,
in its own process), then each setup runs one epoch with validation and test in a fresh process:
``plain`` (the loop in that process, 1 torch thread), ``ray1`` (Ray Train, 1 worker x 1 CPU) and
``ray2`` (2 workers x 0.5 CPU), both with the in-memory path ``data.ingest: auto`` picks here.

Memory: peak RSS of the driver process (``getrusage``) and, sampled every 0.2 s, of each Ray Train
worker, with its USS (memory no other process shares: the row tables a worker reads from the
object store are shared pages, counted in RSS but not in USS). Model: SASRec hidden 32, 1 block,
max_len 50, batch 256, sampled BCE loss (1 negative: a full softmax over 27k items would make the
model, not the data, the whole story), ``windows: last`` (one row per user: the 20M epoch then takes
minutes, not an hour); the size of the sliding-window tables is printed beside it. Evaluation ranks
every item. ``--work DIR`` reuses the datasets already prepared there (and their prepare figures).

Prints a table and writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # users, items, mean sequence length (events ~ users x mean_len)
    "100k": (943, 1682, 106),
    "1m": (6040, 3706, 165),
    "20m": (138_493, 26_744, 144),
}
SETUPS = {"plain": (0, 1.0), "ray1": (1, 1.0), "ray2": (2, 0.5)}  # workers (0 = in process), CPU each


def synth_of(size: str) -> dict:
    users, items, mean_len = SIZES[size]
    return {"users": users, "items": items, "topics": 20, "mean_len": mean_len, "seed": 0, "images": False}


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- children


def child_prepare(size: str, out: Path) -> dict:
    from rayrec.config.schema import FilterConfig
    from rayrec.data.dataset import source_reader
    from rayrec.data.prepare import prepare

    synth = synth_of(size)
    start = time.perf_counter()
    prepare(source_reader("synthetic", None, on_bad_line="error", synth=synth), out, source="synthetic",
            params={"synth": synth}, filters=FilterConfig(), split="leave_one_out")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": time.perf_counter() - start, "driver_peak_rss_mib": maxrss_mib(),
            "events": manifest["counts"]["interactions"], "users": manifest["counts"]["users"]}


def job(data: Path, work: Path, setup: str, size: str):
    from rayrec.config.schema import JobConfig

    workers, cpu = SETUPS[setup]
    return JobConfig.model_validate({
        "data": {"path": str(data), "prepare_if_missing": False, "synth": synth_of(size)},
        "model": {"name": "sasrec", "hidden": 32, "num_blocks": 1, "num_heads": 1, "dropout": 0.2, "max_len": 50,
                  "loss": {"name": "bce", "num_negatives": 1}},
        "train": {"epochs": 1, "batch_size": 256, "windows": "last", "eval": {"ks": [10], "batch_size": 1024}},
        "scaling": {"num_workers": max(1, workers), "resources_per_worker": {"CPU": cpu}},
        "tracking": {"uri": f"sqlite:///{work}/mlflow.db", "experiment": "bench_scale"},
        "run": {"name": f"scale_{setup}", "storage_path": str(work / "runs"), "seed": 0},
    })


def child_train(setup: str, size: str, data: Path, work: Path) -> dict:
    import torch

    from rayrec import recipes
    from rayrec.data.dataset import open_prepared
    from rayrec.recipes.sequential import table_bytes
    from rayrec.train.inputs import data_info

    cfg = job(data, work, setup, size)
    ds = open_prepared(data)
    info = data_info(ds, cfg)
    sliding = data_info(ds, cfg.model_copy(update={"train": cfg.train.model_copy(update={"windows": "sliding"})}))
    out = {"table_mib": table_bytes(cfg, info) / 2**20, "sliding_windows": sliding.train_rows,
           "sliding_table_mib": table_bytes(cfg, sliding) / 2**20}
    ray_start = 0.0
    if SETUPS[setup][0]:
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        ray_start = time.perf_counter() - t
    else:
        torch.set_num_threads(1)
    start = time.perf_counter()
    res = recipes.run(cfg, local=not SETUPS[setup][0], console=False)
    out.update({"seconds": time.perf_counter() - start, "ray_start_s": ray_start, "driver_peak_rss_mib": maxrss_mib(),
                "test_ndcg@10": res.metrics.get("test/ndcg@10")})
    return out


# ----------------------------------------------------------------------------- parent


class WorkerMemory:
    """Peak RSS, USS and anonymous RSS (RSS less shared and file pages: what the process allocated itself,
    without the object store's pages it maps) of each process below ``pid`` whose command line holds
    ``marker`` (Ray Train workers by default), sampled every 0.2 s."""

    def __init__(self, pid: int, marker: str = "TrainWorker") -> None:
        import psutil

        self.root, self.peak, self._stop, self.marker = psutil.Process(pid), {}, threading.Event(), marker
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            try:
                procs = self.root.children(recursive=True)
            except psutil.Error:
                continue
            for p in procs:
                try:
                    if self.marker not in " ".join(p.cmdline()):
                        continue
                    m = p.memory_full_info()
                except psutil.Error:
                    continue
                rss, uss, anon = self.peak.get(p.pid, (0.0, 0.0, 0.0))
                own = (m.rss - m.shared) / 2**20  # anonymous memory: the process's heap, not object-store pages
                self.peak[p.pid] = (max(rss, m.rss / 2**20), max(uss, m.uss / 2**20), max(anon, own))


def run_child(args: list[str]) -> tuple[dict, dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args, "--result", str(result)],
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    with WorkerMemory(proc.pid) as mem:
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"child {args} failed with exit code {rc}")
    return json.loads(result.read_text()), mem.peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100k,1m,20m")
    p.add_argument("--setups", default="plain,ray1,ray2")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        out = child_prepare(rest[0], Path(rest[1])) if kind == "prepare" else child_train(rest[0], rest[1], Path(rest[2]), Path(rest[3]))
        args.result.write_text(json.dumps(out))
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="rayrec-bench-scale-"))
    rows = []
    for size in args.sizes.split(","):
        data = work / f"synth_{size}"
        saved = work / f"prepare_{size}.json"
        if saved.is_file() and (data / "manifest.json").is_file():
            prep = json.loads(saved.read_text())
        else:
            prep, _ = run_child(["prepare", size, str(data)])
            saved.write_text(json.dumps(prep))
        print(f"[{size}] prepared {prep['events']:,} events in {prep['seconds']:.1f} s "
              f"(peak RSS {prep['driver_peak_rss_mib']:,.0f} MiB)", flush=True)
        for setup in args.setups.split(","):
            res, workers = run_child(["train", setup, size, str(data), str(work / f"{size}_{setup}")])
            row = {"size": size, "setup": setup, "events": prep["events"], "users": prep["users"],
                   "prepare_s": prep["seconds"], "prepare_peak_rss_mib": prep["driver_peak_rss_mib"],
                   "epoch_job_s": res["seconds"], "ray_start_s": res["ray_start_s"],
                   "prepare_plus_epoch_s": prep["seconds"] + res["seconds"],
                   "driver_peak_rss_mib": res["driver_peak_rss_mib"],
                   "worker_peak_rss_mib": [round(r, 1) for r, _, _ in workers.values()],
                   "worker_peak_uss_mib": [round(u, 1) for _, u, _ in workers.values()],
                   "table_mib": res["table_mib"], "sliding_windows": res["sliding_windows"],
                   "sliding_table_mib": res["sliding_table_mib"], "test_ndcg@10": res["test_ndcg@10"]}
            rows.append(row)
            print(f"[{size}] {setup}: {res['seconds']:.1f} s, driver {res['driver_peak_rss_mib']:,.0f} MiB, "
                  f"workers RSS {row['worker_peak_rss_mib']} USS {row['worker_peak_uss_mib']} MiB", flush=True)

    print("\nprepare + 1 epoch (validation and test included); SASRec h32, sampled BCE, batch 256, windows last")
    head = f"{'size':>5} {'events':>11} {'setup':>6} {'prepare s':>10} {'epoch job s':>12} {'total s':>8} " \
           f"{'driver MiB':>11} {'worker RSS MiB':>16} {'worker USS MiB':>16} {'tables MiB':>11}"
    print(head)
    for r in rows:
        rss = "/".join(f"{x:.0f}" for x in r["worker_peak_rss_mib"]) or "-"
        uss = "/".join(f"{x:.0f}" for x in r["worker_peak_uss_mib"]) or "-"
        print(f"{r['size']:>5} {r['events']:>11,} {r['setup']:>6} {r['prepare_s']:>10.1f} {r['epoch_job_s']:>12.1f} "
              f"{r['prepare_plus_epoch_s']:>8.1f} {r['driver_peak_rss_mib']:>11,.0f} {rss:>16} {uss:>16} {r['table_mib']:>11.1f}")
    growth = {}
    sizes = [s for s in args.sizes.split(",")]
    for setup in args.setups.split(","):
        by = {r["size"]: r for r in rows if r["setup"] == setup}
        if len(by) > 1:
            a, b = by[sizes[0]], by[sizes[-1]]
            growth[setup] = {"events_x": b["events"] / a["events"], "time_x": b["prepare_plus_epoch_s"] / a["prepare_plus_epoch_s"],
                             "driver_rss_x": b["driver_peak_rss_mib"] / a["driver_peak_rss_mib"]}
            g = growth[setup]
            print(f"{setup}: {sizes[0]} -> {sizes[-1]}: events x{g['events_x']:.0f}, time x{g['time_x']:.1f}, "
                  f"driver RSS x{g['driver_rss_x']:.1f}")
    import torch

    from rayrec.data.atomic import atomic_write

    result = {"benchmark": "scale", "args": {k: str(v) for k, v in vars(args).items() if k not in ("child", "result")},
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
              "rows": rows, "growth": growth}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
