"""Progressive phases for any model: trainable parameters, param groups, LR schedule and loss weights.

A run is a sequence of phases (``train.phases``; without any, one phase over all epochs).
Entering a phase sets which parameters train, rebuilds the optimizer's param groups (Adam's
moments of the parameters that keep training are carried over; frozen ones leave the
optimizer, so they neither step nor decay) and starts the phase's LR schedule.

Scheduler semantics (the same in the joint loop):

- a step is an optimizer step (after gradient accumulation; a skipped NaN step is none);
- a phase's cosine is sized for the phase's own steps and ends at 0 on its last step;
- warmup belongs to the run: a phase that starts after ``done`` steps continues the run's
  ramp at ``(done + 1) / warmup_steps`` (nothing when ``done >= warmup_steps``), unless the phase
  sets its own ``warmup_steps``, a fresh ramp from its first step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rayrec.config.progressive import KLAnnealConfig, PhaseConfig
from rayrec.config.schema import JobConfig, OptimConfig
from rayrec.errors import ConfigError
from rayrec.train.groups import (
    Group,
    build_groups,
    carry_state,
    check_rules,
    make_grouped_optimizer,
    matches,
    no_decay_names,
)

log = logging.getLogger(__name__)

KL = "kl"  # the loss that KL annealing weighs
DEFAULT_LOSS = "rec"  # a model with one loss (``model.loss``) has this loss name
PHASE, KL_FACTOR = "phase", "train/kl_factor"


@dataclass(frozen=True)
class Phase:
    """A phase and the epochs (1-based, inclusive) it owns; ``cfg`` None for the implicit one."""

    index: int
    first: int
    last: int
    cfg: PhaseConfig | None = None

    @property
    def name(self) -> str:
        return self.cfg.name if self.cfg else "all"

    @property
    def epochs(self) -> int:
        return self.last - self.first + 1

    def weight(self, loss: str) -> float:
        return self.cfg.loss_weights.get(loss, 1.0) if self.cfg else 1.0


def plan_phases(phases: list[PhaseConfig], epochs: int) -> list[Phase]:
    if not phases:
        return [Phase(0, 1, epochs)]
    plans, first = [], 1
    for i, p in enumerate(phases):
        last = p.until_epoch if p.until_epoch is not None else epochs
        plans.append(Phase(i, first, last, p))
        first = last + 1
    return plans


def phase_of(plans: list[Phase], epoch: int) -> Phase:
    return next((p for p in plans if p.first <= epoch <= p.last), plans[-1])


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, done: int = 0) -> float:
    """LR factor after ``step`` steps of a phase of ``total`` steps that began ``done`` steps into a
    warmup of ``warmup`` steps: the rest of the linear ramp, then cosine to 0 at ``total`` (or constant)."""
    left = max(0, warmup - done)
    if step < left:
        return (done + step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - left) / max(1, total - left))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_schedule(opt: torch.optim.Optimizer, optim: OptimConfig, *, total: int, warmup: int, done: int = 0):
    """``LambdaLR`` of ``lr_factor``; ``total``/``warmup``/``done`` in this optimizer's own steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total=total, warmup=warmup, schedule=optim.schedule, done=done))


def warmup_of(optim: OptimConfig, own: int | None, steps_done: int) -> tuple[int, int]:
    """(warmup, done) of a phase that starts after ``steps_done`` steps of the run (see module doc)."""
    return (own, 0) if own is not None else (optim.warmup_steps, steps_done)


def kl_factor(cfg: KLAnnealConfig, *, epoch: int, step: int) -> float:
    """Weight factor of the ``kl`` loss at ``epoch`` (1-based) / optimizer ``step`` (0-based)."""
    if cfg.schedule == "none":
        return 1.0
    t = epoch if cfg.unit == "epoch" else step
    if cfg.schedule == "linear":
        f = min(1.0, t / cfg.warmup)
    elif cfg.schedule == "cosine":
        f = 0.5 * (1.0 - math.cos(math.pi * min(1.0, t / cfg.warmup)))
    else:  # cyclical: ramp over `ratio` of each cycle of `warmup` units, then hold 1
        pos = (t % cfg.warmup) / cfg.warmup
        f = min(1.0, pos / cfg.ratio)
    return max(cfg.floor, f)


def loss_names(model: nn.Module) -> tuple[str, ...]:
    """The names of the losses ``model`` returns (``model.loss_names``; one ``rec`` loss by default)."""
    return tuple(getattr(model, "loss_names", (DEFAULT_LOSS,)))


def model_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Named losses of a batch: ``model.losses(batch)`` when defined, else ``{"rec": model.loss(batch)}``."""
    if hasattr(model, "losses"):
        return model.losses(batch)
    return {DEFAULT_LOSS: model.loss(batch)}


class PhaseRunner:
    """The optimizer, schedule, trainable flags and loss weights of the current phase."""

    def __init__(self, model: nn.Module, cfg: JobConfig, steps_per_epoch: int) -> None:
        self.model, self.cfg, self.spe = model, cfg, max(1, steps_per_epoch)
        self.plans = plan_phases(cfg.train.phases, cfg.train.epochs)
        self.base = {n: p.requires_grad for n, p in model.named_parameters()}  # what the model itself trains
        self.no_decay = no_decay_names(model)
        self.phase: Phase | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.sched = None
        self.groups: list[Group] = []
        self.start_step = 0  # run steps done when the phase began
        self._check_names()
        self._check_plans()

    def _check_plans(self) -> None:
        """Every phase's patterns and groups, checked before the first step (then the flags are restored)."""
        check_rules(self.cfg.train.optim.groups, self.model, skip=self.names_disabled)
        for phase in self.plans:
            self.build_groups(phase)
            if phase.epochs < 1:
                raise ConfigError(f"train.phases[{phase.index}] ({phase.name}) has no epochs "
                                  f"({phase.first}-{phase.last}); drop it or move the previous until_epoch")
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.base[n])

    def _check_names(self) -> None:
        names = set(getattr(self.model, "all_loss_names", loss_names(self.model)))  # a switched-off module's too
        for i, p in enumerate(self.cfg.train.phases):
            unknown = sorted(set(p.loss_weights) - names)
            if unknown:
                raise ConfigError(f"train.phases[{i}] ({p.name}).loss_weights: {unknown} are not losses of model "
                                  f"{self.cfg.model.name}; its losses are {sorted(names)}")

    def names_disabled(self, pattern: str) -> bool:
        """``pattern`` names a module the model's config switched off (it then matches nothing, by design)."""
        return pattern.split(".")[0].rstrip("*") in getattr(self.model, "disabled_modules", ())

    def rules(self, phase: Phase):
        """Multiplier rules of ``phase`` then ``train.optim.groups``, without those of switched-off modules."""
        rules = [*(phase.cfg.groups if phase.cfg else []), *self.cfg.train.optim.groups]
        return [r for r in rules if not self.names_disabled(r.pattern)]

    def phase_of(self, epoch: int) -> Phase:
        return phase_of(self.plans, epoch)

    def trainable(self, phase: Phase) -> dict[str, bool]:
        """Each parameter's flag in ``phase``: the model's own, then ``trainable``, then ``freeze``."""
        flags = dict(self.base)
        if phase.cfg is None:
            return flags
        where = f"train.phases[{phase.index}] ({phase.name})"
        for key, pats in (("trainable", phase.cfg.trainable or []), ("freeze", phase.cfg.freeze)):
            for pat in pats:
                if not any(matches(n, pat) for n in flags) and not self.names_disabled(pat):
                    raise ConfigError(f"{where}.{key}: '{pat}' matches no parameter; names look like "
                                      f"{list(flags)[:4]}")
        for n in flags:
            if phase.cfg.trainable is not None:
                flags[n] = flags[n] and any(matches(n, pat) for pat in phase.cfg.trainable)
            if any(matches(n, pat) for pat in phase.cfg.freeze):
                flags[n] = False
        return flags

    def build_groups(self, phase: Phase) -> list[Group]:
        flags = self.trainable(phase)
        for n, p in self.model.named_parameters():
            p.requires_grad_(flags[n])
        rules = self.rules(phase)
        own = [r for r in (phase.cfg.groups if phase.cfg else []) if not self.names_disabled(r.pattern)]
        where = f"train.phases[{phase.index}] ({phase.name}).groups" if phase.cfg else "train.optim.groups"
        groups = build_groups(self.model.named_parameters(), self.cfg.train.optim, rules=rules,
                              lr_mult=phase.cfg.lr_mult if phase.cfg else 1.0, no_decay=self.no_decay, where=where,
                              required=len(own))
        if not groups:
            raise ConfigError(f"train.phases[{phase.index}] ({phase.name}) trains no parameter")
        return groups

    def enter(self, phase: Phase, steps_done: int, *, resumed: bool = False) -> None:
        """Start ``phase`` after ``steps_done`` optimizer steps of the run (or rebuild it to resume)."""
        self.groups = self.build_groups(phase)
        opt = make_grouped_optimizer(self.groups, self.cfg.train.optim)
        kept = carry_state(self.opt, opt)
        total = phase.epochs * self.spe
        warmup, done = warmup_of(self.cfg.train.optim, phase.cfg.warmup_steps if phase.cfg else None, steps_done)
        self.sched = make_schedule(opt, self.cfg.train.optim, total=total, warmup=warmup, done=done)
        self.opt, self.phase, self.start_step = opt, phase, steps_done
        if len(self.plans) > 1 and not resumed:
            frozen = sum(1 for p in self.model.parameters() if not p.requires_grad)
            log.info("phase %d/%d %s begins (epochs %d-%d): %d param groups, %d frozen tensors, "
                     "lr x%g, loss weights %s; Adam state kept for %d tensors", phase.index + 1, len(self.plans),
                     phase.name, phase.first, phase.last, len(self.groups), frozen,
                     phase.cfg.lr_mult if phase.cfg else 1.0, phase.cfg.loss_weights if phase.cfg else {}, kept)

    def state(self) -> dict[str, Any]:
        return {"index": self.phase.index if self.phase else 0, "start_step": self.start_step}

    def total(self, parts: dict[str, torch.Tensor], *, epoch: int, step: int) -> torch.Tensor:
        """The phase-weighted sum of the losses (``kl`` also times its annealing factor)."""
        total = None
        for name, value in parts.items():
            w = self.phase.weight(name) if self.phase else 1.0
            if name == KL:
                w *= kl_factor(self.cfg.train.kl_anneal, epoch=epoch, step=step)
            term = value * w
            total = term if total is None else total + term
        return total

    def metrics(self, epoch: int, step: int, names: set[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        if len(self.plans) > 1:
            out[PHASE] = float(self.phase.index + 1)
        if KL in names:
            out[KL_FACTOR] = kl_factor(self.cfg.train.kl_anneal, epoch=epoch, step=step)
        return out


def group_plan(cfg: JobConfig, model: nn.Module):
    """(title, groups, frozen names) per phase of ``train.phases`` (one phase without any)."""
    runner = PhaseRunner(model, cfg, 1)
    for phase in runner.plans:
        groups = runner.build_groups(phase)
        title = f"phase {phase.index + 1}/{len(runner.plans)} {phase.name} (epochs {phase.first}-{phase.last})"
        if phase.cfg is not None:
            title += f", lr x{phase.cfg.lr_mult:g}, loss weights {phase.cfg.loss_weights or 'all 1'}"
        yield title, groups, [n for n, p in model.named_parameters() if not p.requires_grad]
