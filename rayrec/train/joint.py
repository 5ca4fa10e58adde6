"""Staged training of the joint (UR4Rec) model: the joint counterpart of ``loop.fit``.

It reuses the framework-free loop's pieces -- ``evaluate``, ``EarlyStopping``,
``make_optimizer``/``make_scheduler``, the checkpoint state and the ``Reporter`` -- and adds
what joint training needs:

- stages (``model.stages``), each setting *every* module's trainable flag explicitly (the
  seed left SASRec frozen after pretraining the retriever), with its own epochs, per-module
  learning rates, strategies and early stopping; the next stage starts from the best
  weights of the previous one, and each boundary is logged;
- one optimizer and LR schedule per module, stepped only when that module trains, and every
  gradient zeroed after every step (the seed let gradients pile up on the idle module);
- no DDP wrapper: alternation changes which parameters train from step to step, which DDP
  cannot follow, so workers average the trained parameters' gradients with one all-reduce
  (``sync_grads``) and average each step's losses (``reduce``) so every worker's strategy
  makes the same decision.

Validation ranks with the stage's scorer (SASRec alone while it pretrains, the retriever
alone while it pretrains, the fusion afterwards); the final test uses the best epoch of the
fused stages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rayrec.config.joint import MODULES, StageConfig
from rayrec.config.loader import dump_job
from rayrec.config.schema import JobConfig
from rayrec.eval.metrics import MetricSums, full_ranks, parse_eval_mode, sampled_ranks
from rayrec.models.joint import UR4Rec
from rayrec.models.retriever import JointFeatures
from rayrec.strategies import build_strategies
from rayrec.train.checkpoint import rng_state, set_rng_state, warn_config_diff
from rayrec.train.loop import (
    EPOCH,
    TRAIN_GRAD_NORM,
    TRAIN_LOSS,
    TRAIN_LR,
    TRAIN_THROUGHPUT,
    Batches,
    EarlyStopping,
    Reporter,
    _fmt,
    _to,
    eval_candidates,
    evaluate,
    make_optimizer,
    make_scheduler,
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
class JointState:
    """Everything a joint checkpoint restores besides the per-stage optimizers."""

    epoch: int = 0  # global epochs completed
    step: int = 0
    stage: int = 0  # stage of the last completed epoch
    stage_done: bool = False
    stopper: dict[str, Any] = field(default_factory=dict)  # run-level, over the fused stages
    stage_stopper: dict[str, Any] = field(default_factory=dict)
    best_model: dict[str, torch.Tensor] | None = None  # best fused epoch (final test)
    stage_best: dict[str, torch.Tensor] | None = None  # best epoch of the current stage
    history: list[dict[str, float]] = field(default_factory=list)


class StageRunner:
    """One stage: trainable flags, per-module optimizers/schedulers, strategies; trains epochs."""

    def __init__(self, plan: StagePlan, model: UR4Rec, cfg: JobConfig, device: torch.device,
                 steps_per_epoch: int, sync: Sync, reduce: Callable[[torch.Tensor], torch.Tensor], world_size: int) -> None:
        self.plan, self.model, self.cfg, self.device = plan, model, cfg, device
        self.sync, self.reduce, self.world = sync, reduce, world_size
        self.flags = plan.cfg.trainable_flags
        set_trainable(model, self.flags)
        total = plan.cfg.epochs * max(1, steps_per_epoch)
        self.optims, self.scheds = {}, {}
        for name in (m for m in MODULES if self.flags[m]):
            ocfg = cfg.train.optim.model_copy(update={"lr": plan.cfg.lr.get(name, cfg.train.optim.lr)})
            self.optims[name] = make_optimizer(model.parts()[name].parameters(), ocfg)
            self.scheds[name] = make_scheduler(self.optims[name], ocfg, total)
        self.strategies = build_strategies(plan.cfg, user_dim=cfg.model.sasrec.hidden,
                                           item_dim=cfg.model.retriever.hidden).to(device)
        self.strategy_opt = _strategy_optimizer(self.strategies, cfg)
        log.info("stage %d/%s begins at epoch %d (%d epochs): trainable %s, lr %s, strategies %s", plan.index + 1,
                 plan.cfg.name, plan.first, plan.cfg.epochs, self.flags,
                 {m: o.param_groups[0]["initial_lr"] for m, o in self.optims.items()},
                 [s.name for s in plan.cfg.strategies] or ["sum"])

    def train_epoch(self, batches: Iterable, epoch_in_stage: int, progress: Callable[[Iterable], Iterable]) -> dict[str, float]:
        """One pass over the worker's batches; returns this epoch's training metrics."""
        self.model.train()
        self.strategies.start_epoch(epoch_in_stage)
        acc = _EpochAcc()
        start = time.perf_counter()
        for batch in progress(batches):
            batch = _to(batch, self.device)
            acc.add(*self._step(batch), seqs=batch["input_ids"].shape[0])
        metrics = acc.metrics(self.world, time.perf_counter() - start)
        metrics.update({f"train/loss_{k}": v for k, v in self.strategies.epoch_means().items()})
        metrics.update({f"train/lr_{m}": s.get_last_lr()[0] for m, s in self.scheds.items()})
        metrics[TRAIN_LR] = next(iter(self.scheds.values())).get_last_lr()[0]
        metrics.update({f"stage/trainable_{m}": float(self.flags[m]) for m in MODULES})
        metrics.update(self.strategies.end_epoch())
        return metrics

    def _step(self, batch) -> tuple[float, dict[str, float], set[str]]:
        """Forward the losses the strategies ask for, backward, average grads, step the active modules."""
        active = tuple(m for m in self.strategies.active_modules() if self.flags[m])
        set_trainable(self.model, {m: m in active for m in MODULES})
        with _autocast(self.device, self.cfg.train.amp):
            out = self.model.outputs(batch, self.strategies.step_keys(active), self.strategies.needs())
            total, parts = self.strategies.total(out, active)
        total.backward()
        params = [p for m in active for p in self.model.parts()[m].parameters()] + list(self.strategies.parameters())
        self.sync(params)
        norms = {}
        for m in active:
            clip = self.cfg.train.optim.grad_clip or float("inf")
            norms[m] = float(torch.nn.utils.clip_grad_norm_(self.model.parts()[m].parameters(), clip))
            self.optims[m].step()
            self.scheds[m].step()  # a module's schedule advances only when it steps
        if self.strategy_opt is not None:
            self.strategy_opt.step()
        self._zero_all()
        losses = self._reduced({"total": total.detach(), **{k: v.detach() for k, v in parts.items()}})
        self.strategies.observe({k: v for k, v in losses.items() if k != "total"})
        return losses["total"], norms, set(active)

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
                "strategy": self.strategies.state_dict(),
                "strategy_optimizer": self.strategy_opt.state_dict() if self.strategy_opt else None}

    def load(self, s: dict[str, Any]) -> None:
        for m, o in self.optims.items():
            o.load_state_dict(s["optimizers"][m])
            self.scheds[m].load_state_dict(s["schedulers"][m])
        self.strategies.load_state_dict(s["strategy"])
        if self.strategy_opt is not None and s.get("strategy_optimizer"):
            self.strategy_opt.load_state_dict(s["strategy_optimizer"])


class _EpochAcc:
    """Sums over an epoch's steps: loss, per-module grad norms and step counts, sequences."""

    def __init__(self) -> None:
        self.loss, self.steps, self.seqs = 0.0, 0, 0
        self.norms: dict[str, float] = {}
        self.module_steps: dict[str, int] = dict.fromkeys(MODULES, 0)

    def add(self, loss: float, norms: dict[str, float], active: set[str], *, seqs: int) -> None:
        self.loss, self.steps, self.seqs = self.loss + loss, self.steps + 1, self.seqs + seqs
        for m, n in norms.items():
            self.norms[m] = self.norms.get(m, 0.0) + n
        for m in active:
            self.module_steps[m] += 1

    def metrics(self, world: int, seconds: float) -> dict[str, float]:
        out = {TRAIN_LOSS: self.loss / max(1, self.steps), TRAIN_THROUGHPUT: self.seqs * world / max(seconds, 1e-9),
               TRAIN_STEPS: float(self.steps)}
        out.update({f"train/grad_norm_{m}": v / max(1, self.module_steps[m]) for m, v in self.norms.items()})
        out[TRAIN_GRAD_NORM] = sum(self.norms.values()) / max(1, self.steps)
        out.update({f"train/steps_{m}": float(n) for m, n in self.module_steps.items()})
        return out


def _strategy_optimizer(strategies, cfg: JobConfig) -> torch.optim.Optimizer | None:
    """AdamW over the strategies' own parameters (uncertainty log-variances, projections)."""
    params = [p for p in strategies.parameters() if p.requires_grad]
    if not params:
        return None
    lr = getattr(strategies.weighting, "lr", None) or cfg.train.optim.lr
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPUs that support it; nothing otherwise (no fp16 loss scaling here)."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


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
    if getattr(cfg.run.checkpoint, "every_n_steps", None):
        log.warning("run.checkpoint.every_n_steps is not supported by ur4rec's staged training: "
                    "it checkpoints at the end of every epoch")
    st = _restore_joint(resume, model, cfg) if resume is not None else JointState()
    stopper = EarlyStopping(cfg.train.early_stopping)
    if st.stopper:
        stopper.load_state_dict(st.stopper)
    for plan in plans:
        if plan.index < st.stage or (plan.index == st.stage and st.stage_done):
            continue
        mid_stage = resume is not None and plan.index == st.stage and st.epoch >= plan.first
        if not mid_stage:
            _enter_stage(model, st, plan)
        runner = StageRunner(plan, model, cfg, device, steps_per_epoch or 1, sync_grads, reduce, world_size)
        if mid_stage:
            runner.load(resume["stage_state"])
        st.stage, st.stage_done = plan.index, False
        _run_stage(plan, runner, model, batches, cfg, st, stopper, num_items, device, reduce, reporter, progress)
        st.stage_done = True
    return _final_joint(model, plans, st, stopper, batches, cfg, num_items, device, reduce, reporter)


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
    stage_stopper = EarlyStopping(cfg.train.early_stopping)
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
            weights = st.stage_best = _copy(model)
        if plan.scorer == "joint" and stopper.update(metrics, epoch):
            st.best_model = weights if weights is not None else _copy(model)
        st.epoch, st.step = epoch, st.step + int(metrics[TRAIN_STEPS])
        st.stopper, st.stage_stopper = stopper.state_dict(), stage_stopper.state_dict()
        best = stopper.best if stopper.best is not None else stage_stopper.best
        metrics[f"best/{cfg.train.early_stopping.metric}"] = float(best)
        st.history.append(metrics)
        reporter.report(metrics, _joint_state(st, model, runner, cfg))
        log.debug("epoch %d (%s): %s", epoch, plan.cfg.name, _fmt(metrics))  # the console shows rank 0's line


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
        batch = _to(batch, device)
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


def _copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _final_joint(model: UR4Rec, plans: list[StagePlan], st: JointState, stopper: EarlyStopping, batches: Batches,
                 cfg: JobConfig, num_items: int, device, reduce, reporter: Reporter) -> dict[str, float]:
    """Test the best fused epoch (or, without a fused stage, the last stage's best) once."""
    fused = any(p.scorer == "joint" for p in plans)
    weights = st.best_model if fused else st.stage_best
    if weights is not None:
        model.load_state_dict(weights)
    model.scorer = "joint" if fused else plans[-1].scorer
    final = evaluate(model, batches.test(), cfg, num_items, device, prefix="test/", reduce=reduce)
    stop = stopper if fused else EarlyStopping(cfg.train.early_stopping)
    if not fused and st.stage_stopper:
        stop.load_state_dict(st.stage_stopper)
    final.update({EPOCH: st.epoch, "best_epoch": stop.best_epoch,
                  f"best/{cfg.train.early_stopping.metric}": float(stop.best) if stop.best is not None else float("nan"),
                  "stopped_early": float(st.epoch < plans[-1].last)})
    reporter.report(final, _joint_state(st, model, None, cfg))
    log.debug("test (%s scorer, best epoch %d): %s", model.scorer, stop.best_epoch, _fmt(final))
    return final


def _joint_state(st: JointState, model: UR4Rec, runner: StageRunner | None, cfg: JobConfig) -> dict[str, Any]:
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "best_model": st.best_model,
        "stage_best": st.stage_best,
        "stage_state": runner.state() if runner is not None else None,
        "rng": rng_state(),
        "epoch": st.epoch,
        "step": st.step,
        "stage": st.stage,
        "stage_done": st.stage_done,
        "early_stopping": st.stopper,
        "stage_stopping": st.stage_stopper,
        "history": st.history,
        "config": dump_job(cfg),
    }


def _restore_joint(state: dict[str, Any], model: UR4Rec, cfg: JobConfig) -> JointState:
    if "stage" not in state:
        raise ValueError("this checkpoint was not written by ur4rec training (no stage state); "
                         "resume it with the job that wrote it")
    warn_config_diff(state["config"], dump_job(cfg))
    model.load_state_dict(state["model"])
    set_rng_state(state["rng"])
    log.info("resumed from epoch %d (stage %d, step %d)", state["epoch"], state["stage"] + 1, state["step"])
    return JointState(epoch=state["epoch"], step=state["step"], stage=state["stage"], stage_done=state["stage_done"],
                      stopper=state["early_stopping"], stage_stopper=state["stage_stopping"],
                      best_model=state["best_model"], stage_best=state["stage_best"],
                      history=list(state.get("history", [])))


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
    from rayrec.models import build_model

    arrays = load_feature_arrays(feature_dir(cfg.model.features, Path(data_path)), num_items=num_items,
                                 num_users=num_users_of(data_path))
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    feats = JointFeatures(t["item_text"], t["item_text_ok"], t["item_image"], t["item_image_ok"],
                          t["user_text"], t["user_text_ok"])
    return build_model(cfg.model, num_items, features=feats)
