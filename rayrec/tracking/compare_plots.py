"""Figures of `rayrec compare`: metric vs each param, top-run learning curves, parallel coordinates."""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from rayrec.tracking.mlflow_tracking import metric_history  # noqa: E402

MAX_PANELS = 12


def close(fig) -> None:
    plt.close(fig)


def _numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(pd.to_numeric(values.dropna(), errors="coerce").dropna()) and \
        pd.to_numeric(values.dropna(), errors="coerce").notna().all() and values.notna().any()


def _log_scale(values: pd.Series) -> bool:
    """A positive range over more than 1.5 decades reads better on a log axis (learning rates)."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    return bool(len(v)) and (v > 0).all() and v.max() / v.min() > 30


def metric_vs_params(table: pd.DataFrame, params: list[str], metric: str):
    """One scatter panel per differing param (categorical params on evenly spaced ticks)."""
    params = params[:MAX_PANELS]
    if not params:
        return None
    col = f"best {metric}"
    ncols = min(4, len(params))
    nrows = math.ceil(len(params) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    for ax, p in zip(axes.flat, params):
        xs, ys = table[p], table[col]
        if _numeric(xs):
            ax.scatter(pd.to_numeric(xs), ys, s=22, alpha=0.8)
            if _log_scale(xs):
                ax.set_xscale("log")
        else:
            labels = _labels(xs)
            cats = sorted(set(labels))
            ax.scatter([cats.index(x) for x in labels], ys, s=22, alpha=0.8)
            ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=8)
        ax.set_xlabel(p, fontsize=8)
        ax.set_ylabel(col, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(params):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def top_curves(result, frame: pd.DataFrame, uri: str, top: int):
    """Validation metric and training loss per epoch for the ``top`` runs."""
    runs = list(result.table["run"].head(top))
    if not runs:
        return None
    names = dict(zip(frame["run_id"], frame.get("tags.mlflow.runName", frame["run_id"])))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for rid in runs:
        label = str(names.get(rid) or rid[:8])[-28:]
        for ax, hist in ((a1, result.curves.get(rid) or metric_history(uri, rid, result.metric)),
                         (a2, metric_history(uri, rid, "train/loss"))):
            if hist:
                xs, ys = zip(*hist)
                ax.plot(xs, ys, marker="o", ms=3, label=label)
    a1.set_title(result.metric)
    a2.set_title("train/loss")
    for ax in (a1, a2):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    a1.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _labels(values: pd.Series) -> list[str]:
    """Category labels; '-' for a run without the param (a run of another job kind)."""
    return ["-" if pd.isna(x) else str(x) for x in values]


def _axis_values(values: pd.Series) -> tuple[np.ndarray, list[Any]]:
    """Values scaled to [0, 1] (log when wide, categories evenly) and the tick labels of the ends."""
    if _numeric(values):
        v = pd.to_numeric(values).astype(float).to_numpy()
        scaled = np.log10(v) if _log_scale(values) else v
        lo, hi = np.nanmin(scaled), np.nanmax(scaled)
        unit = (scaled - lo) / (hi - lo) if hi > lo else np.full_like(scaled, 0.5)
        return unit, [f"{np.nanmin(v):.3g}", f"{np.nanmax(v):.3g}"]
    labels = _labels(values)
    cats = sorted(set(labels))
    pos = np.array([cats.index(x) for x in labels], dtype=float)
    return (pos / (len(cats) - 1) if len(cats) > 1 else np.full_like(pos, 0.5)), [cats[0], cats[-1]]


def parallel_coordinates(table: pd.DataFrame, params: list[str], metric: str, mode: str):
    """One line per run across the differing params and the metric, coloured by the metric."""
    col = f"best {metric}"
    axes_names = params[:MAX_PANELS] + [col]
    data = table.dropna(subset=[col])
    if len(axes_names) < 2 or data.empty:
        return None
    scaled, ends = zip(*(_axis_values(data[a]) for a in axes_names))
    y = np.vstack(scaled).T  # [runs, axes]
    score = data[col].to_numpy(dtype=float)
    norm = plt.Normalize(score.min(), score.max() if score.max() > score.min() else score.min() + 1e-9)
    cmap = plt.get_cmap("viridis" if mode == "max" else "viridis_r")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(axes_names)), 4))
    order = np.argsort(score if mode == "max" else -score)  # best drawn last, on top
    for i in order:
        best = i == order[-1]
        ax.plot(range(len(axes_names)), y[i], color=cmap(norm(score[i])), lw=2.6 if best else 1.2,
                alpha=1.0 if best else 0.7)
    for j, (lo, hi) in enumerate(ends):
        ax.axvline(j, color="grey", lw=0.8)
        ax.text(j, -0.06, str(lo), ha="center", va="top", fontsize=7)
        ax.text(j, 1.04, str(hi), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(axes_names)), axes_names, rotation=20, fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=col)
    fig.tight_layout()
    return fig
