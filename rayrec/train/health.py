"""Gradient health of every optimizer step, for any model.

``GradHealth.check`` runs after the gradients are final (accumulated, averaged over
workers, unscaled) and before the optimizer steps:

- one gradient norm per module (parameter names cut at ``health.depth``), from which the
  global norm is built, so clipping costs nothing extra;
- any NaN/Inf: the step is skipped (the caller neither steps the optimizer nor the
  schedule), counted, logged with the modules whose gradients went bad; after
  ``max_bad_steps`` skipped steps in a row the run stops with ``TrainingHealthError``;
- a trained module whose norm is below ``vanish_below`` is counted and warned about (once
  per module and epoch);
- every ``log_every`` steps the mean norm of each module goes to MLflow
  (``health/grad_norm/<module>``, MLflow step = optimizer step); per epoch the loop logs
  ``train/grad_norm_<module>``, ``health/skipped_steps``, ``health/nonfinite_<module>`` and
  ``health/vanishing_<module>``.

Gradients agree on every worker (DDP or the joint loop's all-reduce averaged them), so every
worker makes the same decision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from rayrec.config.progressive import HealthConfig
from rayrec.errors import RayrecError

log = logging.getLogger(__name__)

SKIPPED = "health/skipped_steps"


class TrainingHealthError(RayrecError):
    """Too many optimizer steps in a row had NaN/Inf gradients."""


def module_of(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth])


class GradHealth:
    """Per-module gradient norms, NaN/Inf skipping and vanishing warnings (see module doc)."""

    def __init__(self, named: Iterable[tuple[str, nn.Parameter]], cfg: HealthConfig, *,
                 log_step: Callable[[dict[str, float], int], None] | None = None) -> None:
        self.cfg, self.log_step = cfg, log_step
        self.modules: dict[str, list[nn.Parameter]] = {}
        for name, p in named:
            self.modules.setdefault(module_of(name, cfg.depth), []).append(p)
        self.consecutive = 0
        self.last_norm = 0.0
        self.step = 0  # optimizer steps attempted (checked) in the run
        self.skipped_total = 0
        self._window: dict[str, list[float]] = {}
        self.reset_epoch()

    def set_module(self, name: str, params: list[nn.Parameter]) -> None:
        """Track ``params`` as module ``name`` (replacing what it was), e.g. a stage's strategy parameters."""
        self.modules[name] = list(params)

    def reset_epoch(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.nonfinite: dict[str, int] = {}
        self.vanishing: dict[str, int] = {}
        self.skipped = 0
        self._warned: set[str] = set()

    def check(self, clip: float | None, *, modules: Iterable[str] | None = None, per_module_clip: bool = False,
              tolerate: bool = False, unclipped: tuple[str, ...] = ()) -> bool:
        """Norms of ``modules`` (default all) with gradients; clip; return False to skip the step.

        ``per_module_clip``: clip each module by its own norm (not the global one); ``unclipped``:
        modules left as they are. ``tolerate``: a NaN/Inf step is expected and handled by the caller (fp16 loss scaling):
        it is neither counted nor alarmed on. ``last_norm`` is the global norm before clipping.
        """
        if not self.cfg.enabled:  # clip only, as before health checks existed
            mods = [m for m in (modules if modules is not None else self.modules) if m not in unclipped]
            groups = [[p for p in self.modules[m] if p.grad is not None] for m in mods]
            groups = [g for g in groups if g] if per_module_clip else [[p for g in groups for p in g]]
            norms = [torch.nn.utils.clip_grad_norm_(g, clip or float("inf")) for g in groups if g]
            self.last_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
            return True
        names, params = [], []
        for m in (modules if modules is not None else self.modules):
            ps = [p for p in self.modules[m] if p.grad is not None]
            if ps:
                names.append(m)
                params.append(ps)
        if not names:
            self.last_norm = 0.0
            return True
        norms_t = torch.stack([get_total_norm([p.grad for p in ps]) for ps in params])  # one norm per module
        values = norms_t.tolist()  # the one sync of the step
        finite = all(math.isfinite(v) for v in values)
        self.last_norm = math.sqrt(sum(v * v for v in values)) if finite else float("nan")
        if tolerate and not finite:
            return False
        self.step += 1
        if not finite:
            self._skip([m for m, v in zip(names, values, strict=True) if not math.isfinite(v)])
            return False
        self.consecutive = 0
        if clip:
            keep = [i for i, m in enumerate(names) if m not in unclipped]
            if per_module_clip:
                for i in keep:
                    clip_grads_with_norm_(params[i], clip, norms_t[i])
            elif keep:
                clip_grads_with_norm_([p for i in keep for p in params[i]], clip, torch.linalg.vector_norm(norms_t[keep]))
        self._record(dict(zip(names, values, strict=True)))
        return True

    def _skip(self, bad: list[str]) -> None:
        self.skipped += 1
        self.skipped_total += 1
        self.consecutive += 1
        for m in bad:
            self.nonfinite[m] = self.nonfinite.get(m, 0) + 1
        log.warning("step %d skipped: NaN/Inf gradients in %s (%d in a row, limit %d)", self.step, bad,
                    self.consecutive, self.cfg.max_bad_steps)
        if self.consecutive >= self.cfg.max_bad_steps:
            raise TrainingHealthError(
                f"{self.consecutive} optimizer steps in a row had NaN/Inf gradients (train.health.max_bad_steps="
                f"{self.cfg.max_bad_steps}); the gradients of {bad} went bad at step {self.step}. Lower the learning "
                "rate of those modules (train.optim.groups), keep train.optim.grad_clip on, or check the inputs")

    def scaler_skipped(self) -> None:
        """fp16 loss scaling skipped a step (overflow): counted; the scaler backs off from 2^16 in at
        most 16 such steps, so more than ``max_bad_steps + 16`` in a row is a real NaN/Inf."""
        self.skipped += 1
        self.skipped_total += 1
        self.consecutive += 1
        if self.consecutive > self.cfg.max_bad_steps + 16:
            raise TrainingHealthError(
                f"{self.consecutive} optimizer steps in a row overflowed under fp16 loss scaling (train.health."
                f"max_bad_steps={self.cfg.max_bad_steps} + 16 for the scaler's back-off): the loss or gradients are "
                "NaN/Inf, not just large; lower the learning rate or use bf16")

    def _record(self, norms: dict[str, float]) -> None:
        for m, v in norms.items():
            self.sums[m] = self.sums.get(m, 0.0) + v
            self.counts[m] = self.counts.get(m, 0) + 1
            self._window.setdefault(m, []).append(v)
            if v < self.cfg.vanish_below:
                self.vanishing[m] = self.vanishing.get(m, 0) + 1
                if m not in self._warned:
                    self._warned.add(m)
                    log.warning("vanishing gradient: module %s has gradient norm %.3g < %g at step %d", m, v,
                                self.cfg.vanish_below, self.step)
        if self.log_step is not None and self.step % self.cfg.log_every == 0:
            self.log_step({f"health/grad_norm/{m}": sum(v) / len(v) for m, v in self._window.items()}, self.step)
            self._window = {}

    def epoch_metrics(self) -> dict[str, float]:
        """This epoch's means and counts (then reset)."""
        out = {f"train/grad_norm_{m}": s / self.counts[m] for m, s in self.sums.items()}
        out[SKIPPED] = float(self.skipped)
        out.update({f"health/nonfinite_{m}": float(n) for m, n in self.nonfinite.items()})
        out.update({f"health/vanishing_{m}": float(n) for m, n in self.vanishing.items()})
        self.reset_epoch()
        return out

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def load(self, s: dict[str, Any] | None) -> None:
        if s:
            self.step, self.skipped_total, self.consecutive = s["step"], s["skipped_total"], s["consecutive"]
