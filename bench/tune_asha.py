"""ASHA vs running every config to completion: the 8-trial `sasrec_quick.yaml` sweep on 2 cores.

Usage:  python bench/tune_asha.py [--space search_spaces/sasrec_quick.yaml --samples 8]

1. The ASHA sweep of the space as shipped (Optuna TPE, ASHA at epochs 1 and 3 of 8), on the
   quickstart synthetic data (2,000 users x 1,000 items).
2. The same configs again, each run to completion (``scheduler: none``; the configs are
   given to the searcher as ``points_to_evaluate``), with the same early stopping.

Targets (issue 5): the ASHA sweep stops at least a third of its trials early; its best
trial's validation NDCG@10 is within 5 % of the best of the completed runs; it spends no
more than 60 % of their total training epochs. Prints a table; writes JSON under bench/results/.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayrec.tune.runner import run_sweep  # noqa: E402
from rayrec.tune.space import load_space  # noqa: E402


def overrides(work: Path, name: str, samples: int, windows: str) -> list[str]:
    """Keep the benchmark's data, runs and MLflow store in its own folder."""
    return [f"name={name}", f"num_samples={samples}", f"storage_path={work / 'tune'}",
            f"data.path={work / 'data'}", "data.synth.images=false", f"train.windows={windows}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=bench_tune_asha"]


def same_decisions(asha, previous: Path) -> dict[str, object]:
    """ASHA's decisions (status and epochs per config) against an earlier result file's."""
    if not previous.is_file():
        return {}
    before = {json.dumps(t["params"], sort_keys=True): t for t in json.loads(previous.read_text()).get("trials", [])}
    rows = []
    for r in asha.rows:
        b = before.get(json.dumps(r.params, sort_keys=True))
        rows.append({"params": r.params, "now": [r.status, r.epochs], "before": [b["asha_status"], b["asha_epochs"]] if b else None})
    matched = [x for x in rows if x["before"] is not None]
    return {"compared": len(matched), "same_status": sum(x["now"][0] == x["before"][0] for x in matched),
            "same_epochs": sum(x["now"] == x["before"] for x in matched), "rows": rows}


def sweep(space: Path, extra: list[str]) -> tuple[object, float]:
    start = time.perf_counter()
    out = run_sweep(load_space(space, extra))
    return out, time.perf_counter() - start


def table(asha, full, metric: str) -> list[str]:
    """One line per config: its values, then ASHA's and the full run's status, epochs and best metric."""
    keys = list(asha.rows[0].params) if asha.rows else []
    full_by_params = {tuple(sorted(r.params.items())): r for r in full.rows} if full else {}
    head = " | ".join([*keys, "asha status", "epochs", f"best {metric}", "full epochs", f"full best {metric}"])
    lines = [head, "-" * len(head)]
    for r in sorted(asha.rows, key=lambda r: -(r.value or 0)):
        f = full_by_params.get(tuple(sorted(r.params.items())))
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.params.values()]
        cells += [r.status, str(r.epochs), f"{r.value:.4f}" if r.value is not None else "-",
                  str(f.epochs) if f else "-", f"{f.value:.4f}" if f and f.value is not None else "-"]
        lines.append(" | ".join(cells))
    return lines


def figures(asha, full) -> dict[str, float]:
    n = len(asha.rows)
    stopped = sum(r.status == "stopped_early" for r in asha.rows)
    asha_epochs, full_epochs = sum(r.epochs for r in asha.rows), sum(r.epochs for r in full.rows)
    best_asha = max(r.value for r in asha.rows if r.value is not None)
    best_full = max(r.value for r in full.rows if r.value is not None)
    return {"trials": n, "stopped_early": stopped, "stopped_fraction": stopped / n,
            "asha_epochs": asha_epochs, "full_epochs": full_epochs, "epoch_ratio": asha_epochs / full_epochs,
            "best_asha": best_asha, "best_full": best_full, "best_ratio": best_asha / best_full}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "sasrec_quick.yaml")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a new temp folder)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tune_asha.json")
    p.add_argument("--windows", default="last", help="train.windows of every trial (last: as the earlier results)")
    p.add_argument("--asha-only", action="store_true", help="skip the full runs; compare ASHA's decisions with "
                   "the results file's (the same configs: TPE's first trials are its seeded random start)")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = args.work or Path(tempfile.mkdtemp(prefix="rayrec-bench-tune-"))

    previous = args.out.with_suffix(".previous.json")
    if args.out.is_file():
        previous.write_text(args.out.read_text())
    asha, asha_s = sweep(args.space, overrides(work, "asha", args.samples, args.windows))
    if asha.interrupted:
        return 130
    decisions = same_decisions(asha, previous)
    trial_epochs = sum(r.epochs for r in asha.rows)
    print(f"\nASHA sweep: {len(asha.rows)} trials, {trial_epochs} trial-epochs in {asha_s / 60:.1f} min "
          f"({asha_s / max(1, trial_epochs):.1f} s per trial-epoch)")
    if decisions:
        print(f"decisions vs the earlier result: {decisions['same_status']}/{decisions['compared']} same status, "
              f"{decisions['same_epochs']}/{decisions['compared']} same status and epochs")
    if args.asha_only:
        old = json.loads(previous.read_text()) if previous.is_file() else {}
        result = {"space": str(args.space.relative_to(ROOT)) if args.space.is_relative_to(ROOT) else str(args.space),
                  "windows": args.windows, "asha_minutes": asha_s / 60, "asha_epochs": trial_epochs,
                  "seconds_per_trial_epoch": asha_s / max(1, trial_epochs),
                  "before": {k: old.get(k) for k in ("asha_minutes", "asha_epochs", "full_minutes", "full_epochs")},
                  "decisions": decisions,
                  "trials": [{"params": r.params, "asha_status": r.status, "asha_epochs": r.epochs, "asha_best": r.value}
                             for r in asha.rows],
                  "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_avg_1m_at_end": os.getloadavg()[0]}}
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.out)
        previous.unlink(missing_ok=True)
        print(f"wrote {args.out}")
        return 0
    configs = [r.params for r in asha.rows]
    points = json.dumps(configs)  # JSON is a YAML flow list: one override
    full, full_s = sweep(args.space, [*overrides(work, "full", len(configs), args.windows), "scheduler.name=none",
                                      "searcher.name=random", f"searcher.points_to_evaluate={points}"])
    if full.interrupted:
        return 130
    metric = load_space(args.space).space.metric
    f = figures(asha, full)
    targets = {"stops >= 1/3 early": f["stopped_fraction"] >= 1 / 3,
               "best within 5% of full": f["best_ratio"] >= 0.95,
               "epochs <= 60% of full": f["epoch_ratio"] <= 0.60}

    print("\n".join(table(asha, full, metric)))
    print(f"\nASHA: {f['stopped_early']}/{f['trials']} stopped early, {f['asha_epochs']} epochs in {asha_s / 60:.1f} min; "
          f"full: {f['full_epochs']} epochs in {full_s / 60:.1f} min")
    print(f"best {metric}: ASHA {f['best_asha']:.4f} vs full {f['best_full']:.4f} ({f['best_ratio']:.1%}); "
          f"epochs {f['epoch_ratio']:.1%} of full")
    for name, ok in targets.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")

    result = {"space": str(args.space.relative_to(ROOT)) if args.space.is_relative_to(ROOT) else str(args.space),
              "metric": metric, **f, "asha_minutes": asha_s / 60, "full_minutes": full_s / 60, "windows": args.windows,
              "seconds_per_trial_epoch": asha_s / max(1, trial_epochs), "decisions": decisions,
              "targets": targets, "trials": [{"params": r.params, "asha_status": r.status, "asha_epochs": r.epochs,
                                              "asha_best": r.value} for r in asha.rows],
              "full": [{"params": r.params, "epochs": r.epochs, "best": r.value} for r in full.rows],
              "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
                       "load_avg_1m_at_end": os.getloadavg()[0]},
              "work": str(work)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    previous.unlink(missing_ok=True)
    print(f"wrote {args.out}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
