"""Multi-loss training strategies of the joint model, chosen by name in a stage's YAML.

Three roles, composed by ``StrategySet`` for one stage:

- schedule (at most one): which module trains this step -- ``fixed_alternating``,
  ``adaptive_alternating``; without one, every trainable module trains every step;
- weighting (at most one): how the main losses add up -- ``uncertainty``, ``dwa``,
  ``curriculum``; without one, a plain sum;
- auxiliary losses (any): ``memory_bank`` (contrastive), ``distillation`` (two-way KD).

Builders live in the plain dict ``STRATEGIES``; each takes its config and a ``StageContext``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rayrec.config.joint import MODULES, SCHEDULES, WEIGHTINGS, StageConfig
from rayrec.strategies.alternating import AdaptiveAlternating, FixedAlternating
from rayrec.strategies.contrastive import MemoryBank
from rayrec.strategies.distillation import Distillation
from rayrec.strategies.set import StrategySet
from rayrec.strategies.weighting import DWA, Curriculum, SumWeighting, Uncertainty


@dataclass(frozen=True)
class StageContext:
    """What builders may need: the stage, its main loss keys and the joint model's widths."""

    stage: str
    loss_keys: tuple[str, ...]
    user_dim: int  # SASRec hidden size
    item_dim: int  # retriever hidden size


STRATEGIES: dict[str, Callable[[Any, StageContext], Any]] = {
    "fixed_alternating": lambda cfg, ctx: FixedAlternating(cfg),
    "adaptive_alternating": lambda cfg, ctx: AdaptiveAlternating(cfg),
    "uncertainty": lambda cfg, ctx: Uncertainty(cfg, ctx.loss_keys),
    "dwa": lambda cfg, ctx: DWA(cfg, ctx.loss_keys),
    "curriculum": lambda cfg, ctx: Curriculum(cfg, ctx.loss_keys, ctx.stage),
    "memory_bank": lambda cfg, ctx: MemoryBank(cfg, ctx.user_dim, ctx.item_dim),
    "distillation": lambda cfg, ctx: Distillation(cfg),
}


def stage_loss_keys(stage: StageConfig) -> tuple[str, ...]:
    """Main losses of a stage: one per trainable module, plus ``fused`` in end_to_end."""
    flags = stage.trainable_flags
    keys = tuple(m for m in MODULES if flags[m])
    return keys + (("fused",) if stage.name == "end_to_end" and len(keys) == len(MODULES) else ())


def build_strategies(stage: StageConfig, *, user_dim: int, item_dim: int) -> StrategySet:
    """The ``StrategySet`` of one stage from its ``strategies:`` list."""
    ctx = StageContext(stage.name, stage_loss_keys(stage), user_dim, item_dim)
    schedule, weighting, aux = None, None, {}
    for cfg in stage.strategies:
        obj = STRATEGIES[cfg.name](cfg, ctx)
        if cfg.name in SCHEDULES:
            schedule = obj
        elif cfg.name in WEIGHTINGS:
            weighting = obj
        else:
            aux[cfg.name] = obj
    trainable = tuple(m for m in MODULES if stage.trainable_flags[m])
    return StrategySet(stage.name, trainable, ctx.loss_keys, schedule=schedule,
                       weighting=weighting or SumWeighting(ctx.loss_keys), aux=aux)


__all__ = ["STRATEGIES", "AdaptiveAlternating", "Curriculum", "DWA", "Distillation", "FixedAlternating",
           "MemoryBank", "StageContext", "StrategySet", "SumWeighting", "Uncertainty", "build_strategies",
           "stage_loss_keys"]
