"""Schema of the progressive-training toolkit that every model's training uses.

- ``GroupRule``: a learning-rate and weight-decay multiplier for the parameters whose
  names match a pattern (``train.optim.groups``, and per phase);
- ``PhaseConfig``: a phase of epochs with its loss weights, frozen or trainable modules,
  multipliers and global LR factor (``train.phases``);
- ``HealthConfig``: gradient health checks of every optimizer step (``train.health``);
- ``KLAnnealConfig``: the weight of a loss named ``kl`` over time (``train.kl_anneal``).

Patterns are ``fnmatch`` patterns over parameter names as ``model.named_parameters()``
gives them (``item_emb.weight``, ``blocks.0.attn.qkv.bias``); a pattern that names a module
(``blocks.0``) also matches everything under it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rayrec.config.base import Strict


class GroupRule(Strict):
    """Multipliers for the parameters whose names match ``pattern`` (the first matching rule wins)."""

    pattern: str = Field(min_length=1, description="fnmatch pattern over parameter names, e.g. 'item_emb*' or 'vae.*'")
    lr_mult: float = Field(1.0, gt=0.0, description="learning rate = base lr x phase lr_mult x this")
    wd_mult: float = Field(1.0, ge=0.0, description="weight decay = base weight_decay x this")
    decay: bool | None = Field(
        None, description="weight decay on biases, norms and embeddings of this group too (true), on nothing "
        "(false); null = not on biases, norms and embeddings")


class HealthConfig(Strict):
    """Gradient health of every optimizer step (cheap: one norm per module, one sync)."""

    enabled: bool = Field(True, description="skip steps with NaN/Inf gradients, warn on vanishing ones, log norms")
    log_every: int = Field(50, ge=1, description="optimizer steps between per-module gradient-norm logs (MLflow)")
    max_bad_steps: int = Field(
        5, ge=1, description="consecutive skipped (NaN/Inf) steps after which the run stops with an error")
    vanish_below: float = Field(1e-7, ge=0.0, description="a trained module whose gradient norm is below this is "
                                "counted and warned about as vanishing")
    depth: int = Field(1, ge=1, description="parameter-name components that name a module in the statistics "
                       "(1: item_emb, blocks, ...; 2: blocks.0, ...)")


class KLAnnealConfig(Strict):
    """Weight of a loss named ``kl`` over time; the seed's ``min(1, epoch/20)`` is linear, warmup 20, unit epoch."""

    schedule: Literal["none", "linear", "cosine", "cyclical"] = Field(
        "none", description="none: factor 1; linear: min(1, t/warmup); cosine: a half cosine from 0 to 1 over "
        "warmup; cyclical: linear ramps that restart every `warmup` units (Fu et al. 2019)")
    warmup: int = Field(20, ge=1, description="units (epochs or optimizer steps) of the ramp, or of one cycle")
    unit: Literal["epoch", "step"] = Field("epoch", description="t counts epochs (from 1) or optimizer steps (from 0)")
    ratio: float = Field(0.5, gt=0.0, le=1.0, description="cyclical: share of each cycle spent ramping up")
    floor: float = Field(0.0, ge=0.0, le=1.0, description="smallest factor")


class PhaseConfig(Strict):
    """One phase of a progressive schedule: epochs ``previous until_epoch + 1 .. until_epoch``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", description="phase name (unique; in logs and overrides: "
                      "train.phases.NAME.lr_mult)")
    until_epoch: int | None = Field(None, ge=1, description="last epoch of the phase; null = to the end (last phase)")
    loss_weights: dict[str, float] = Field(
        default_factory=dict, description="weight per loss name (the model's losses); a loss not named keeps 1.0")
    freeze: list[str] = Field(default_factory=list, description="parameter-name patterns that do not train")
    trainable: list[str] | None = Field(
        None, description="if given, only parameters matching these patterns train (freeze still applies)")
    lr_mult: float = Field(1.0, gt=0.0, description="global learning-rate factor of the phase")
    groups: list[GroupRule] = Field(
        default_factory=list, description="multiplier rules of this phase, tried before train.optim.groups")
    warmup_steps: int | None = Field(
        None, ge=0, description="this phase's own warmup; null = the run's warmup continues where it is")

    @field_validator("loss_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if w < 0}
        if bad:
            raise ValueError(f"loss weights must be >= 0, got {bad}")
        return v


def check_phases(phases: list[PhaseConfig]) -> list[PhaseConfig]:
    """Ends strictly increasing; only the last phase may be open (until_epoch null); names unique."""
    ends = [p.until_epoch for p in phases]
    for i, end in enumerate(ends[:-1]):
        if end is None:
            raise ValueError(f"phase {i + 1} ({phases[i].name}) has no until_epoch; only the last phase may run to the end")
    closed = [e for e in ends if e is not None]
    if closed != sorted(set(closed)):
        raise ValueError(f"phases need strictly increasing until_epoch, got {ends}")
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ValueError(f"phase names must be unique, got {names}")
    return phases


class ProgressiveMixin(Strict):
    """Fields of ``train`` that the toolkit adds (kept here so the schema stays readable)."""

    phases: list[PhaseConfig] = Field(
        default_factory=list, description="progressive phases (any model but ur4rec, whose stages are its phases)")
    health: HealthConfig = Field(HealthConfig(), description="gradient health checks of every optimizer step")
    kl_anneal: KLAnnealConfig = Field(KLAnnealConfig(), description="the weight of a loss named kl over time")

    @model_validator(mode="after")
    def _phases(self) -> ProgressiveMixin:
        if self.phases:
            check_phases(self.phases)
        return self
