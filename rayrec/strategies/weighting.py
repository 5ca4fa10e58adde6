"""Loss weightings: how the main losses (sasrec, retriever, fused) of one step add up.

- ``SumWeighting``: plain sum (the default).
- ``Uncertainty`` (Kendall, Gal & Cipolla 2018): ``exp(-s_k) L_k + s_k / 2`` with a learnable
  log-variance ``s_k`` per loss. The ``s_k`` are parameters of this module, so they move
  to the device with it and are optimised (the joint loop puts them in an optimizer).
- ``DWA`` (Liu, Johns & Davison 2019): ``w_k = K softmax_k(r_k / T)``, ``r_k`` the ratio of
  the last two epoch-averaged losses; 1 for the first two epochs.
- ``Curriculum``: fixed weights per phase of epochs within the stage.

Each ``combine(losses)`` sums over the keys present in ``losses`` (under alternation only
the trained module's loss is there), weighting each by its current weight.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rayrec.config.joint import CurriculumConfig, DWAConfig, UncertaintyConfig
from rayrec.errors import ConfigError


class SumWeighting(nn.Module):
    """Every loss with weight 1."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.keys = keys

    def weight(self, key: str) -> float:
        return 1.0

    def combine(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weight(k) * v for k, v in losses.items())

    def start_epoch(self, epoch: int) -> None:
        """Called with the epoch number within the stage (1-based) before it starts."""

    def end_epoch(self, means: dict[str, float]) -> None:
        """Called with the epoch's mean of each main loss (averaged over workers)."""

    def stats(self) -> dict[str, float]:
        return {f"strategy/weight_{k}": self.weight(k) for k in self.keys}

    def get_extra_state(self) -> dict[str, Any]:
        return {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pass


class Uncertainty(SumWeighting):
    """Homoscedastic-uncertainty weighting with learnable log-variances (one per loss key)."""

    def __init__(self, cfg: UncertaintyConfig, keys: tuple[str, ...]) -> None:
        super().__init__(keys)
        self.lr = cfg.lr
        self.log_vars = nn.ParameterDict({k: nn.Parameter(torch.tensor(float(cfg.init_log_var))) for k in keys})

    def weight(self, key: str) -> float:
        return float(torch.exp(-self.log_vars[key].detach()))

    def combine(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_k exp(-s_k) L_k + s_k / 2: the optimum s_k = log(2 L_k) weighs each loss by 1/(2 L_k)."""
        return sum(torch.exp(-self.log_vars[k]) * v + 0.5 * self.log_vars[k] for k, v in losses.items())

    def stats(self) -> dict[str, float]:
        out = super().stats()
        out.update({f"strategy/log_var_{k}": float(v.detach()) for k, v in self.log_vars.items()})
        return out


class DWA(SumWeighting):
    """Dynamic weight averaging from the last two epochs' mean losses, temperature T."""

    def __init__(self, cfg: DWAConfig, keys: tuple[str, ...]) -> None:
        super().__init__(keys)
        self.temperature = cfg.temperature
        self.history: list[dict[str, float]] = []  # epoch means, the last two kept
        self.weights = dict.fromkeys(keys, 1.0)

    def weight(self, key: str) -> float:
        return self.weights[key]

    def end_epoch(self, means: dict[str, float]) -> None:
        # a loss not trained this epoch (alternation) keeps its previous mean
        last = self.history[-1] if self.history else {}
        self.history = [*self.history[-1:], {k: means.get(k, last.get(k, math.nan)) for k in self.keys}]
        self.weights = dwa_weights(self.history, self.keys, self.temperature)

    def get_extra_state(self) -> dict[str, Any]:
        return {"history": self.history, "weights": self.weights}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.history, self.weights = list(state["history"]), dict(state["weights"])


def dwa_weights(history: list[dict[str, float]], keys: tuple[str, ...], temperature: float) -> dict[str, float]:
    """w_k = K exp(r_k / T) / sum_j exp(r_j / T), r_k = L_k(t-1) / L_k(t-2); 1s until two epochs exist."""
    if len(history) < 2 or any(not math.isfinite(h[k]) or h[k] <= 0 for h in history[-2:] for k in keys):
        return dict.fromkeys(keys, 1.0)
    ratios = {k: history[-1][k] / history[-2][k] for k in keys}
    top = max(r / temperature for r in ratios.values())
    exp = {k: math.exp(r / temperature - top) for k, r in ratios.items()}
    norm = sum(exp.values())
    return {k: len(keys) * e / norm for k, e in exp.items()}


class Curriculum(SumWeighting):
    """Per-phase loss weights by epoch within the stage; the last phase holds afterwards."""

    def __init__(self, cfg: CurriculumConfig, keys: tuple[str, ...], stage: str) -> None:
        super().__init__(keys)
        for phase in cfg.phases:
            unknown = sorted(set(phase.weights) - set(keys))
            if unknown:
                raise ConfigError(f"stage {stage}: curriculum weights name {unknown}, but this stage's losses are "
                                  f"{list(keys)} (fused exists only in end_to_end)")
        self.phases = [(p.until_epoch, dict(p.weights)) for p in cfg.phases]
        self.epoch = 1

    def weight(self, key: str) -> float:
        weights = next((w for end, w in self.phases if self.epoch <= end), self.phases[-1][1])
        return weights.get(key, 0.0)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def get_extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
