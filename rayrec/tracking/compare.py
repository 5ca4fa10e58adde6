"""`rayrec compare`: read an MLflow experiment back and compare its runs.

One row per run, sorted by the best value of a validation metric over the run's
epochs, showing only the params that differ between the runs compared. Written to
an output folder: ``runs.csv``, ``runs.md`` and three figures (the metric against
each differing param, learning curves of the top runs, parallel coordinates).

Sweep parent runs are skipped (their trials are the runs); ``sweep=`` keeps the trials
of one sweep only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rayrec.errors import RayrecError
from rayrec.eval.metrics import metric_mode
from rayrec.tracking.mlflow_tracking import metric_history, mlflow_key

STATUS_TAG, SWEEP_TAG, KIND_TAG, PARENT_TAG = ("rayrec.trial_status", "rayrec.sweep", "rayrec.kind",
                                               "mlflow.parentRunId")
MAX_PARAM_PANELS = 12


@dataclass
class Comparison:
    experiment: str
    metric: str
    mode: str
    table: pd.DataFrame  # run, name, status, epochs, best metric, [test metric], differing params
    params: list[str]  # the differing params (columns of ``table``)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # run -> metric history
    files: list[Path] = field(default_factory=list)


def compare(uri: str, experiment: str, *, metric: str = "val/ndcg@10", runs: list[str] | None = None,
            sweep: str | None = None, top: int = 5, out: Path | None = None) -> Comparison:
    """Load the experiment's runs, rank them on ``metric`` and (with ``out``) write the files."""
    mode = _mode(metric)
    frame = select_runs(load_runs(uri, experiment), runs=runs, sweep=sweep)
    histories = {rid: metric_history(uri, rid, metric) for rid in frame["run_id"]}
    table, params = build_table(frame, histories, metric, mode)
    curves = {rid: histories[rid] for rid in table["run"].head(top)}
    result = Comparison(experiment, metric, mode, table, params, curves)
    if out is not None:
        result.files = write_outputs(result, frame, uri, Path(out), top)
    return result


def _mode(metric: str) -> str:
    try:
        return metric_mode(metric)
    except ValueError as e:
        raise RayrecError(f"--metric {metric}: {e}") from None


def load_runs(uri: str, experiment: str) -> pd.DataFrame:
    """All runs of ``experiment`` as MLflow's dataframe (``params.*``, ``metrics.*``, ``tags.*``)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        names = sorted(e.name for e in mlflow.search_experiments())
        raise RayrecError(f"no MLflow experiment '{experiment}' at {uri}; experiments there: "
                          f"{', '.join(names) or '(none)'} (set --tracking-uri if the runs are elsewhere)")
    frame = mlflow.search_runs(experiment_names=[experiment], output_format="pandas")
    if frame.empty:
        raise RayrecError(f"MLflow experiment '{experiment}' at {uri} has no runs")
    return frame


def select_runs(frame: pd.DataFrame, *, runs: list[str] | None = None, sweep: str | None = None) -> pd.DataFrame:
    """Drop sweep parents; keep the named runs (id, id prefix or run name) or one sweep's trials."""
    tags = lambda name: frame.get(f"tags.{name}", pd.Series([None] * len(frame), index=frame.index))  # noqa: E731
    keep = tags(KIND_TAG).fillna("") != "sweep"
    if sweep:
        parents = frame.loc[(tags(KIND_TAG) == "sweep") & (tags("mlflow.runName") == sweep), "run_id"].tolist()
        keep &= (tags(SWEEP_TAG) == sweep) | tags(PARENT_TAG).isin([sweep, *parents])
    if runs:
        names = tags("mlflow.runName").fillna("")
        hit = frame["run_id"].map(lambda r: any(r.startswith(x) for x in runs)) | names.isin(runs)
        missing = [x for x in runs if not (frame["run_id"].str.startswith(x) | (names == x)).any()]
        if missing:
            raise RayrecError(f"--runs: no run with id, id prefix or name {', '.join(missing)} in this experiment")
        keep &= hit
    chosen = frame[keep]
    if chosen.empty:
        raise RayrecError("no runs left to compare" + (f" for sweep '{sweep}'" if sweep else ""))
    return chosen.reset_index(drop=True)


def best_value(history: list[tuple[int, float]], mode: str) -> float | None:
    values = [v for _, v in history if math.isfinite(v)]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def build_table(frame: pd.DataFrame, histories: dict[str, list[tuple[int, float]]], metric: str,
                mode: str) -> tuple[pd.DataFrame, list[str]]:
    """Rows sorted best first; columns: run, name, status, epochs, best metric, test metric, differing params."""
    params = differing_params(frame)
    test_col = f"metrics.{mlflow_key('test/' + metric.split('/', 1)[1])}"
    rows = []
    for _, r in frame.iterrows():
        hist = histories.get(r["run_id"], [])
        row = {"run": r["run_id"], "name": r.get("tags.mlflow.runName"), "status": _status(r),
               "epochs": int(max((s for s, _ in hist), default=0)), f"best {metric}": best_value(hist, mode)}
        if test_col in frame:
            row[f"test/{metric.split('/', 1)[1]}"] = r[test_col]
        row.update({p: _typed(r[f"params.{p}"]) for p in params})
        rows.append(row)
    table = pd.DataFrame(rows)
    table = table.sort_values(f"best {metric}", ascending=mode == "min", na_position="last").reset_index(drop=True)
    return table, params


def _status(row: pd.Series) -> str:
    tagged = row.get(f"tags.{STATUS_TAG}")
    return tagged if isinstance(tagged, str) and tagged else str(row.get("status", "")).lower()


def differing_params(frame: pd.DataFrame) -> list[str]:
    """Params whose value is not the same in every run (a run without it counts as different)."""
    cols = [c for c in frame.columns if c.startswith("params.")]
    return [c[len("params."):] for c in cols if frame[c].astype(str).nunique(dropna=False) > 1]


def _typed(value: Any) -> Any:
    """MLflow params are strings: give numbers back as numbers (for sorting and plots)."""
    if not isinstance(value, str):
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


# --- outputs ----------------------------------------------------------------------------------


def write_outputs(result: Comparison, frame: pd.DataFrame, uri: str, out: Path, top: int) -> list[Path]:
    """runs.csv, runs.md and the three figures under ``out``."""
    from rayrec.tracking import compare_plots as plots

    out.mkdir(parents=True, exist_ok=True)
    files = [out / "runs.csv", out / "runs.md"]
    result.table.to_csv(files[0], index=False)
    files[1].write_text(markdown(result))
    figures = {
        "metric_vs_params.png": plots.metric_vs_params(result.table, result.params, result.metric),
        "learning_curves.png": plots.top_curves(result, frame, uri, top),
        "parallel_coordinates.png": plots.parallel_coordinates(result.table, result.params, result.metric, result.mode),
    }
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(out / name, dpi=110, bbox_inches="tight")
            plots.close(fig)
            files.append(out / name)
    return files


def markdown(result: Comparison) -> str:
    """The table as GitHub Markdown, with a heading that says what was compared."""
    t = result.table
    head = (f"# {result.experiment}: {len(t)} runs by best {result.metric} ({result.mode})\n\n"
            f"Params shown: those that differ between runs ({', '.join(result.params) or 'none'}).\n\n")
    cols = list(t.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in t.itertuples(index=False)]
    return head + "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def print_comparison(result: Comparison) -> None:
    t = result.table.copy()
    t["run"] = t["run"].str[:8]
    print(f"{result.experiment}: {len(t)} runs by best {result.metric} ({result.mode}); "
          f"params that differ: {', '.join(result.params) or 'none'}")
    with pd.option_context("display.width", 220, "display.max_columns", 30, "display.max_colwidth", 40,
                           "display.float_format", "{:.4g}".format):
        print(t.to_string(index=False))
    for f in result.files:
        print(f"wrote {f}")
