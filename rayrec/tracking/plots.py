"""Figures logged with a run: learning curves from the logged metric history."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402


def learning_curves(curves: dict[str, list[tuple[int, float]]]):
    """One panel per metric, x = epoch. ``curves``: name -> [(epoch, value), ...]."""
    names = [k for k, v in curves.items() if v]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        xs, ys = zip(*curves[name])
        ax.plot(xs, ys, marker="o", ms=3)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
