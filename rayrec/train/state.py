"""What both training loops share besides their step functions: the checkpointed state, its
restore, mixed precision and small batch helpers.

``loop.fit`` (one optimizer, phases) and ``joint.fit_joint`` (one optimizer per module, stages)
keep their own step functions -- sharing the platform, not the loop -- but save, restore and
run mixed precision through this module, so the two cannot drift apart.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rayrec.config.loader import dump_job
from rayrec.config.schema import JobConfig
from rayrec.data.dataset import check_same_data, fingerprint_at
from rayrec.train.checkpoint import CheckpointError, rng_state, warn_config_diff

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

EPOCH = "epoch"


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on GPU when asked: bf16 where the GPU supports it, else fp16 (with
    ``grad_scaler``); a no-op on CPU."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """The loss scaler fp16 autocast needs (disabled, a pass-through, for bf16 and on CPU)."""
    fp16 = enabled and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler(enabled=fp16)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def copy_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's weights (the best epoch's, kept while training goes on)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def fmt_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != EPOCH)


@dataclass
class TrainState:
    """Progress both loops checkpoint: epochs and optimizer steps done, early stopping, the best
    weights and the per-epoch metric history. Each loop adds its own fields in a subclass."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    stopper: dict[str, Any] = field(default_factory=dict)  # EarlyStopping.state_dict() (run level)
    best_model: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def checkpoint(self, model: nn.Module, cfg: JobConfig, **loop_state: Any) -> dict[str, Any]:
        """The checkpoint dict: the shared keys, then the loop's own (``loop_state``)."""
        return {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "best_model": self.best_model,
            "rng": rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "early_stopping": self.stopper,
            "history": self.history,
            "config": dump_job(cfg),
            "data": fingerprint_at(cfg.data.path),  # resuming or evaluating on other data is refused
            **loop_state,
        }

    @staticmethod
    def shared_fields(state: dict[str, Any]) -> dict[str, Any]:
        """The shared fields of a loaded checkpoint, as keyword arguments of a ``TrainState``."""
        return {"epoch": state["epoch"], "step": state["step"], "stopper": state["early_stopping"],
                "best_model": state["best_model"], "history": list(state.get("history", []))}


def load_weights(state: dict[str, Any], model: nn.Module, cfg: JobConfig, where: str = "the checkpoint") -> None:
    """The first step of every restore: the same data, say what changed in the config, then load the weights."""
    check_same_data(state.get("data"), cfg.data.path, where)
    warn_config_diff(state["config"], dump_job(cfg))
    load_model_weights(model, state["model"], where)


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict``; a model of another shape (e.g. another ``model.hidden``) is one line naming it."""
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} there, {tuple(own[k].shape)} here" for k, v in weights.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise CheckpointError(f"{where} holds a model of another size ({'; '.join(wrong[:2])}"
                              f"{'; ...' if len(wrong) > 2 else ''}): use the model settings it was trained with, "
                              "or start a new run (another run.name) instead of resuming it")
    model.load_state_dict(weights)
