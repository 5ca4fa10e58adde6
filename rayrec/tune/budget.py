"""A sweep's budget in trial-epochs: the sum, over its trials, of the epochs each one trained.

Comparing models by their tuned results is fair only when each got the same search effort;
wall time is not that measure (one model's epoch costs ten of another's), trial-epochs are.
``EpochBudget`` is a Ray Tune ``Stopper``: once the trials' epoch reports add up to the budget,
Tune stops the running trials and starts no new one. ``trial_epochs`` counts the same thing
from the saved results for the summary.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ray.tune import Stopper

from rayrec.data.atomic import atomic_write
from rayrec.tune.reports import is_test_report

#: the stopper's own count, in the sweep folder: the saved results miss epochs a resumed trial trains
#: again and those of trials whose results were lost, so only this count says whether the budget ended it
SPENT_FILE = "epoch_budget.json"


class EpochBudget(Stopper):
    """Stop the whole sweep once its trials have reported ``budget`` epochs in all.

    Every epoch report counts one (the final test report repeats the last epoch and does not).
    A resumed sweep gets the saved stopper back, its count included (Tune pickles the run config).
    """

    record: str | None = None  # a stopper pickled before it recorded its count unpickles without one

    def __init__(self, budget: int, record: str | Path | None = None) -> None:
        self.budget = budget
        self.epochs: dict[str, int] = {}
        self.record = str(record) if record is not None else None  # the sweep folder (SPENT_FILE)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if not is_test_report(result):
            self.epochs[trial_id] = self.epochs.get(trial_id, 0) + 1
            if self.record is not None:
                atomic_write(Path(self.record) / SPENT_FILE, json.dumps({"spent": self.spent, "budget": self.budget}))
        return False  # the budget stops the sweep (stop_all), never one trial

    @property
    def spent(self) -> int:
        return sum(self.epochs.values())

    def stop_all(self) -> bool:
        return self.spent >= self.budget


def trial_epochs(results: Iterable[Any]) -> dict[str, int]:
    """Epochs each trial reported  # Ray Tune ``Result``s -> {trial_id: epochs} (test reports left out)."""
    out: dict[str, int] = {}
    for r in results:
        frame = getattr(r, "metrics_dataframe", None)
        trial_id = (r.metrics or {}).get("trial_id")
        if frame is None or frame.empty or not trial_id:
            continue
        tests = [c for c in frame.columns if str(c).startswith("test/")]
        out[trial_id] = int(len(frame) - (frame[tests].notna().any(axis=1).sum() if tests else 0))
    return out


def recorded_spent(sweep_dir: str | Path) -> int | None:
    """The trial-epochs the sweep's ``EpochBudget`` counted (None when it recorded nothing)."""
    path = Path(sweep_dir) / SPENT_FILE
    if not path.exists():
        return None
    return int(json.loads(path.read_text())["spent"])
