"""SASRec vs the most-popular baseline on the quickstart job's data (test split, full ranking).

Usage:  python bench/quickstart_quality.py [--local] [overrides ...]

Trains jobs/quickstart.yaml (on Ray Train as configured, or --local in-process), evaluates the
popularity baseline on the same prepared data, and prints test metrics and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayrec import recipes  # noqa: E402
from rayrec.config import load_job  # noqa: E402

KEYS = ["test/ndcg@10", "test/hr@10", "test/mrr"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--local", action="store_true", help="train in-process instead of on Ray Train")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quickstart_quality.json")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="rayrec-quality-"))
    common = [f"run.storage_path={work}/runs", f"tracking.uri=sqlite:///{work}/mlflow.db",
              f"data.path={work}/quickstart"]
    rows = {}
    for name, extra in (("sasrec", []), ("popularity", ["model={name: popularity}"])):
        cfg = load_job(ROOT / "jobs" / "quickstart.yaml", common + args.overrides + extra + [f"run.name={name}"])
        start = time.perf_counter()
        out = recipes.run(cfg, local=args.local)
        rows[name] = {k: out.metrics[k] for k in KEYS} | {"wall_s": time.perf_counter() - start,
                                                          "best_epoch": out.metrics.get("best_epoch")}
    ratio = rows["sasrec"]["test/ndcg@10"] / max(rows["popularity"]["test/ndcg@10"], 1e-12)
    print(f"\nquickstart data, test split, full ranking ({'local' if args.local else 'Ray Train'})")
    print(f"{'model':<12}" + "".join(f"{k:>14}" for k in KEYS) + f"{'wall s':>9}")
    for name, r in rows.items():
        print(f"{name:<12}" + "".join(f"{r[k]:>14.4f}" for k in KEYS) + f"{r['wall_s']:>9.1f}")
    print(f"SASRec / popularity NDCG@10 = {ratio:.2f}x (target >= 2x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": "quickstart_quality", "ray": not args.local,
                               "overrides": args.overrides, "rows": rows, "ndcg10_ratio": ratio}, indent=2))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
