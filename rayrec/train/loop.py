"""The framework-free training loop of one optimizer: fit by phases, early stopping, best weights.

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
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn

from rayrec import stopping
from rayrec.config.schema import JobConfig, OptimConfig
from rayrec.errors import ConfigError
from rayrec.train.checkpoint import MID_EPOCH_STEP, set_rng_state
from rayrec.train.evaluation import EarlyStopping, evaluate, final_test
from rayrec.train.health import GradHealth
from rayrec.train.phases import PhaseRunner, loss_names, make_schedule, model_losses
from rayrec.train.state import (
    EPOCH,
    Batch,
    TrainState,
    autocast,
    copy_weights,
    fmt_metrics,
    grad_scaler,
    load_weights,
    to_device,
)

log = logging.getLogger(__name__)

# Metric names of the training loop (validation/test names come from rayrec.eval.metrics).
TRAIN_LOSS, TRAIN_LR, TRAIN_GRAD_NORM, TRAIN_THROUGHPUT = "train/loss", "train/lr", "train/grad_norm", "train/seqs_per_s"


class Batches(Protocol):
    """Where a worker's batches come from; ``epoch`` seeds shuffling and negatives."""

    def train(self, epoch: int) -> Iterable[Batch]: ...
    def valid(self) -> Iterable[Batch]: ...
    def test(self) -> Iterable[Batch]: ...


class Reporter(Protocol):
    """End-of-epoch hook: record metrics and (when given) the checkpoint state."""

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None: ...

    # optional: ``log_step(metrics, step)`` logs metrics on the optimizer-step axis (gradient health)


class LossModule(nn.Module):
    """Wraps a model so that ``forward(batch)`` returns its named losses (``phases.model_losses``).

    DDP synchronises gradients only for computations that go through the wrapped
    module's ``forward``; calling ``model.loss`` directly would skip it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return model_losses(self.model, batch)


def make_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, *,
                   warmup: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup (``warmup``, default ``warmup_steps``), then cosine decay to 0 at ``total_steps`` (or constant)."""
    return make_schedule(opt, cfg, total=total_steps, warmup=cfg.warmup_steps if warmup is None else warmup)


@dataclass
class EpochStats:
    loss: float
    grad_norm: float
    lr: float
    seqs: int
    seconds: float
    steps: int
    parts: dict[str, float] = field(default_factory=dict)  # mean of each named loss (unweighted)


def train_epoch(
    module: nn.Module, batches: Iterable[Batch], run: PhaseRunner, health: GradHealth, cfg: JobConfig,
    device: torch.device, *, epoch: int = 1, step: int = 0, progress: Callable[[Iterable], Iterable] = lambda x: x,
    skip: int = 0, on_step: Callable[[int, int], None] | None = None,
) -> EpochStats:
    """One pass over the worker's batches with gradient accumulation, health checks and clipping.

    ``module(batch)`` returns the named losses; the phase weighs them (``run.total``).
    ``step``: optimizer steps of the run before this epoch (KL annealing by step).
    ``skip``: micro-batches of this epoch trained before a mid-epoch resume. They are read
    again (same seed, so same order) but not trained on, so the epoch continues where the
    checkpoint left it. ``on_step(batches_done, steps_done)`` runs after each optimizer step.
    A micro-batch whose loss is NaN/Inf is left out of the epoch's mean loss; its step is
    skipped by the health check.
    """
    module.train()
    accum, clip = cfg.train.grad_accum, cfg.train.optim.grad_clip
    scaler = grad_scaler(device, cfg.train.amp)
    total, count, seqs, steps, norm_sum, pending = 0.0, 0, 0, 0, 0.0, 0
    sums: dict[str, float] = {}
    start = time.perf_counter()
    run.opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(progress(batches), start=1):
        if i <= skip:
            continue
        if pending == 0:
            stopping.check()  # a signal stops the run here, between optimizer steps
        batch = to_device(batch, device)
        with autocast(device, cfg.train.amp):
            parts = module(batch)
            loss = run.total(parts, epoch=epoch, step=step + steps)
        scaler.scale(loss / accum).backward()
        pending, seqs = pending + 1, seqs + batch["input_ids"].shape[0]
        value = loss.item()
        if math.isfinite(value):
            total, count = total + value, count + 1
            if len(parts) > 1:
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
        if i % accum == 0:
            pending = 0
            if _step(run, health, scaler, clip):
                norm_sum, steps = norm_sum + health.last_norm, steps + 1
                if on_step is not None:
                    on_step(i, steps)
    if pending:
        rescale_grads(module.parameters(), accum / pending)  # a short last step: a mean over its own batches
        if _step(run, health, scaler, clip):
            norm_sum, steps = norm_sum + health.last_norm, steps + 1
    loss = total / count if count else float("nan")  # nan: resumed after the epoch's last batch
    base_lr = run.sched.get_last_lr()[0] / run.groups[0].lr_mult  # without the first group's multiplier
    return EpochStats(loss, norm_sum / max(1, steps), base_lr,
                      seqs, time.perf_counter() - start, steps, {k: v / max(1, count) for k, v in sums.items()})


def _step(run: PhaseRunner, health: GradHealth, scaler, clip: float | None) -> bool:
    """Check and clip the final gradients, then step (or skip); False when the step was skipped."""
    opt = run.opt
    scaler.unscale_(opt)
    ok = health.check(clip, tolerate=scaler.is_enabled())
    if scaler.is_enabled():  # fp16: the scaler skips an overflowing step itself and lowers its scale
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        ok = scaler.get_scale() >= scale
        if not ok:
            health.scaler_skipped()
    elif ok:
        opt.step()
    if ok:
        run.sched.step()
    opt.zero_grad(set_to_none=True)
    return ok


@torch.no_grad()
def rescale_grads(params: Iterable[nn.Parameter], factor: float) -> None:
    """Multiply every gradient by ``factor`` (a no-op at 1)."""
    if factor != 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)


@dataclass
class FitState(TrainState):
    """The shared progress, and how far into the next epoch a mid-epoch checkpoint is."""

    batch: int = 0  # micro-batches of epoch + 1 already trained (a mid-epoch checkpoint)


def fit(
    module: nn.Module, model: nn.Module, batches: Batches, cfg: JobConfig, *, num_items: int,
    device: torch.device, reporter: Reporter, resume: dict[str, Any] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, world_size: int = 1,
    progress: Callable[..., Iterable] | None = None, steps_per_epoch: int | None = None,
) -> dict[str, float]:
    """Train ``module`` (the possibly-DDP-wrapped ``LossModule``) phase by phase, validate every
    epoch, stop early, then evaluate the best weights on test. Returns the final metrics.

    ``model`` is the unwrapped model (used for ``score``); ``resume`` a loaded checkpoint.
    """
    run = PhaseRunner(model, cfg, steps_per_epoch or 1)
    health = GradHealth(model.named_parameters(), cfg.train.health, log_step=getattr(reporter, "log_step", None))
    stopper = EarlyStopping(cfg.train.early_stopping)
    st = FitState()
    if resume is not None:
        st = _restore(resume, model, run, health, stopper, cfg)
    for epoch in range(st.epoch + 1, cfg.train.epochs + 1):
        if stopper.should_stop:
            break
        phase = run.phase_of(epoch)
        if run.phase is None or run.phase.index != phase.index:
            run.enter(phase, st.step)
        wrap = partial(progress, epoch=epoch) if progress else (lambda it: it)
        on_step = _mid_epoch_checkpoints(st, epoch, model, run, health, cfg, reporter)
        stats = train_epoch(module, batches.train(epoch), run, health, cfg, device, epoch=epoch, step=st.step,
                            progress=wrap, skip=st.batch, on_step=on_step)
        metrics = _epoch_metrics(stats, epoch, world_size)
        metrics.update(run.metrics(epoch, st.step + stats.steps, set(loss_names(model))))
        metrics.update(health.epoch_metrics())
        metrics.update(evaluate(model, batches.valid(), cfg, num_items, device, prefix="val/", reduce=reduce))
        if stopper.update(metrics, epoch):
            st.best_model = copy_weights(model)
        st.epoch, st.step, st.batch = epoch, st.step + stats.steps, 0
        st.stopper = stopper.state_dict()
        metrics[f"best/{cfg.train.early_stopping.metric}"] = float(stopper.best)
        st.history.append(metrics)
        reporter.report(metrics, _state(st, model, run, health, cfg))
        log.debug("epoch %d: %s", epoch, fmt_metrics(metrics))  # the console shows rank 0's line (reporter)
    return _final_test(model, st, batches, cfg, num_items, device, reduce, stopper, reporter, run, health)


def _mid_epoch_checkpoints(st: FitState, epoch: int, model, run: PhaseRunner, health: GradHealth, cfg: JobConfig,
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
            reporter.report({EPOCH: epoch, MID_EPOCH_STEP: step}, _state(snap, model, run, health, cfg))

    return on_step


def _epoch_metrics(stats: EpochStats, epoch: int, world_size: int) -> dict[str, float]:
    return {
        EPOCH: epoch,
        TRAIN_LOSS: stats.loss,
        **{f"train/loss_{k}": v for k, v in stats.parts.items()},
        TRAIN_LR: stats.lr,
        TRAIN_GRAD_NORM: stats.grad_norm,
        TRAIN_THROUGHPUT: stats.seqs * world_size / max(stats.seconds, 1e-9),
    }


def _final_test(model, st: FitState, batches: Batches, cfg: JobConfig, num_items: int, device, reduce,
                stopper: EarlyStopping, reporter: Reporter, run: PhaseRunner, health: GradHealth) -> dict[str, float]:
    """Load the best weights, evaluate test once, and report it with a final checkpoint
    (its ``model`` and ``best_model`` are then both the best weights)."""
    if st.best_model is not None:
        model.load_state_dict(st.best_model)
    final = final_test(model, batches.test(), cfg, num_items, device, reduce, epoch=st.epoch, stopper=stopper,
                       stopped_early=stopper.should_stop and st.epoch < cfg.train.epochs,
                       skipped_steps=health.skipped_total)
    reporter.report(final, _state(st, model, run, health, cfg))
    log.debug("test (best epoch %d): %s", stopper.best_epoch, fmt_metrics(final))
    return final


def _state(st: FitState, model: nn.Module, run: PhaseRunner, health: GradHealth, cfg: JobConfig) -> dict[str, Any]:
    return st.checkpoint(model, cfg, optimizer=run.opt.state_dict() if run.opt is not None else None,
                         scheduler=run.sched.state_dict() if run.sched is not None else None,
                         phase=run.state(), health=health.state(), epoch_batch=st.batch)


def _restore(state: dict[str, Any], model: nn.Module, run: PhaseRunner, health: GradHealth, stopper: EarlyStopping,
             cfg: JobConfig) -> FitState:
    """Load a checkpoint: weights, the phase it was in (its param groups, optimizer and schedule), the rest."""
    load_weights(state, model, cfg)
    phase = state.get("phase") or {"index": 0, "start_step": 0}
    run.enter(run.plans[phase["index"]], phase["start_step"], resumed=True)
    try:
        run.opt.load_state_dict(state["optimizer"])
    except ValueError as e:  # param groups of another layout (another version, or other groups/phases)
        raise ConfigError(f"this checkpoint's optimizer has other param groups than the job builds ({e}); "
                          "train.optim.groups, train.phases or the rayrec version differ from the run that "
                          "wrote it: resume with those, or start a new run") from e
    run.sched.load_state_dict(state["scheduler"])
    health.load(state.get("health"))
    if state["early_stopping"]:
        stopper.load_state_dict(state["early_stopping"])
    set_rng_state(state["rng"])
    batch = int(state.get("epoch_batch", 0))
    log.info("resumed after epoch %d (step %d%s, phase %s)", state["epoch"], state["step"],
             f", {batch} batches into epoch {state['epoch'] + 1}" if batch else "", run.phase.name)
    return FitState(**TrainState.shared_fields(state), batch=batch)

