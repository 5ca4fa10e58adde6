"""Fixtures of the pinned reference runs and the registry smoke test (``tests/recipes``).

Every run goes through the public entry point, ``rayrec.cli.main`` (``rayrec train|sft|grpo
--local``), on a shipped job YAML shrunk by dotted overrides, and is read back from what the
run leaves on disk: the ``--json`` final metrics, the final checkpoint's ``history``
(``rayrec.train.checkpoint.load_state``), HF's ``trainer_state.json`` and the
``eval_*_metrics.json`` of ``--eval``.

Reference files: ``reference/<name>.json`` beside the tests, compared with ``RTOL``/``ATOL``.
A missing file fails. Regenerate them on purpose (a change *meant* to move the numbers) with::

    RAYREC_REGEN_REFERENCE=1 pytest tests/recipes -m "slow or not slow"

and review the diff of ``tests/recipes/reference/`` before committing it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
REGEN_ENV = "RAYREC_REGEN_REFERENCE"

#: A pinned value passes when |got - want| <= ATOL + RTOL * |want| (math.isclose). Runs are bitwise
#: repeatable on one machine (one torch thread, seeded); the slack is for a refactor that only
#: reorders float sums. ATOL covers values that are 0 up to rounding (GRPO's first loss is ~1e-8).
RTOL, ATOL = 1e-4, 1e-7

#: Metrics that measure the machine, not the model (seconds, throughput): never pinned.
UNPINNED = re.compile(r"time|per_s|throughput|seconds|flos")


def run_cli(*argv: Any) -> None:
    """``rayrec ARGV`` in this process; it must exit 0.

    No seeding here: every recipe seeds itself from ``run.seed`` (the SFT and GRPO recipes before
    the model is built, since growing the embeddings for the SID tokens draws from torch's RNG),
    so the numbers are the same in any process, whatever ran before.
    """
    from rayrec.cli import main

    args = [str(a) for a in argv]
    rc = main(args)
    assert rc == 0, f"rayrec {' '.join(args)} exited with {rc}"


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> Path:
    """One MLflow store for every run of this folder (a new sqlite store costs seconds of migrations)."""
    return tmp_path_factory.mktemp("recipes_mlflow")


@pytest.fixture(scope="session")
def tracking(mlflow_store) -> list[str]:
    """Overrides that send a run's MLflow records to the shared store."""
    return [f"tracking.uri=sqlite:///{mlflow_store}/mlflow.db", "tracking.experiment=recipes"]


# ----------------------------------------------------------------------------- reading runs back


def pinned(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics of one epoch or step without the machine-dependent ones."""
    return {k: v for k, v in metrics.items() if not UNPINNED.search(k)}


def epoch_record(run_dir: Path, final_json: Path) -> dict[str, Any]:
    """``rayrec train``: every epoch's metrics (the final checkpoint's history) and the final metrics."""
    from rayrec.train.checkpoint import load_state

    state = load_state(run_dir / "final")
    return {"epochs": [pinned(m) for m in state["history"]],
            "final": pinned(json.loads(Path(final_json).read_text()))}


def step_record(run_dir: Path) -> dict[str, Any]:
    """``rayrec sft|grpo --eval``: the newest checkpoint's HF log history (every logged step and
    validation) and the test metrics of the best adapter."""
    ckpts = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert ckpts, f"no checkpoint under {run_dir / 'checkpoints'}"
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    evals = sorted((run_dir / "checkpoints").glob("eval_*_metrics.json"))
    assert len(evals) == 1, f"expected one eval_*_metrics.json beside the checkpoints, found {evals}"
    return {"steps": [pinned(m) for m in state["log_history"]],
            "final": pinned(json.loads(evals[0].read_text()))}


def portable(argv: list[Any], **paths: Path) -> list[str]:
    """The command with machine paths as ``<name>`` (``<repo>`` for the checkout), as recorded."""
    out = []
    names = sorted({**paths, "repo": ROOT}.items(), key=lambda kv: -len(str(kv[1])))  # longest first
    for a in map(str, argv):
        for name, path in names:
            a = a.replace(str(path), f"<{name}>")
        out.append(a)
    return out


# ----------------------------------------------------------------------------- comparing


def differences(want: Any, got: Any, where: str = "") -> Iterator[str]:
    """Every place where ``got`` departs from ``want``; keys ``got`` has in addition are not differences
    (a new metric changes no pinned number)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            yield f"{where}: expected a mapping, got {got!r}"
            return
        for k, v in want.items():
            if k not in got:
                yield f"{where}[{k!r}]: missing (reference {v!r})"
            else:
                yield from differences(v, got[k], f"{where}[{k!r}]")
    elif isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            yield f"{where}: expected {len(want)} entries, got {len(got) if isinstance(got, list) else got!r}"
            return
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            yield from differences(a, b, f"{where}[{i}]")
    elif isinstance(want, bool) or want is None or isinstance(want, str):
        if got != want:
            yield f"{where}: {got!r} != reference {want!r}"
    elif isinstance(want, int | float):
        ok = isinstance(got, int | float) and not isinstance(got, bool) and (
            (math.isnan(want) and math.isnan(got)) or math.isclose(got, want, rel_tol=RTOL, abs_tol=ATOL))
        if not ok:
            yield f"{where}: {got!r} != reference {want!r}"
    elif got != want:
        yield f"{where}: {got!r} != reference {want!r}"


def check_reference(name: str, observed: dict[str, Any]) -> None:
    """Compare ``observed`` to ``reference/<name>.json`` (or write it, with ``RAYREC_REGEN_REFERENCE=1``)."""
    path = REFERENCE_DIR / f"{name}.json"
    observed = json.loads(json.dumps(observed))  # plain JSON values, as the file holds them
    if os.environ.get(REGEN_ENV):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(observed, indent=1, sort_keys=True) + "\n")
        return
    if not path.is_file():
        pytest.fail(f"{path} is missing; write it on purpose with {REGEN_ENV}=1 pytest tests/recipes "
                    f"-m 'slow or not slow' and review it", pytrace=False)
    problems = list(differences(json.loads(path.read_text()), observed))
    if problems:
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        pytest.fail(f"{name}: {len(problems)} values differ from {path.relative_to(ROOT)} "
                    f"(rtol {RTOL}, atol {ATOL}):\n  " + "\n  ".join(problems[:40]) + more
                    + f"\n(a change meant to move them: regenerate with {REGEN_ENV}=1)", pytrace=False)


@pytest.fixture(scope="session")
def pin() -> SimpleNamespace:
    """The helpers of this folder for its test modules (which cannot import a conftest by name):
    ``pin.cli(*argv)``, ``pin.check(name, observed)``, ``pin.epochs(run_dir, json)``,
    ``pin.steps(run_dir)``, ``pin.portable(argv, **paths)``, ``pin.jobs`` (the job YAML folder)."""
    return SimpleNamespace(cli=run_cli, check=check_reference, epochs=epoch_record, steps=step_record,
                           portable=portable, jobs=JOBS)
