"""``StrategySet``: one stage's schedule, weighting and auxiliary losses, composed.

Per optimizer step the joint loop asks ``active_modules()`` (what trains), ``needs()``
(what the model must compute), ``total(out, active)`` (the loss to backpropagate and its
parts) and, after the step, ``observe(losses)`` with the parts averaged over workers.
Per epoch: ``start_epoch(e)`` and ``end_epoch()`` (DWA updates from epoch means; the
epoch's switch counts and module shares are returned for logging).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class StrategySet(nn.Module):
    """Parameters (uncertainty log-variances, memory-bank projections) are this module's."""

    def __init__(self, stage: str, trainable: tuple[str, ...], loss_keys: tuple[str, ...], *,
                 schedule=None, weighting: nn.Module, aux: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.stage, self.trainable, self.loss_keys = stage, trainable, loss_keys
        self.schedule = schedule
        self.weighting = weighting
        self.aux = nn.ModuleDict(aux or {})
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._epoch_start = (0, 0, {})  # schedule step, switches, steps per module at epoch start

    def active_modules(self) -> tuple[str, ...]:
        """Modules that train this step: the schedule's one, or every trainable module."""
        return (self.schedule.active,) if self.schedule is not None else self.trainable

    def step_keys(self, active: tuple[str, ...]) -> tuple[str, ...]:
        """Main losses of this step: the active modules' (and ``fused`` when all of them train)."""
        return tuple(k for k in self.loss_keys if k in active or (k == "fused" and active == self.trainable))

    def needs(self) -> frozenset[str]:
        """Extra model outputs the auxiliary losses read ("cand_scores", "reps")."""
        return frozenset().union(*(a.needs for a in self.aux.values()))

    def total(self, out, active: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted main losses plus auxiliary losses; returns (total, {name: part})."""
        parts = {k: out.losses[k] for k in self.step_keys(active)}
        total = self.weighting.combine(parts)
        for name, aux in self.aux.items():
            parts[name] = aux(out)
            total = total + parts[name]
        return total, parts

    def observe(self, losses: dict[str, float]) -> None:
        """After a step: accumulate epoch means, let the schedule decide (same on every worker)."""
        for k, v in losses.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
            self._counts[k] = self._counts.get(k, 0) + 1
        if self.schedule is not None:
            self.schedule.observe(losses)

    def observe_skipped(self) -> None:
        """A step skipped for NaN/Inf gradients: the schedule counts it (no loss reaches any mean)."""
        if self.schedule is not None:
            self.schedule.observe_skipped()

    def start_epoch(self, epoch: int) -> None:
        """``epoch`` counts from 1 within the stage."""
        self._sums, self._counts = {}, {}
        self.weighting.start_epoch(epoch)
        if self.schedule is not None:
            s = self.schedule
            self._epoch_start = (s.step, s.switches, dict(s.steps_per_module))

    def epoch_means(self) -> dict[str, float]:
        return {k: self._sums[k] / self._counts[k] for k in self._sums}

    def end_epoch(self) -> dict[str, float]:
        """Update epoch-based weightings; return this epoch's strategy statistics."""
        self.weighting.end_epoch({k: v for k, v in self.epoch_means().items() if k in self.loss_keys})
        return self.stats()

    def stats(self) -> dict[str, float]:
        out = dict(self.weighting.stats())
        for aux in self.aux.values():
            out.update(aux.stats())
        if self.schedule is not None:
            out.update(self.schedule.stats())
            out.update(self._epoch_schedule_stats())
        return out

    def _epoch_schedule_stats(self) -> dict[str, float]:
        """Switches away from each module and each module's share of steps, this epoch only."""
        s, (step0, switches0, per0) = self.schedule, self._epoch_start
        steps = max(1, s.step - step0)
        out = {"strategy/switches_epoch": float(s.switches - switches0)}
        for m in self.trainable:
            out[f"strategy/epoch_share_{m}"] = (s.steps_per_module.get(m, 0) - per0.get(m, 0)) / steps
            out[f"strategy/switches_from_{m}_epoch"] = float(
                sum(1 for step, old, _, _ in s.events if step > step0 and old == m))
        return out

    def describe(self) -> str:
        """Short text for the progress bar: the trained module and switch count."""
        if self.schedule is None:
            return "+".join(self.trainable)
        return f"{self.schedule.active} sw={self.schedule.switches}"

    def get_extra_state(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state() if self.schedule is not None else None,
                "sums": dict(self._sums), "counts": dict(self._counts),
                "epoch_start": [self._epoch_start[0], self._epoch_start[1], dict(self._epoch_start[2])]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self.schedule is not None and state.get("schedule") is not None:
            self.schedule.load(state["schedule"])
        self._sums, self._counts = dict(state["sums"]), dict(state["counts"])
        a, b, c = state["epoch_start"]
        self._epoch_start = (a, b, dict(c))

