"""What a trial reports to Tune, and how the sweep reads it back.

Every report carries the epoch (ASHA's clock) and the best value so far of the sweep's
metric (what Tune, ASHA and Optuna rank on); the last report of a trial that ran to the end
is told apart (``is_final``) from that of a trial stopped early.
"""

from __future__ import annotations

import math
from typing import Any

#: Tune's clock for ASHA: the epoch the Train loop reports (the final test report repeats it).
TIME_ATTR = "epoch"
#: Result key holding the checkpoint path (set by Ray's ``TuneReportCallback``).
CHECKPOINT_KEY = "checkpoint_path"
#: Set in the report of a trial's last epoch when its training loop ends without a test report
#: (generative trials), so that a trial that ran to the end is told from one stopped early.
LAST_EPOCH_KEY = "last_epoch"


def objective_key(metric: str) -> str:
    """What Tune, ASHA and Optuna rank on: the best value of ``metric`` so far in the trial.

    Every report carries it (also the final test report, which has no ``val/`` metrics),
    and it is what the trial's model selection (early stopping) keeps.
    """
    return f"best/{metric}"


def is_test_report(result: dict[str, Any]) -> bool:
    """The sequential Train loop's last report: the best weights on test."""
    return any(k.startswith("test/") for k in result)


def is_final(result: dict[str, Any]) -> bool:
    """A trial's last report, which marks a trial that ran to the end: the test report
    (sequential trials) or the report of the last epoch (generative trials)."""
    return is_test_report(result) or bool(result.get(LAST_EPOCH_KEY))


def _report_callback_base():
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback


class Objective:
    """Keeps the best value of ``metric`` over a trial's reports and adds the keys the sweep needs.

    ``best/<metric>`` (when the training loop did not report it) and ``epoch`` (the count of
    reports, when missing; with ``steps_per_report``, the checkpoints so far) end up in every report, so ASHA
    and Optuna find them,
    also in the final test report. With ``last_epoch`` (a loop without a test report), the
    report of that epoch is marked final (``LAST_EPOCH_KEY``).
    """

    def __init__(self, metric: str, mode: str, last_epoch: int | None = None,
                 steps_per_report: int | None = None) -> None:
        self.metric, self.sign = metric, 1.0 if mode == "max" else -1.0
        self.last_epoch, self.steps_per_report = last_epoch, steps_per_report
        self.best: float | None = None
        self.reports = 0

    def complete(self, metrics: dict[str, Any]) -> dict[str, Any]:
        self.reports += 1
        out = dict(metrics)
        value = out.get(self.metric)
        if value is not None and math.isfinite(value) and (self.best is None or self.sign * value > self.sign * self.best):
            self.best = float(value)
        if objective_key(self.metric) not in out and self.best is not None:
            out[objective_key(self.metric)] = self.best
        if self.steps_per_report:  # a step-based loop (GRPO): HF's epoch is a fraction; the clock counts
            step = out.get("step")     # checkpoints, from the step so that a resumed trial keeps its count
            out[TIME_ATTR] = math.ceil(step / self.steps_per_report) if step else self.reports
        else:
            out.setdefault(TIME_ATTR, self.reports)
        if self.last_epoch is not None and out[TIME_ATTR] >= self.last_epoch - 1e-6:
            out[LAST_EPOCH_KEY] = True
        return out


class SweepReportCallback(_report_callback_base()):
    """``TuneReportCallback`` whose reports always carry the objective and the epoch (see ``Objective``)."""

    def __init__(self, metric: str, mode: str, last_epoch: int | None = None,
                 steps_per_report: int | None = None) -> None:
        super().__init__()
        self.objective = Objective(metric, mode, last_epoch, steps_per_report)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        first = self.objective.complete(metrics[0])
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)
