"""Validation and test: rank each row's target, early stopping on a validation metric, the final test.

Used by both training loops (``loop.fit``, ``joint.fit_joint``) and by ``rayrec eval``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rayrec.config.schema import EarlyStopConfig, JobConfig
from rayrec.eval.metrics import MetricSums, full_ranks, parse_eval_mode, sample_negatives, sampled_ranks
from rayrec.train.state import EPOCH, Batch, autocast, to_device


@dataclass
class EarlyStopping:
    """Tracks the best value of a validation metric and epochs without improvement."""

    cfg: EarlyStopConfig
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, metrics: dict[str, float], epoch: int) -> bool:
        """Record this epoch's metric; return True when it is a new best."""
        value = metrics[self.cfg.metric]
        better = self.best is None or (value > self.best if self.cfg.mode == "max" else value < self.best)
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.cfg.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = s["best"], s["best_epoch"], s["bad_epochs"]


def score_rows(model: nn.Module, batch: Batch, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of all items [B, N+1], or of ``candidates`` [B, C].

    Models that read more than the history (the joint model needs ``user_idx``) or can score
    candidates without scoring every item define ``score_batch(batch, candidates)``.
    """
    if hasattr(model, "score_batch"):
        return model.score_batch(batch, candidates)
    scores = model.score(batch["history"])
    return scores if candidates is None else scores.gather(1, candidates)


def eval_candidates(batch: Batch, seen: torch.Tensor | None, cfg: JobConfig, num_items: int, n_neg: int) -> torch.Tensor:
    """[target, n sampled negatives] per row  # -> [B, 1 + n]; seeded by the run seed and the batch's first user."""
    gen = torch.Generator(device="cpu").manual_seed(cfg.run.seed * 7919 + int(batch["user_idx"][0]))
    neg = sample_negatives(batch["target"].cpu(), seen.cpu() if seen is not None else None, num_items, n_neg, gen)
    return torch.cat([batch["target"][:, None], neg.to(batch["target"].device)], dim=1)


@torch.inference_mode()
def evaluate(
    model: nn.Module, batches: Iterable[Batch], cfg: JobConfig, num_items: int, device: torch.device,
    *, prefix: str, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    on_ranks: Callable[[Batch, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """Rank each row's target (full ranking or sampled negatives); metrics averaged over all workers.

    ``on_ranks(batch, ranks [B])`` sees every batch's 1-based target ranks (e.g. to break metrics down).
    """
    model.eval()
    ev = cfg.train.eval
    n_neg = parse_eval_mode(ev.mode)
    sums = MetricSums(ev.ks)
    for batch in batches:
        batch = to_device(batch, device)
        seen = batch["seen"] if ev.mask_seen else None
        if n_neg is None:
            with autocast(device, cfg.train.amp):
                scores = score_rows(model, batch).float()  # [B, N+1]
            ranks = full_ranks(scores, batch["target"], seen)
        else:
            cand = eval_candidates(batch, seen, cfg, num_items, n_neg)  # [B, 1 + n], target first
            with autocast(device, cfg.train.amp):
                scores = score_rows(model, batch, cand).float()  # [B, 1 + n]
            ranks = sampled_ranks(scores[:, 0], scores[:, 1:])
        sums.update(ranks)
        if on_ranks is not None:
            on_ranks(batch, ranks)
    total = MetricSums.from_tensor(reduce(sums.to_tensor()), ev.ks)
    return {**total.means(prefix), f"{prefix}rows": float(total.count)}  # rows: all workers together


def final_test(model: nn.Module, batches: Iterable[Batch], cfg: JobConfig, num_items: int, device: torch.device,
               reduce: Callable[[torch.Tensor], torch.Tensor], *, epoch: int, stopper: EarlyStopping,
               stopped_early: bool, skipped_steps: int) -> dict[str, float]:
    """Test metrics of the weights ``model`` holds now (the loop loaded its best), with the run's
    summary: epochs done, the best epoch and its validation value, early stop, skipped steps."""
    final = evaluate(model, batches, cfg, num_items, device, prefix="test/", reduce=reduce)
    best = float(stopper.best) if stopper.best is not None else float("nan")
    final.update({EPOCH: epoch, "best_epoch": stopper.best_epoch, f"best/{cfg.train.early_stopping.metric}": best,
                  "stopped_early": float(stopped_early), "health/skipped_steps_total": float(skipped_steps)})
    return final
