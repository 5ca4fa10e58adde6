"""Staged training of the joint (UR4Rec) model: the joint counterpart of ``loop.fit``.

It reuses the framework-free loop's pieces -- ``evaluate``, ``EarlyStopping``,
``make_optimizer``/``make_scheduler``, the checkpoint state and the ``Reporter`` -- and adds
what joint training needs:

- stages (``model.stages``), each setting *every* module's trainable flag explicitly (the
  seed left SASRec frozen after pretraining the retriever), with its own epochs, per-module
  learning rates, strategies and early stopping; the next stage starts from the best
  weights of the previous one, and each boundary is logged;
- one optimizer (param groups by ``train.optim.groups``) and LR schedule per module, stepped
  only when that module trains, and every gradient zeroed after every step (the seed let
  gradients pile up on the idle module). A module's schedule counts its own optimizer steps
  (after ``train.grad_accum`` micro-batches) and is sized for them: all of the stage's steps
  without alternation, its exact share under ``fixed_alternating``, and under
  ``adaptive_alternating`` its share so far, re-estimated every epoch, so it ends near 0.
  Warmup belongs to the run: a stage continues each module's warmup unless it sets its own;
- gradient health (``rayrec.train.health``): a step with NaN/Inf gradients is skipped on
  every worker (no optimizer, schedule or strategy sees it);
- no DDP wrapper: alternation changes which parameters train from step to step, which DDP
  cannot follow, so workers average the trained parameters' gradients with one all-reduce
  (``sync_grads``; a parameter no worker has a gradient for stays without one, so its
  optimizer leaves it and its state untouched) and average each step's losses (``reduce``) so every worker's strategy
  makes the same decision.

Validation ranks with the stage's scorer (SASRec alone while it pretrains, the retriever
alone while it pretrains, the fusion afterwards); the final test uses the best epoch of the
fused stages, or (``model.select``) the pretrained SASRec's when that validated strictly better.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rayrec import stopping
from rayrec.config.joint import MODULES, StageConfig
from rayrec.config.schema import JobConfig
from rayrec.eval.metrics import MetricSums, full_ranks, parse_eval_mode, sampled_ranks
from rayrec.models.joint import UR4Rec
from rayrec.models.retriever import JointFeatures
from rayrec.strategies import AdaptiveAlternating, build_strategies
from rayrec.train.checkpoint import set_rng_state
from rayrec.train.evaluation import EarlyStopping, eval_candidates, evaluate, final_test
from rayrec.train.groups import (
    Group,
    build_groups,
    check_rules,
    make_grouped_optimizer,
    matches,
    no_decay_names,
)
from rayrec.train.health import GradHealth
from rayrec.train.loop import (
    TRAIN_GRAD_NORM,
    TRAIN_LOSS,
    TRAIN_LR,
    TRAIN_THROUGHPUT,
    Batches,
    Reporter,
    rescale_grads,
)
from rayrec.train.phases import lr_factor, warmup_of
from rayrec.train.state import (
    EPOCH,
    TrainState,
    autocast,
    copy_weights,
    fmt_metrics,
    grad_scaler,
    load_weights,
    to_device,
)

log = logging.getLogger(__name__)

STAGE, STAGE_EPOCH, TRAIN_STEPS = "stage", "stage/epoch", "train/steps"
#: What validation ranks with in each stage.
STAGE_SCORER = {"pretrain_sasrec": "sasrec", "pretrain_retriever": "retriever",
                "joint_finetune": "joint", "end_to_end": "joint"}

Sync = Callable[[list[torch.nn.Parameter]], None]
Progress = Callable[[Iterable, int, Callable[[], str]], Iterable]


@dataclass(frozen=True)
class StagePlan:
    """A stage and the global epochs (1-based, inclusive) it owns."""

    index: int
    cfg: StageConfig
    first: int
    last: int

    @property
    def scorer(self) -> str:
        return STAGE_SCORER[self.cfg.name]


def plan_stages(stages: list[StageConfig]) -> list[StagePlan]:
    plans, start = [], 1
    for i, s in enumerate(stages):
        plans.append(StagePlan(i, s, start, start + s.epochs - 1))
        start += s.epochs
    return plans


def set_trainable(model: UR4Rec, flags: dict[str, bool]) -> None:
    """Set every module's ``requires_grad`` (all modules, every time: nothing is left as it was)."""
    for name, module in model.parts().items():
        module.requires_grad_(bool(flags[name]))


@dataclass
class JointState(TrainState):
    """The shared progress (its ``stopper`` and ``best_model`` are over the fused stages, for the
    final test), and the current stage's (the per-stage optimizers are the ``StageRunner``'s)."""

    stage: int = 0  # stage of the last completed epoch
    stage_done: bool = False
    stage_stopper: dict[str, Any] = field(default_factory=dict)
    stage_best: dict[str, torch.Tensor] | None = None  # best epoch of the current stage
    sasrec_stopper: dict[str, Any] = field(default_factory=dict)  # over SASRec-only epochs (model.select)
    sasrec_best: dict[str, torch.Tensor] | None = None  # their best weights: a final candidate
    module_steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODULES, 0))  # run-level, per module


def stage_groups(model: UR4Rec, cfg: JobConfig, plan: StagePlan) -> dict[str, list[Group]]:
    """Each trainable module's param groups in ``plan``: its stage LR x ``train.optim.groups`` multipliers."""
    optim = cfg.train.optim
    check_rules(optim.groups, model, hint=" of the ur4rec model (names start with its module: sasrec., retriever.)")
    set_trainable(model, plan.cfg.trainable_flags)
    no_decay = no_decay_names(model)
    out = {}
    for name in (m for m in MODULES if plan.cfg.trainable_flags[m]):
        named = [(f"{name}.{n}", p) for n, p in model.parts()[name].named_parameters()]
        rules = [r for r in optim.groups if any(matches(n, r.pattern) for n, _ in named)]
        out[name] = build_groups(named, optim, rules=rules, base_lr=plan.cfg.lr.get(name, optim.lr), no_decay=no_decay)
    return out


def group_plan(cfg: JobConfig, model: UR4Rec):
    """(title, groups, frozen names) per stage and trained module (``rayrec train --print-groups``)."""
    plans = plan_stages(cfg.model.stages)
    for plan in plans:
        for module, groups in stage_groups(model, cfg, plan).items():
            yield (f"stage {plan.index + 1}/{len(plans)} {plan.cfg.name} (epochs {plan.first}-{plan.last}), "
                   f"module {module}", groups, [])


def planned_steps(plan: StagePlan, stage_steps: int) -> dict[str, int]:
    """Optimizer steps each trainable module takes in the stage (its schedule's length).

    Without alternation: every step. ``fixed_alternating``: its exact share. ``adaptive_alternating``:
    an even share to start with (``StageRunner.resize`` re-estimates it every epoch).
    """
    flags = plan.cfg.trainable_flags
    modules = [m for m in MODULES if flags[m]]
    sched = next((s for s in plan.cfg.strategies if s.name in ("fixed_alternating", "adaptive_alternating")), None)
    if sched is None:
        return dict.fromkeys(modules, stage_steps)
    if sched.name == "fixed_alternating":
        counts = dict.fromkeys(modules, 0)
        for step in range(stage_steps):
            counts[sched.order[(step // sched.every) % len(sched.order)]] += 1
        return {m: max(1, n) for m, n in counts.items()}
    return {m: max(1, math.ceil(stage_steps / len(sched.order))) for m in modules}


class StageRunner:
    """One stage: trainable flags, per-module optimizers/schedulers, strategies; trains epochs."""

    def __init__(self, plan: StagePlan, model: UR4Rec, cfg: JobConfig, device: torch.device,
                 steps_per_epoch: int, sync: Sync, reduce: Callable[[torch.Tensor], torch.Tensor], world_size: int,
                 *, health: GradHealth | None = None, module_steps: dict[str, int] | None = None) -> None:
        self.plan, self.model, self.cfg, self.device = plan, model, cfg, device
        self.sync, self.reduce, self.world = sync, reduce, world_size
        self.flags = plan.cfg.trainable_flags
        set_trainable(model, self.flags)
        self.stage_steps = plan.cfg.epochs * max(1, steps_per_epoch)
        self.totals = planned_steps(plan, self.stage_steps)
        done = module_steps or {}
        optim = cfg.train.optim
        self.warmups = {m: warmup_of(optim, plan.cfg.warmup_steps, done.get(m, 0)) for m in self.totals}
        self.optims, self.scheds = {}, {}
        for name, groups in stage_groups(model, cfg, plan).items():
            self.optims[name] = make_grouped_optimizer(groups, optim)
            self.scheds[name] = torch.optim.lr_scheduler.LambdaLR(self.optims[name], partial(self._factor, name))
        self.strategies = build_strategies(plan.cfg, user_dim=cfg.model.sasrec.hidden,
                                           item_dim=cfg.model.retriever.hidden).to(device)
        self.strategy_opt = _strategy_optimizer(self.strategies, cfg)
        self.health = health or joint_health(model, cfg)
        self.health.set_module("strategies", list(self.strategies.parameters()))
        self.accum = cfg.train.grad_accum
        self.scaler = grad_scaler(device, cfg.train.amp)  # fp16 only; a pass-through for bf16 and on CPU
        self._pending, self._active, self._sums = 0, (), {}
        log.info("stage %d/%s begins at epoch %d (%d epochs): trainable %s, lr %s, planned steps %s, warmup %s, "
                 "strategies %s", plan.index + 1, plan.cfg.name, plan.first, plan.cfg.epochs, self.flags,
                 {m: o.param_groups[0]["initial_lr"] for m, o in self.optims.items()}, self.totals, self.warmups,
                 [s.name for s in plan.cfg.strategies] or ["sum"])

    def _factor(self, module: str, step: int) -> float:
        """LR factor of ``module`` after ``step`` of its own steps (its planned total may be re-estimated)."""
        warmup, done = self.warmups[module]
        return lr_factor(step, total=self.totals[module], warmup=warmup, done=done,
                         schedule=self.cfg.train.optim.schedule)

    def train_epoch(self, batches: Iterable, epoch_in_stage: int, progress: Callable[[Iterable], Iterable]) -> dict[str, float]:
        """One pass over the worker's batches (``grad_accum`` micro-batches a step); this epoch's training metrics."""
        self.model.train()
        self.strategies.start_epoch(epoch_in_stage)
        acc = _EpochAcc()
        start = time.perf_counter()
        for batch in progress(batches):
            if self._pending == 0:
                stopping.check()  # a signal stops the run here, between optimizer steps
            batch = to_device(batch, self.device)
            self._micro(batch)
            acc.seqs += batch["input_ids"].shape[0]
            if self._pending == self.accum:
                acc.add(self._finish())
        if self._pending:
            acc.add(self._finish())
        metrics = acc.metrics(self.world, time.perf_counter() - start)
        metrics.update(self.health.epoch_metrics())
        metrics.update({f"train/loss_{k}": v for k, v in self.strategies.epoch_means().items()})
        metrics.update({f"train/lr_{m}": s.get_last_lr()[0] for m, s in self.scheds.items()})
        metrics[TRAIN_LR] = next(iter(self.scheds.values())).get_last_lr()[0]
        metrics.update({f"stage/trainable_{m}": float(self.flags[m]) for m in MODULES})
        metrics.update(self.strategies.end_epoch())
        self.resize()
        return metrics

    def resize(self) -> None:
        """Under adaptive alternation: each module's schedule length from its share of the stage so far
        (at least an even share, so a module that waited does not find its schedule already spent)."""
        sched = self.strategies.schedule
        if not isinstance(sched, AdaptiveAlternating) or sched.step == 0:
            return
        left = max(0, self.stage_steps - sched.step)
        for m in self.totals:
            done = sched.steps_per_module.get(m, 0)
            share = max(done / sched.step, 1 / len(sched.order))  # never below an even share: no early LR 0
            self.totals[m] = max(1, done + round(left * share))

    def step(self, micro_batches: Iterable) -> tuple[float, float, set[str]] | None:
        """One optimizer step over ``micro_batches`` (already on the device); None when it was skipped."""
        for batch in micro_batches:
            self._micro(batch)
        return self._finish()

    def _micro(self, batch) -> None:
        """Forward and backward one micro-batch (the step's active modules are fixed at its first)."""
        if self._pending == 0:
            self._active = tuple(m for m in self.strategies.active_modules() if self.flags[m])
            set_trainable(self.model, {m: m in self._active for m in MODULES})
            self._sums = {}
        with autocast(self.device, self.cfg.train.amp):
            out = self.model.outputs(batch, self.strategies.step_keys(self._active), self.strategies.needs())
            total, parts = self.strategies.total(out, self._active)
        self.scaler.scale(total / self.accum).backward()
        for k, v in {"total": total, **parts}.items():
            self._sums[k] = self._sums.get(k, 0.0) + v.detach().float()
        self._pending += 1

    def _finish(self) -> tuple[float, float, set[str]] | None:
        """Average grads over workers, check them, step the active modules; None when skipped."""
        active, n = self._active, self._pending
        self._pending = 0
        params = [p for m in active for p in self.model.parts()[m].parameters()] + list(self.strategies.parameters())
        opts = [self.optims[m] for m in active] + ([self.strategy_opt] if self.strategy_opt is not None else [])
        for opt in opts:
            self.scaler.unscale_(opt)
        rescale_grads(params, self.accum / n)  # a short last step: a mean over its own batches
        self.sync(params)
        fp16 = self.scaler.is_enabled()
        ok = self.health.check(self.cfg.train.optim.grad_clip, modules=[*active, "strategies"], per_module_clip=True,
                               unclipped=("strategies",), tolerate=fp16)
        if not ok:
            if fp16:  # an overflow: the scaler lowers its scale, the step is counted as skipped
                self.scaler.update()
                self.health.scaler_skipped()
            self._zero_all()
            self.strategies.observe_skipped()
            return None
        for opt in opts:
            self.scaler.step(opt)  # opt.step() unless fp16 found an overflow
        for m in active:
            self.scheds[m].step()  # a module's schedule advances only when it steps
        self.scaler.update()
        self._zero_all()
        losses = self._reduced({k: v / n for k, v in self._sums.items()})
        self.strategies.observe({k: v for k, v in losses.items() if k != "total"})
        return losses["total"], self.health.last_norm, set(active)

    def _zero_all(self) -> None:
        """Every optimizer's gradients, trained this step or not, and the model's."""
        for opt in (*self.optims.values(), *([self.strategy_opt] if self.strategy_opt else [])):
            opt.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)

    def _reduced(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Each value averaged over workers (one all-reduce), as floats."""
        keys = list(values)
        flat = self.reduce(torch.stack([values[k].float() for k in keys])) / self.world
        return dict(zip(keys, flat.tolist(), strict=True))

    def describe(self) -> str:
        return f"{self.plan.cfg.name} {self.strategies.describe()}"

    def state(self) -> dict[str, Any]:
        return {"optimizers": {m: o.state_dict() for m, o in self.optims.items()},
                "schedulers": {m: s.state_dict() for m, s in self.scheds.items()},
                "totals": dict(self.totals), "warmups": dict(self.warmups),
                "strategy": self.strategies.state_dict(),
                "strategy_optimizer": self.strategy_opt.state_dict() if self.strategy_opt else None}

    def load(self, s: dict[str, Any]) -> None:
        self.totals.update(s.get("totals", {}))
        for m, o in self.optims.items():
            o.load_state_dict(s["optimizers"][m])
            self.scheds[m].load_state_dict(s["schedulers"][m])
        self.strategies.load_state_dict(s["strategy"])
        if self.strategy_opt is not None and s.get("strategy_optimizer"):
            self.strategy_opt.load_state_dict(s["strategy_optimizer"])


class _EpochAcc:
    """Sums over an epoch's optimizer steps: loss, global grad norm, steps per module, skipped steps, sequences."""

    def __init__(self) -> None:
        self.loss, self.norm, self.steps, self.seqs, self.skipped = 0.0, 0.0, 0, 0, 0
        self.module_steps: dict[str, int] = dict.fromkeys(MODULES, 0)

    def add(self, step: tuple[float, float, set[str]] | None) -> None:
        if step is None:
            self.skipped += 1
            return
        loss, norm, active = step
        self.loss, self.norm, self.steps = self.loss + loss, self.norm + norm, self.steps + 1
        for m in active:
            self.module_steps[m] += 1

    def metrics(self, world: int, seconds: float) -> dict[str, float]:
        out = {TRAIN_LOSS: self.loss / max(1, self.steps), TRAIN_THROUGHPUT: self.seqs * world / max(seconds, 1e-9),
               TRAIN_STEPS: float(self.steps), TRAIN_GRAD_NORM: self.norm / max(1, self.steps)}
        out.update({f"train/steps_{m}": float(n) for m, n in self.module_steps.items()})
        return out


def joint_health(model: UR4Rec, cfg: JobConfig, log_step=None) -> GradHealth:
    """Gradient health by module (sasrec, retriever, and the stage's strategies)."""
    return GradHealth(model.named_parameters(), cfg.train.health.model_copy(update={"depth": 1}), log_step=log_step)


def _strategy_optimizer(strategies, cfg: JobConfig) -> torch.optim.Optimizer | None:
    """AdamW over the strategies' own parameters (uncertainty log-variances, projections)."""
    params = [p for p in strategies.parameters() if p.requires_grad]
    if not params:
        return None
    lr = getattr(strategies.weighting, "lr", None) or cfg.train.optim.lr
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def no_sync(params: list[torch.nn.Parameter]) -> None:
    """One worker: nothing to average."""


def fit_joint(
    model: UR4Rec, batches: Batches, cfg: JobConfig, *, num_items: int, device: torch.device, reporter: Reporter,
    resume: dict[str, Any] | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    sync_grads: Sync = no_sync, world_size: int = 1, progress: Progress | None = None,
    steps_per_epoch: int | None = None,
) -> dict[str, float]:
    """Train ``model`` stage by stage, validate every epoch, then test the best fused epoch.

    ``resume`` is a loaded joint checkpoint; ``sync_grads`` averages gradients over workers.
    """
    plans = plan_stages(cfg.model.stages)
    st = _restore_joint(resume, model, cfg) if resume is not None else JointState()
    stopper = EarlyStopping(cfg.train.early_stopping)
    if st.stopper:
        stopper.load_state_dict(st.stopper)
    health = joint_health(model, cfg, log_step=getattr(reporter, "log_step", None))
    if resume is not None:
        health.load(resume.get("health"))
    for plan in plans:
        if plan.index < st.stage or (plan.index == st.stage and st.stage_done):
            continue
        mid_stage = resume is not None and plan.index == st.stage and st.epoch >= plan.first
        if not mid_stage:
            _enter_stage(model, st, plan)
        done = dict(st.module_steps)
        if mid_stage:  # the stage's warmups were set from the module steps at its start (restored below)
            done = {m: 0 for m in MODULES}
        runner = StageRunner(plan, model, cfg, device, steps_per_epoch or 1, sync_grads, reduce, world_size,
                             health=health, module_steps=done)
        if mid_stage:
            runner.warmups.update({m: tuple(w) for m, w in resume["stage_state"].get("warmups", {}).items()})
            runner.load(resume["stage_state"])
        st.stage, st.stage_done = plan.index, False
        _run_stage(plan, runner, model, batches, cfg, st, stopper, num_items, device, reduce, reporter, progress)
        st.stage_done = True
    return _final_joint(model, plans, st, stopper, batches, cfg, num_items, device, reduce, reporter, health)


def _enter_stage(model: UR4Rec, st: JointState, plan: StagePlan) -> None:
    """Start a stage from the previous stage's best weights, with fresh stage-level stopping."""
    if st.stage_best is not None:
        model.load_state_dict(st.stage_best)
        log.info("stage %d/%s starts from the previous stage's best weights", plan.index + 1, plan.cfg.name)
    st.stage_best, st.stage_stopper = None, {}


def _run_stage(plan: StagePlan, runner: StageRunner, model: UR4Rec, batches: Batches, cfg: JobConfig,
               st: JointState, stopper: EarlyStopping, num_items: int, device, reduce, reporter: Reporter,
               progress: Progress | None) -> None:
    """The stage's epochs: train, validate with the stage's scorer, keep the best, report."""
    stop_cfg = cfg.train.early_stopping
    if plan.cfg.patience is not None:
        stop_cfg = stop_cfg.model_copy(update={"patience": plan.cfg.patience})
    stage_stopper = EarlyStopping(stop_cfg)
    if st.stage_stopper:
        stage_stopper.load_state_dict(st.stage_stopper)
    for epoch in range(max(plan.first, st.epoch + 1), plan.last + 1):
        if stage_stopper.should_stop:
            log.info("stage %s stopped early after epoch %d", plan.cfg.name, st.epoch)
            break
        wrap = (lambda it, e=epoch: progress(it, e, runner.describe)) if progress else (lambda it: it)
        metrics = {EPOCH: epoch, STAGE: plan.index + 1, STAGE_EPOCH: epoch - plan.first + 1}
        metrics.update(runner.train_epoch(batches.train(epoch), epoch - plan.first + 1, wrap))
        model.scorer = plan.scorer
        if plan.scorer == "joint" and cfg.model.fusion.calibrate:
            metrics.update(calibrate_fusion(model, batches.valid(), cfg, num_items, device, reduce))
        else:
            metrics.update(evaluate(model, batches.valid(), cfg, num_items, device, prefix="val/", reduce=reduce))
        weights = None
        if stage_stopper.update(metrics, epoch):
            weights = st.stage_best = copy_weights(model)
        if plan.scorer == "joint" and stopper.update(metrics, epoch):
            st.best_model = weights if weights is not None else copy_weights(model)
        if plan.scorer == "sasrec" and cfg.model.select == "fused_or_sasrec":
            sas_stopper = EarlyStopping(cfg.train.early_stopping)
            if st.sasrec_stopper:
                sas_stopper.load_state_dict(st.sasrec_stopper)
            if sas_stopper.update(metrics, epoch):
                st.sasrec_best = weights if weights is not None else copy_weights(model)
            st.sasrec_stopper = sas_stopper.state_dict()
        st.epoch, st.step = epoch, st.step + int(metrics[TRAIN_STEPS])
        for m in MODULES:
            st.module_steps[m] += int(metrics[f"train/steps_{m}"])
        st.stopper, st.stage_stopper = stopper.state_dict(), stage_stopper.state_dict()
        best = stopper.best if stopper.best is not None else stage_stopper.best
        metrics[f"best/{cfg.train.early_stopping.metric}"] = float(best)
        st.history.append(metrics)
        reporter.report(metrics, _joint_state(st, model, runner, cfg, runner.health))
        log.debug("epoch %d (%s): %s", epoch, plan.cfg.name, fmt_metrics(metrics))  # the console shows rank 0's line


@torch.no_grad()
def calibrate_fusion(model: UR4Rec, batches: Iterable, cfg: JobConfig, num_items: int, device: torch.device,
                     reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Pick SASRec's fusion share from ``fusion.calibrate`` on the validation split.

    Both modules score each batch once; every weight then only re-fuses and re-ranks. The
    best weight (by the early-stopping metric) is stored in ``model.fusion_weight`` -- so the
    best epoch's checkpoint carries the weight it was selected with -- and its validation
    metrics are returned, with ``fusion/weight`` and one ``fusion/<metric>_w<weight>`` per weight.
    """
    ev, grid = cfg.train.eval, cfg.model.fusion.calibrate
    n_neg = parse_eval_mode(ev.mode)
    sums = {w: MetricSums(ev.ks) for w in grid}
    model.eval()
    for batch in batches:
        batch = to_device(batch, device)
        seen = batch["seen"] if ev.mask_seen else None
        cand = eval_candidates(batch, seen, cfg, num_items, n_neg) if n_neg is not None else None
        parts = model.components(batch["history"], batch["user_idx"], cand)
        for w in grid:
            scores = model.compose(parts, w).float()
            sums[w].update(full_ranks(scores, batch["target"], seen) if cand is None
                           else sampled_ranks(scores[:, 0], scores[:, 1:]))
    totals = {w: MetricSums.from_tensor(reduce(sums[w].to_tensor()), ev.ks) for w in grid}
    means = {w: {**t.means("val/"), "val/rows": float(t.count)} for w, t in totals.items()}  # as evaluate()
    key, mode = cfg.train.early_stopping.metric, cfg.train.early_stopping.mode
    best = (max if mode == "max" else min)(grid, key=lambda w: means[w][key])
    model.fusion_weight.fill_(best)
    name = key.removeprefix("val/").replace("@", "_at_")
    return {**means[best], "fusion/weight": best, **{f"fusion/{name}_w{w:.2f}": means[w][key] for w in grid}}


def _final_joint(model: UR4Rec, plans: list[StagePlan], st: JointState, stopper: EarlyStopping, batches: Batches,
                 cfg: JobConfig, num_items: int, device, reduce, reporter: Reporter,
                 health: GradHealth) -> dict[str, float]:
    """Test the best fused epoch (or, without a fused stage, the last stage's best) once; under
    ``model.select: fused_or_sasrec`` the best SASRec-only epoch instead when its validation metric is
    strictly better, ranked by SASRec alone (``UR4Rec.sasrec_alone``)."""
    fused = any(p.scorer == "joint" for p in plans)
    weights = st.best_model if fused else st.stage_best
    stop = stopper if fused else EarlyStopping(cfg.train.early_stopping)
    if not fused and st.stage_stopper:
        stop.load_state_dict(st.stage_stopper)
    alone = fused and st.sasrec_best is not None and _sasrec_wins(st.sasrec_stopper, stopper)
    if alone:
        log.info("final test: SASRec alone at epoch %d (%s %.4g) beats the best fused epoch %d (%.4g)",
                 st.sasrec_stopper["best_epoch"], cfg.train.early_stopping.metric, st.sasrec_stopper["best"],
                 stopper.best_epoch, stopper.best if stopper.best is not None else float("nan"))
        weights, stop = st.sasrec_best, EarlyStopping(cfg.train.early_stopping)
        stop.load_state_dict(st.sasrec_stopper)
    if weights is not None:
        model.load_state_dict(weights)
    model.scorer = "joint" if fused else plans[-1].scorer
    model.sasrec_alone.fill_(alone)
    final = final_test(model, batches.test(), cfg, num_items, device, reduce, epoch=st.epoch, stopper=stop,
                       stopped_early=st.epoch < plans[-1].last, skipped_steps=health.skipped_total)
    if fused:
        final["select/sasrec_alone"] = float(alone)
    if alone:  # the run's best weights are what was tested, so `rayrec eval --weights best` reproduces it
        st.best_model = copy_weights(model)
    reporter.report(final, _joint_state(st, model, None, cfg, health))
    log.debug("test (%s scorer, best epoch %d): %s", model.scorer, stop.best_epoch, fmt_metrics(final))
    return final


def _sasrec_wins(sasrec: dict[str, Any], fused: EarlyStopping) -> bool:
    """Whether the best SASRec-only epoch is strictly better than the best fused one."""
    if sasrec.get("best") is None:
        return False
    if fused.best is None:
        return True
    return sasrec["best"] > fused.best if fused.cfg.mode == "max" else sasrec["best"] < fused.best


def _joint_state(st: JointState, model: UR4Rec, runner: StageRunner | None, cfg: JobConfig,
                 health: GradHealth) -> dict[str, Any]:
    return st.checkpoint(model, cfg, stage_best=st.stage_best, stage_state=runner.state() if runner is not None else None,
                         health=health.state(), module_steps=dict(st.module_steps), stage=st.stage,
                         stage_done=st.stage_done, stage_stopping=st.stage_stopper,
                         sasrec_stopping=st.sasrec_stopper, sasrec_best=st.sasrec_best)


def _restore_joint(state: dict[str, Any], model: UR4Rec, cfg: JobConfig) -> JointState:
    if "stage" not in state:
        raise ValueError("this checkpoint was not written by ur4rec training (no stage state); "
                         "resume it with the job that wrote it")
    load_weights(state, model, cfg)
    set_rng_state(state["rng"])
    log.info("resumed from epoch %d (stage %d, step %d)", state["epoch"], state["stage"] + 1, state["step"])
    return JointState(**TrainState.shared_fields(state), stage=state["stage"], stage_done=state["stage_done"],
                      stage_stopper=state["stage_stopping"], stage_best=state["stage_best"],
                      sasrec_stopper=state.get("sasrec_stopping", {}), sasrec_best=state.get("sasrec_best"),
                      module_steps={**dict.fromkeys(MODULES, 0), **state.get("module_steps", {})})


# ----------------------------------------------------------------------------- inputs


def prepare_features(cfg: JobConfig, data_path: str | Path, *, use_ray: bool) -> dict[str, Any]:
    """Compute (or find up to date) the joint model's features, on the driver, before any worker starts."""
    from rayrec.cluster import gpu_available
    from rayrec.data.features import compute_features, num_users_of
    from rayrec.prefs.generate import prefs_out_dir

    use_gpu = cfg.scaling.use_gpu and gpu_available(use_ray)
    return compute_features(cfg.model.features, Path(data_path), num_users_of(data_path),
                            prefs_dir=prefs_out_dir(cfg.model.prefs, Path(data_path)), use_ray=use_ray, use_gpu=use_gpu)


def build_joint(cfg: JobConfig, num_items: int, data_path: str | Path) -> UR4Rec:
    """The joint model with its frozen features loaded (and checked) from the feature folder."""
    from rayrec.data.features import feature_dir, load_feature_arrays, num_users_of
    from rayrec.models import build_ur4rec

    arrays = load_feature_arrays(feature_dir(cfg.model.features, Path(data_path)), num_items=num_items,
                                 num_users=num_users_of(data_path))
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    feats = JointFeatures(t["item_text"], t["item_text_ok"], t["item_image"], t["item_image_ok"],
                          t["user_text"], t["user_text_ok"])
    return build_ur4rec(num_items, cfg.model, features=feats)
