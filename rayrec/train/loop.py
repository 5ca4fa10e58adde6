"""The framework-free training loop: fit, evaluate, early stopping, best weights.

It runs in a plain Python process. Ray enters only through the arguments:
``Batches`` (where batches come from), ``reduce`` (how sums cross workers) and
``Reporter`` (what happens at the end of an epoch: ``ray.train.report`` or a
local checkpoint folder).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn

from rayrec.config.loader import dump_job
from rayrec.config.schema import EarlyStopConfig, JobConfig, OptimConfig
from rayrec.eval.metrics import MetricSums, full_ranks, parse_eval_mode, sample_negatives, sampled_ranks
from rayrec.train.checkpoint import MID_EPOCH_STEP, rng_state, set_rng_state, warn_config_diff

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

# Metric names of the training loop (validation/test names come from rayrec.eval.metrics).
TRAIN_LOSS, TRAIN_LR, TRAIN_GRAD_NORM, TRAIN_THROUGHPUT = "train/loss", "train/lr", "train/grad_norm", "train/seqs_per_s"
EPOCH = "epoch"


class Batches(Protocol):
    """Where a worker's batches come from; ``epoch`` seeds shuffling and negatives."""

    def train(self, epoch: int) -> Iterable[Batch]: ...
    def valid(self) -> Iterable[Batch]: ...
    def test(self) -> Iterable[Batch]: ...


class Reporter(Protocol):
    """End-of-epoch hook: record metrics and (when given) the checkpoint state."""

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None: ...


class LossModule(nn.Module):
    """Wraps a model so that ``forward(batch)`` returns its loss.

    DDP synchronises gradients only for computations that go through the wrapped
    module's ``forward``; calling ``model.loss`` directly would skip it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model.loss(batch)


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


def make_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for ``warmup_steps``, then cosine decay to 0 (or constant)."""
    warmup = cfg.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPU when asked (and supported); a no-op on CPU."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class EpochStats:
    loss: float
    grad_norm: float
    lr: float
    seqs: int
    seconds: float
    steps: int


def train_epoch(
    module: nn.Module, batches: Iterable[Batch], opt: torch.optim.Optimizer, sched, cfg: JobConfig,
    device: torch.device, *, progress: Callable[[Iterable], Iterable] = lambda x: x,
    skip: int = 0, on_step: Callable[[int, int], None] | None = None,
) -> EpochStats:
    """One pass over the worker's batches with gradient accumulation and clipping.

    ``skip``: micro-batches of this epoch trained before a mid-epoch resume. They are read
    again (same seed, so same order) but not trained on, so the epoch continues where the
    checkpoint left it. ``on_step(batches_done, steps_done)`` runs after each optimizer step.
    """
    module.train()
    accum, clip = cfg.train.grad_accum, cfg.train.optim.grad_clip
    scaler = torch.amp.GradScaler(enabled=cfg.train.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported())
    total, count, seqs, steps, norm_sum = 0.0, 0, 0, 0, 0.0
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(progress(batches), start=1):
        if i <= skip:
            continue
        batch = _to(batch, device)
        with autocast(device, cfg.train.amp):
            loss = module(batch)
        scaler.scale(loss / accum).backward()
        total, count, seqs = total + loss.item(), count + 1, seqs + batch["input_ids"].shape[0]
        if i % accum == 0:
            norm_sum += _step(module, opt, sched, scaler, clip)
            steps += 1
            if on_step is not None:
                on_step(i, steps)
    if count % accum:
        norm_sum += _step(module, opt, sched, scaler, clip)
        steps += 1
    loss = total / count if count else float("nan")  # nan: resumed after the epoch's last batch
    return EpochStats(loss, norm_sum / max(1, steps), sched.get_last_lr()[0],
                      seqs, time.perf_counter() - start, steps)


def _step(module: nn.Module, opt, sched, scaler, clip: float | None) -> float:
    scaler.unscale_(opt)
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
    scaler.step(opt)
    scaler.update()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


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


@torch.no_grad()
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
        batch = _to(batch, device)
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


@dataclass
class FitState:
    """Everything a checkpoint restores."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch: int = 0  # micro-batches of epoch + 1 already trained (a mid-epoch checkpoint)
    stopper: dict[str, Any] = field(default_factory=dict)
    best_model: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def fit(
    module: nn.Module, model: nn.Module, batches: Batches, cfg: JobConfig, *, num_items: int,
    device: torch.device, reporter: Reporter, resume: dict[str, Any] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, world_size: int = 1,
    progress: Callable[..., Iterable] | None = None, steps_per_epoch: int | None = None,
) -> dict[str, float]:
    """Train ``module`` (the possibly-DDP-wrapped ``LossModule``), validate every epoch,
    stop early, then evaluate the best weights on test. Returns the final metrics.

    ``model`` is the unwrapped model (used for ``score``); ``resume`` a loaded checkpoint.
    """
    opt = make_optimizer(module.parameters(), cfg.train.optim)
    total_steps = cfg.train.epochs * max(1, steps_per_epoch or 1)
    sched = make_scheduler(opt, cfg.train.optim, total_steps)
    stopper = EarlyStopping(cfg.train.early_stopping)
    st = FitState()
    if resume is not None:
        st = _restore(resume, model, opt, sched, stopper, cfg)
    for epoch in range(st.epoch + 1, cfg.train.epochs + 1):
        if stopper.should_stop:
            break
        wrap = partial(progress, epoch=epoch) if progress else (lambda it: it)
        on_step = _mid_epoch_checkpoints(st, epoch, model, opt, sched, cfg, reporter)
        stats = train_epoch(module, batches.train(epoch), opt, sched, cfg, device, progress=wrap,
                            skip=st.batch, on_step=on_step)
        metrics = _epoch_metrics(stats, epoch, world_size)
        metrics.update(evaluate(model, batches.valid(), cfg, num_items, device, prefix="val/", reduce=reduce))
        if stopper.update(metrics, epoch):
            st.best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        st.epoch, st.step, st.batch = epoch, st.step + stats.steps, 0
        st.stopper = stopper.state_dict()
        metrics[f"best/{cfg.train.early_stopping.metric}"] = float(stopper.best)
        st.history.append(metrics)
        reporter.report(metrics, _state(st, model, opt, sched, cfg))
        log.debug("epoch %d: %s", epoch, _fmt(metrics))  # the console shows rank 0's line (reporter)
    return _final_test(model, st, batches, cfg, num_items, device, reduce, stopper, reporter, opt, sched)


def _mid_epoch_checkpoints(st: FitState, epoch: int, model, opt, sched, cfg: JobConfig,
                           reporter: Reporter) -> Callable[[int, int], None] | None:
    """Hook for ``train_epoch`` that reports a checkpoint every ``run.checkpoint.every_n_steps``
    optimizer steps (counted over the whole run), or None when that is off.

    The report carries only ``epoch`` (the one in progress) and ``MID_EPOCH_STEP``; reporters
    keep these out of the per-epoch metric history.
    """
    every = cfg.run.checkpoint.every_n_steps
    if not every:
        return None

    def on_step(batches_done: int, steps_done: int) -> None:
        step = st.step + steps_done
        if step % every == 0:
            snap = replace(st, step=step, batch=batches_done)
            reporter.report({EPOCH: epoch, MID_EPOCH_STEP: step}, _state(snap, model, opt, sched, cfg))

    return on_step


def _epoch_metrics(stats: EpochStats, epoch: int, world_size: int) -> dict[str, float]:
    return {
        EPOCH: epoch,
        TRAIN_LOSS: stats.loss,
        TRAIN_LR: stats.lr,
        TRAIN_GRAD_NORM: stats.grad_norm,
        TRAIN_THROUGHPUT: stats.seqs * world_size / max(stats.seconds, 1e-9),
    }


def _final_test(model, st: FitState, batches: Batches, cfg: JobConfig, num_items: int, device, reduce,
                stopper: EarlyStopping, reporter: Reporter, opt, sched) -> dict[str, float]:
    """Load the best weights, evaluate test once, and report it with a final checkpoint
    (its ``model`` and ``best_model`` are then both the best weights)."""
    if st.best_model is not None:
        model.load_state_dict(st.best_model)
    final = evaluate(model, batches.test(), cfg, num_items, device, prefix="test/", reduce=reduce)
    final.update({EPOCH: st.epoch, "best_epoch": stopper.best_epoch,
                  f"best/{cfg.train.early_stopping.metric}": float(stopper.best) if stopper.best is not None else float("nan"),
                  "stopped_early": float(stopper.should_stop and st.epoch < cfg.train.epochs)})
    reporter.report(final, _state(st, model, opt, sched, cfg))
    log.debug("test (best epoch %d): %s", stopper.best_epoch, _fmt(final))
    return final


def _state(st: FitState, model: nn.Module, opt, sched, cfg: JobConfig) -> dict[str, Any]:
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "best_model": st.best_model,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": rng_state(),
        "epoch": st.epoch,
        "step": st.step,
        "epoch_batch": st.batch,
        "early_stopping": st.stopper,
        "history": st.history,
        "config": dump_job(cfg),
    }


def _restore(state: dict[str, Any], model: nn.Module, opt, sched, stopper: EarlyStopping, cfg: JobConfig) -> FitState:
    warn_config_diff(state["config"], dump_job(cfg))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    stopper.load_state_dict(state["early_stopping"])
    set_rng_state(state["rng"])
    batch = int(state.get("epoch_batch", 0))
    log.info("resumed after epoch %d (step %d%s)", state["epoch"], state["step"],
             f", {batch} batches into epoch {state['epoch'] + 1}" if batch else "")
    return FitState(epoch=state["epoch"], step=state["step"], batch=batch, stopper=state["early_stopping"],
                    best_model=state["best_model"], history=list(state.get("history", [])))


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != EPOCH)

