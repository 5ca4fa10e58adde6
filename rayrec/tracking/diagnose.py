"""`rayrec diagnose RUN_ID`: read one run's logged history and say what went wrong, with figures.

Each check looks at the per-epoch metrics MLflow holds for the run and returns a
``Finding`` whose message carries the numbers behind it:

- non-finite values (NaN/Inf) in any metric, with the epochs;
- overfitting: the training loss keeps falling after the validation metric's best
  epoch while the metric stalls or drops (the epoch it began);
- a loss that never moves (a module that is not learning) or zero gradients;
- an alternating schedule that never switched, or a module that never trained;
- gradient health: optimizer steps skipped for NaN/Inf gradients (and in which modules),
  modules whose gradients vanished;
- early stopping (or a sweep's scheduler) ending the run, and where the best epoch was.

Nothing is written to the run; a figure of the curves goes to an output folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayrec.errors import RayrecError
from rayrec.eval.metrics import metric_mode
from rayrec.secrets import redact_uri
from rayrec.tracking.mlflow_tracking import NOT_LOGGED_TAG, rayrec_name

History = list[tuple[int, float]]
LOSS = "train/loss"
#: Relative changes below these mean "did not move" / "got better".
FLAT_REL, IMPROVE_REL, LOSS_FALL_REL = 1e-3, 0.01, 0.02
#: Epochs without a better validation value (and a falling loss) that count as a stall.
STALL_EPOCHS = 3


@dataclass
class Finding:
    kind: str  # nan_inf | nan_grad | vanishing | overfitting | not_learning | zero_grad | no_switch | starved | early_stop | no_improvement | not_logged | ok
    severity: str  # error | warning | info
    message: str
    epoch: int | None = None  # where it began, when that is meaningful


@dataclass
class Diagnosis:
    run_id: str
    run_name: str
    metric: str
    findings: list[Finding]
    histories: dict[str, History] = field(default_factory=dict)
    figure: Path | None = None


def diagnose(uri: str, run_id: str, *, metric: str | None = None, out: Path | None = None) -> Diagnosis:
    """Load the run's histories and run every check; write the figure under ``out``."""
    run = find_run(uri, run_id)
    params, tags = run.data.params, run.data.tags
    metric = metric or params.get("train.early_stopping.metric") or "val/ndcg@10"
    histories = load_histories(uri, run)
    findings = run_checks(histories, metric, params, tags)
    result = Diagnosis(run.info.run_id, run.info.run_name or "", metric, findings, histories)
    if out is not None:
        result.figure = write_figure(result, Path(out))
    return result


def find_run(uri: str, run_id: str):
    """The run with this id, or the only run whose id starts with it."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    try:
        return c.get_run(run_id)
    except MlflowException:
        pass
    exps = [e.experiment_id for e in c.search_experiments()]
    hits = [r for r in c.search_runs(exps, max_results=50000) if r.info.run_id.startswith(run_id)] if exps else []
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise RayrecError(f"no MLflow run with id {run_id} at {redact_uri(uri)} (set --tracking-uri if it is elsewhere)")
    raise RayrecError(f"run id prefix {run_id} matches {len(hits)} runs ({', '.join(h.info.run_id[:12] for h in hits[:5])}"
                      "...); give more characters")


def load_histories(uri: str, run) -> dict[str, History]:
    """Every metric of the run as (epoch, value) pairs, keyed by its rayrec name (``val/ndcg@10``)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    out = {}
    for key in run.data.metrics:
        out[rayrec_name(key)] = sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, key))
    return out


def run_checks(h: dict[str, History], metric: str, params: dict[str, str], tags: dict[str, str]) -> list[Finding]:
    """All checks, most severe first; one ``ok`` finding when nothing is wrong."""
    mode = _mode(metric)
    epochs = _epoch_series(h, metric)
    findings = [*check_non_finite(h), *check_overfitting(epochs, metric, mode, h.get(LOSS, [])),
                *check_not_learning(h), *check_health(h, params), *check_alternation(h, params), *check_stopping(h, metric, mode, params, tags),
                *check_not_logged(tags)]
    if not any(f.severity in ("error", "warning") for f in findings):
        findings.append(_healthy(h, metric, mode))
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: order[f.severity])


def _mode(metric: str) -> str:
    try:
        return metric_mode(metric)
    except ValueError as e:
        raise RayrecError(f"--metric {metric}: {e}") from None


def _epoch_series(h: dict[str, History], metric: str) -> History:
    """The validation metric per epoch (the final test report logs no val/ value, so nothing to drop)."""
    return [(s, v) for s, v in h.get(metric, [])]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _pct(a: float, b: float) -> str:
    return f"{(b - a) / abs(a) * 100:+.1f}%" if a else "n/a"


def check_non_finite(h: dict[str, History]) -> list[Finding]:
    out = []
    for key, hist in sorted(h.items()):
        bad = [(s, v) for s, v in hist if not math.isfinite(v)]
        if bad:
            kinds = "/".join(sorted({"NaN" if math.isnan(v) else "Inf" for _, v in bad}))
            steps = ", ".join(str(s) for s, _ in bad[:10]) + (" ..." if len(bad) > 10 else "")
            out.append(Finding("nan_inf", "error", f"{key} was {kinds} at epoch(s) {steps} ({len(bad)} of "
                               f"{len(hist)} values; first at epoch {bad[0][0]}): the run diverged there; lower the "
                               f"learning rate or keep train.optim.grad_clip on", bad[0][0]))
    return out


def check_overfitting(val: History, metric: str, mode: str, loss: History) -> list[Finding]:
    """Training loss still falling after the best validation epoch while the metric stalls or drops."""
    val = [(s, v) for s, v in val if math.isfinite(v)]
    if len(val) < 3 or not loss:
        return []
    best_step, best = (max if mode == "max" else min)(val, key=lambda p: p[1])
    last_step, last = val[-1]
    if last_step - best_step < 2:  # the best epoch is (nearly) the last: nothing to see yet
        return []
    loss_at = dict(loss)
    if best_step not in loss_at or last_step not in loss_at:
        return []
    l0, l1 = loss_at[best_step], loss_at[last_step]
    if not (math.isfinite(l0) and math.isfinite(l1)) or l1 > l0 * (1 - LOSS_FALL_REL):
        return []
    worse = (best - last) if mode == "max" else (last - best)
    trend = "dropped" if worse / abs(best or 1) > IMPROVE_REL else "stalled"
    if trend == "stalled" and last_step - best_step < STALL_EPOCHS:
        return []
    return [Finding("overfitting", "warning",
                    f"overfitting from epoch {best_step + 1}: {LOSS} fell {_fmt(l0)} -> {_fmt(l1)} ({_pct(l0, l1)}) over "
                    f"epochs {best_step}-{last_step} while {metric} {trend} ({_fmt(best)} at epoch {best_step} -> "
                    f"{_fmt(last)} at epoch {last_step}, {_pct(best, last)}); more dropout or weight decay, or fewer "
                    "epochs (early stopping keeps the best epoch's weights)", best_step + 1)]


def check_not_learning(h: dict[str, History]) -> list[Finding]:
    """A loss that stays flat over the epochs, or gradients that are zero."""
    out = []
    for key, hist in sorted(h.items()):
        if key.startswith("health/"):  # step-axis norms and counts: check_health reads them
            continue
        values = [v for _, v in hist if math.isfinite(v)]
        if "loss" in key.rsplit("/", 1)[-1] or key.startswith("train/loss"):
            if len(values) >= 3:
                mean = sum(values) / len(values)
                rel = (max(values) - min(values)) / abs(mean) if mean else 0.0
                if rel < FLAT_REL:
                    out.append(Finding("not_learning", "warning",
                                       f"{key} never moved: {_fmt(mean)} (range {_fmt(max(values) - min(values))}, "
                                       f"{rel * 100:.3f}% of its value) over {len(values)} epochs: this module is not "
                                       "learning; check its learning rate, that its parameters are trainable in this "
                                       "stage, and that its loss reaches the optimizer", hist[0][0]))
        elif "grad_norm" in key and len(values) >= 2 and max(abs(v) for v in values) < 1e-8:
            out.append(Finding("zero_grad", "warning", f"{key} was 0 at every epoch ({len(values)} epochs): no "
                               "gradient reaches these parameters (frozen, or the loss is detached)", hist[0][0]))
    return out


def _counts(h: dict[str, History], prefix: str) -> dict[str, list[tuple[int, float]]]:
    """Per module (the key's suffix after ``prefix``): the epochs with a non-zero count."""
    return {k[len(prefix):]: [(e, v) for e, v in hist if v] for k, hist in h.items()
            if k.startswith(prefix) and any(v for _, v in hist)}


def check_health(h: dict[str, History], params: dict[str, str]) -> list[Finding]:
    """Steps skipped for NaN/Inf gradients (with the modules), and modules whose gradients vanished."""
    out = []
    skipped = [(e, v) for e, v in h.get("health/skipped_steps", []) if v]
    if skipped:
        total = int(sum(v for _, v in skipped))
        where = ", ".join(f"{e} ({int(v)})" for e, v in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        bad = _counts(h, "health/nonfinite_")
        mods = ", ".join(f"{m} ({int(sum(v for _, v in c))})" for m, c in sorted(bad.items())) or "unknown modules"
        out.append(Finding("nan_grad", "warning",
                           f"{total} optimizer step(s) were skipped for NaN/Inf gradients, at epoch(s) {where}; "
                           f"gradients went bad in {mods}: lower those modules' learning rate (train.optim.groups) "
                           "or check their losses' inputs", skipped[0][0]))
    for module, counts in sorted(_counts(h, "health/vanishing_").items()):
        n = int(sum(v for _, v in counts))
        below = params.get("train.health.vanish_below", "train.health.vanish_below")
        out.append(Finding("vanishing", "warning",
                           f"module {module}: gradient norm below {below} in {n} step(s), at epoch(s) "
                           f"{', '.join(str(e) for e, _ in counts[:10])}: it barely learns (frozen by a zero loss "
                           "weight, saturated, or a learning-rate multiplier too small)", counts[0][0]))
    return out


def check_alternation(h: dict[str, History], params: dict[str, str]) -> list[Finding]:
    """An alternating schedule that never switched, or left a module without training steps."""
    alternating = any("alternating" in str(v) for v in params.values())
    switch_keys = [k for k in h if k.rsplit("/", 1)[-1] == "switches"]
    out = []
    for key in switch_keys:
        values = [v for _, v in h[key] if math.isfinite(v)]
        if values and max(values) == 0:
            out.append(Finding("no_switch", "warning",
                               f"alternation never switched: {key} stayed 0 over {len(values)} epochs, so one module "
                               "trained alone; the plateau test never fired: raise the strategy's threshold, lower "
                               "min_steps/window, or lower max_steps", h[key][0][0]))
    for key in [k for k in h if k.rsplit("/", 1)[-1].startswith("share_")]:
        last = h[key][-1][1] if h[key] else None
        if last is not None and math.isfinite(last) and last == 0.0:
            module = key.rsplit("share_", 1)[-1]
            out.append(Finding("starved", "warning", f"module {module} never trained: {key} is 0 after "
                               f"{h[key][-1][0]} epochs", h[key][0][0]))
    if alternating and not switch_keys:
        out.append(Finding("no_switch", "info", "an alternating strategy is configured but the run logged no "
                           "switch count (strategy/switches), so switching cannot be checked"))
    return out


def check_stopping(h: dict[str, History], metric: str, mode: str, params: dict[str, str],
                   tags: dict[str, str]) -> list[Finding]:
    """Early stopping, a sweep scheduler's stop, and a metric that never beat its first epoch."""
    out = []
    val = [(s, v) for s, v in h.get(metric, []) if math.isfinite(v)]
    last_epoch = max((s for s, _ in val), default=0)
    stopped = [v for _, v in h.get("stopped_early", [])]
    best_epoch = int(h["best_epoch"][-1][1]) if h.get("best_epoch") else None
    if stopped and stopped[-1] >= 1:
        patience = params.get("train.early_stopping.patience", "?")
        best = (max if mode == "max" else min)(v for _, v in val) if val else float("nan")
        out.append(Finding("early_stop", "info",
                           f"early stopping triggered after epoch {last_epoch} of {params.get('train.epochs', '?')} "
                           f"(patience {patience}): best {metric} {_fmt(best)} at epoch {best_epoch}, no improvement in "
                           f"the {last_epoch - (best_epoch or 0)} epochs after it", last_epoch))
    if tags.get("rayrec.trial_status") == "stopped_early":
        by = tags.get("rayrec.stopped_by") or "scheduler"
        best = _fmt((max if mode == "max" else min)(v for _, v in val)) if val else "-"
        out.append(Finding("early_stop", "info", f"stopped by the sweep's {by} after epoch {last_epoch} "
                           f"(best {metric} {best}): other trials were better at that point", last_epoch))
    if len(val) >= 3 and val.index((max if mode == "max" else min)(val, key=lambda p: p[1])) == 0:
        out.append(Finding("no_improvement", "warning",
                           f"{metric} was best at the first epoch ({_fmt(val[0][1])} at epoch {val[0][0]}) and never "
                           f"improved in {len(val) - 1} more epochs (last {_fmt(val[-1][1])}): the learning rate may be "
                           "too high, or the model is already saturated", val[0][0]))
    return out


def check_not_logged(tags: dict[str, str]) -> list[Finding]:
    """Writes the tracking store refused for longer than ``tracking.max_outage_s``: the record has gaps."""
    n = tags.get(NOT_LOGGED_TAG)
    if not n:
        return []
    return [Finding("not_logged", "warning", f"{n} writes of this run (metrics, tags or artifacts) never reached "
                    "MLflow during a tracking outage: its curves have gaps; the checkpoints and the run's final "
                    "table are complete")]


def _healthy(h: dict[str, History], metric: str, mode: str) -> Finding:
    loss = [v for _, v in h.get(LOSS, []) if math.isfinite(v)]
    val = [(s, v) for s, v in h.get(metric, []) if math.isfinite(v)]
    parts = []
    if len(loss) >= 2:
        parts.append(f"{LOSS} {_fmt(loss[0])} -> {_fmt(loss[-1])} ({_pct(loss[0], loss[-1])})")
    if val:
        s, v = (max if mode == "max" else min)(val, key=lambda p: p[1])
        parts.append(f"best {metric} {_fmt(v)} at epoch {s} of {val[-1][0]}")
    return Finding("ok", "info", "no problem found: " + ("; ".join(parts) or "no per-epoch metrics logged"))


# --- output -----------------------------------------------------------------------------------


def write_figure(d: Diagnosis, out: Path) -> Path | None:
    """Losses and the validation metric per epoch, with the findings' epochs marked."""
    from matplotlib.ticker import MaxNLocator

    from rayrec.tracking.plots import plt

    losses = {k: v for k, v in d.histories.items() if k.startswith("train/") and "loss" in k and v}
    val = d.histories.get(d.metric, [])
    if not losses and not val:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, hist in losses.items():
        a1.plot(*zip(*hist), marker="o", ms=3, label=key)
    if val:
        a2.plot(*zip(*val), marker="o", ms=3, color="tab:green", label=d.metric)
    for f in d.findings:
        if f.epoch is not None and f.kind != "ok":
            for ax in (a1, a2):
                ax.axvline(f.epoch, color="tab:red" if f.severity != "info" else "grey", ls="--", lw=1)
            a2.text(f.epoch, a2.get_ylim()[1], f.kind, rotation=90, va="top", ha="right", fontsize=7)
    a1.set_title("training losses")
    a2.set_title(d.metric)
    for ax in (a1, a2):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{d.run_name or d.run_id}", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "diagnose.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def print_diagnosis(d: Diagnosis) -> None:
    print(f"run {d.run_id} ({d.run_name}), judged on {d.metric}:")
    for f in d.findings:
        print(f"  [{f.severity}] {f.kind}: {f.message}")
    if d.figure:
        print(f"figure: {d.figure}")


def summary(d: Diagnosis) -> dict[str, Any]:
    """Findings as plain data (for JSON output and tests)."""
    return {"run_id": d.run_id, "metric": d.metric, "findings": [f.__dict__ for f in d.findings]}

