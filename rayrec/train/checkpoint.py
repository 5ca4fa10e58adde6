"""Training state on disk: one ``state.pt`` per checkpoint folder, written atomically.

A checkpoint holds the model, optimizer, scheduler, RNG states, epoch/step,
early-stopping state, the best weights so far and the resolved config (YAML),
so a resumed run continues exactly and can say how its config differs.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from rayrec.data.atomic import atomic_path
from rayrec.errors import RayrecError

log = logging.getLogger(__name__)


class CheckpointError(RayrecError):
    """A checkpoint that is missing or cannot be read."""


STATE_FILE = "state.pt"
#: Key of a mid-epoch report (``run.checkpoint.every_n_steps``): the optimizer step it was taken at.
MID_EPOCH_STEP = "mid_epoch_step"
_NAME = re.compile(r"^epoch_(\d+)(?:_step_(\d+))?$")


def checkpoint_name(metrics: dict[str, float]) -> str:
    """``epoch_0003`` for epoch checkpoints, ``epoch_0004_step_0001500`` for one taken inside
    epoch 4 at optimizer step 1500, ``final`` for the one reported with test metrics."""
    if any(k.startswith("test/") for k in metrics):
        return "final"
    name = f"epoch_{int(metrics.get('epoch', 0)):04d}"
    if MID_EPOCH_STEP in metrics:
        name += f"_step_{int(metrics[MID_EPOCH_STEP]):07d}"
    return name


def resume_metrics(state: dict[str, Any]) -> dict[str, float]:
    """What a restarted run logs (at MLflow step = epochs completed): where it picked up.

    Every worker or driver restart adds one point, so the run's history shows each resume.
    """
    return {"resume/epoch": float(state["epoch"]), "resume/step": float(state["step"]),
            "resume/epoch_batch": float(state.get("epoch_batch", 0))}


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (``final`` > ``epoch_N`` > ``epoch_N_step_S``).

    Only folders holding ``state.pt`` count: ``save_state`` renames that file into place as its
    last act, so a checkpoint cut off while being written is never picked.
    """
    found = _newest_first(run_dir)
    return found[0] if found else None


def checkpoint_rank(name: str) -> tuple[float, float]:
    """How new a checkpoint folder named ``name`` is (``final`` > ``epoch_N`` > ``epoch_N_step_S``)."""
    if name == "final":
        return (float("inf"), float("inf"))
    m = _NAME.match(name)
    if not m:
        return (-1.0, -1.0)
    return (float(m.group(1)), float(m.group(2)) if m.group(2) else float("inf"))


def _newest_first(run_dir: str | Path) -> list[Path]:
    """A run's complete checkpoint folders, newest first (see ``latest_checkpoint``)."""
    run_dir = Path(run_dir)
    found = []
    for d in run_dir.glob("epoch_*"):
        m = _NAME.match(d.name)
        if m and (d / STATE_FILE).is_file():
            step = int(m.group(2)) if m.group(2) else float("inf")  # a finished epoch beats its own steps
            found.append((int(m.group(1)), step, d))
    folders = [d for *_, d in sorted(found, reverse=True)]
    return ([run_dir / "final"] if (run_dir / "final" / STATE_FILE).is_file() else []) + folders


SCORE_FILE = "score.json"


def write_score(folder: Path, metric: str, value: float) -> None:
    """The checkpoint's value of the selection metric, beside its state (what ``prune_checkpoints`` ranks)."""
    (Path(folder) / SCORE_FILE).write_text(json.dumps({"metric": metric, "value": value}))


def prune_checkpoints(run_dir: Path, newest: Path, num_to_keep: int, metric: str, mode: str) -> list[Path]:
    """Keep the best ``num_to_keep`` checkpoints of a run by ``metric`` plus ``newest``; remove the other
    checkpoint folders (only folders named as rayrec names checkpoints). Returns those removed."""
    import shutil

    scored, unscored = [], []
    for folder in _newest_first(run_dir):
        try:
            score = json.loads((folder / SCORE_FILE).read_text())
            value = float(score["value"]) if score.get("metric") == metric else None
        except (OSError, ValueError, KeyError, TypeError):
            value = None
        (unscored if value is None or value != value else scored).append((value, folder))
    scored.sort(key=lambda p: p[0], reverse=mode == "max")
    keep = {folder for _, folder in scored[:num_to_keep]} | {Path(newest)}
    removed = [folder for _, folder in scored + unscored if folder not in keep]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list | tuple) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_state(state: dict[str, Any], folder: str | Path) -> Path:
    """Write ``state`` to ``folder/state.pt`` via a temporary file and an atomic rename."""
    buf = io.BytesIO()  # serialised first: a full disk is then an OSError naming its errno (torch's own
    torch.save(state, buf)  # file writer reports it as "enforce fail at inline_container.cc")
    with atomic_path(Path(folder) / STATE_FILE) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())
    return Path(folder) / STATE_FILE


def load_state(folder: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_state`` (tensors and plain values only); a torn or corrupt
    file is a ``CheckpointError`` naming it."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no rayrec checkpoint here (no {STATE_FILE})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None


def newest_readable(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run that loads; a newer one that does not (a disk filled up, a copy cut
    short) is skipped with a warning naming it, so a re-run resumes from the one before."""
    for folder in _newest_first(run_dir):
        try:
            load_state(folder)
        except CheckpointError as e:
            log.warning("%s; resuming from the checkpoint before it", e)
            continue
        return folder
    return None


def config_diff(old_yaml: str, new_yaml: str) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two resolved configs."""
    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, val in node.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    a, b = flat(yaml.safe_load(old_yaml) or {}), flat(yaml.safe_load(new_yaml) or {})
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def warn_config_diff(old_yaml: str, new_yaml: str) -> dict[str, tuple[Any, Any]]:
    diff = config_diff(old_yaml, new_yaml)
    for key, (old, new) in diff.items():
        log.warning("resuming with a different config: %s was %r in the checkpoint, now %r", key, old, new)
    return diff
