"""Batch recommendations: users/s of `rayrec recommend` on Ray Data actors against a plain in-process loop.

Usage:  nice python bench/recommend.py [--sizes 1m,20m] [--setups plain,ray1,ray2,ray1_10k,ray1_40k] [--work DIR]

Data: the synthetic source at the MovieLens-1M and -20M sizes of bench/scale.py (6,040 x 3,706 and
138,493 x 26,744). The checkpoint: SASRec as in bench/scale.py (hidden 32, 1 block, max_len 50) with
seeded random weights, written as a rayrec checkpoint (how fast items are ranked does not depend on
what the weights learned). Every setup writes the top-100 of every user with seen items masked, as
of test, through `rayrec.recs.recommend.recommend` in a fresh process:

  plain     ``--local``: the same scorer class called over the same batches in this process
  ray1      Ray Data ``map_batches`` on an ``ActorPoolStrategy(size=1)`` (the default on 2 CPUs)
  ray2      two actors (every CPU of this machine)
  ray1_10k  ray1 for the first 10,000 users only (less than one block of 64 x 256 users), and
  ray1_40k  for 40,000 (2.4 blocks): beyond a block an actor's memory should not grow with the users

Timed: the whole call (Ray's start included), and users/s over it. Memory: peak RSS of the driver
process and, sampled every 0.2 s, of each Ray Data actor: RSS, USS and anonymous RSS (RSS less
shared pages: the actor's own heap, without the object-store blocks it maps, which count in its RSS
and USS until the driver reads them). Prints a table and writes bench/results/recommend.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scale import SIZES, WorkerMemory, child_prepare, maxrss_mib  # noqa: E402  (bench/scale.py's sizes)

SETUPS = {"plain": (0, None), "ray1": (1, None), "ray2": (2, None), "ray1_10k": (1, 10_000),
          "ray1_40k": (1, 40_000)}  # actors, users
K = 100


def write_checkpoint(data: Path, folder: Path) -> Path:
    """A SASRec checkpoint of ``data`` with seeded random weights (what ``rayrec recommend`` reads)."""
    import torch

    from rayrec.config import dump_job
    from rayrec.config.schema import JobConfig
    from rayrec.data.dataset import fingerprint_at, open_prepared
    from rayrec.train.checkpoint import save_state
    from rayrec.train.specs import build_model

    cfg = JobConfig.model_validate({
        "data": {"path": str(data), "prepare_if_missing": False},
        "model": {"name": "sasrec", "hidden": 32, "num_blocks": 1, "num_heads": 1, "max_len": 50},
        "train": {"eval": {"ks": [10]}}, "tracking": {"enabled": False}})
    torch.manual_seed(0)
    model = build_model(cfg.model, open_prepared(data).num_items)
    save_state({"config": dump_job(cfg), "model": model.state_dict(), "data": fingerprint_at(data)}, folder)
    return folder


def child_recommend(setup: str, checkpoint: Path, out: Path, users_file: Path | None) -> dict:
    from rayrec.recs.recommend import Request, recommend

    actors, _ = SETUPS[setup]
    start = time.perf_counter()
    meta = recommend(Request(checkpoint, K, "test", users=users_file), out, local=not actors, actors=actors or None)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "users": meta["users"], "users_per_s": meta["users"] / seconds,
            "driver_peak_rss_mib": maxrss_mib(), "output_mib": (out / "recs.parquet").stat().st_size / 2**20}


def run_child(args: list[str]) -> tuple[dict, dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args, "--result", str(result)],
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    with WorkerMemory(proc.pid, marker="MapWorker") as mem:  # Ray Data's actors
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"child {args} failed with exit code {rc}")
    return json.loads(result.read_text()), mem.peak


def first_users(data: Path, n: int, path: Path) -> Path:
    import pandas as pd

    users = pd.read_parquet(data / "users.parquet", columns=["source_id"])["source_id"].astype(str)
    path.write_text("\n".join(users.head(n)) + "\n")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1m,20m")
    p.add_argument("--setups", default="plain,ray1,ray2,ray1_10k,ray1_40k")
    p.add_argument("--work", type=Path, default=None, help="reuse the datasets prepared there (bench/scale.py's too)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "recommend.json")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "prepare":
            out = child_prepare(rest[0], Path(rest[1]))
        else:
            out = child_recommend(rest[0], Path(rest[1]), Path(rest[2]), Path(rest[3]) if len(rest) > 3 else None)
        args.result.write_text(json.dumps(out))
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="rayrec-bench-recommend-"))
    rows = []
    for size in args.sizes.split(","):
        data, saved = work / f"synth_{size}", work / f"prepare_{size}.json"
        if not (saved.is_file() and (data / "manifest.json").is_file()):
            prep, _ = run_child(["prepare", size, str(data)])
            saved.write_text(json.dumps(prep))
        checkpoint = write_checkpoint(data, work / f"checkpoint_{size}")
        for setup in args.setups.split(","):
            actors, limit = SETUPS[setup]
            extra = [str(first_users(data, limit, work / f"users_{size}_{limit}.txt"))] if limit else []
            res, peaks = run_child(["recommend", setup, str(checkpoint), str(work / f"recs_{size}_{setup}"), *extra])
            row = {"size": size, "setup": setup, "actors": actors, "items": SIZES[size][1], **res,
                   "actor_peak_rss_mib": sorted(round(r, 1) for r, _, _ in peaks.values()),
                   "actor_peak_uss_mib": sorted(round(u, 1) for _, u, _ in peaks.values()),
                   "actor_peak_anon_mib": sorted(round(a, 1) for _, _, a in peaks.values())}
            rows.append(row)
            print(f"[{size}] {setup:9s} {res['users']:>7,} users  {res['seconds']:7.1f} s  {res['users_per_s']:8.0f} "
                  f"users/s  driver {res['driver_peak_rss_mib']:6.0f} MiB  actors {row['actor_peak_rss_mib']} MiB",
                  flush=True)
    for size in args.sizes.split(","):
        plain = next((r for r in rows if r["size"] == size and r["setup"] == "plain"), None)
        for r in rows:
            if r["size"] == size and plain:
                r["users_per_s_vs_plain"] = r["users_per_s"] / plain["users_per_s"]

    header = f"{'size':5s} {'setup':9s} {'users':>8s} {'seconds':>8s} {'users/s':>8s} {'vs plain':>8s} " \
             f"{'driver MiB':>10s} {'actor RSS MiB':>14s} {'actor USS MiB':>14s} {'actor anon MiB':>14s}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['size']:5s} {r['setup']:9s} {r['users']:>8,} {r['seconds']:8.1f} {r['users_per_s']:8.0f} "
              f"{r.get('users_per_s_vs_plain', float('nan')):8.2f} {r['driver_peak_rss_mib']:10.0f} "
              f"{'/'.join(f'{x:.0f}' for x in r['actor_peak_rss_mib']) or '-':>14s} "
              f"{'/'.join(f'{x:.0f}' for x in r['actor_peak_uss_mib']) or '-':>14s} "
              f"{'/'.join(f'{x:.0f}' for x in r['actor_peak_anon_mib']) or '-':>14s}")
    import torch

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "recommend", "k": K, "args": {k: str(v) for k, v in vars(args).items() if k not in ("child", "result")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
