"""Training state on disk: one ``state.pt`` per checkpoint folder, written atomically.

A checkpoint holds the model, optimizer, scheduler, RNG states, epoch/step,
early-stopping state, the best weights so far and the resolved config (YAML),
so a resumed run continues exactly and can say how its config differs.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


def checkpoint_name(metrics: dict[str, float]) -> str:
    """``epoch_0003`` for epoch checkpoints, ``final`` for the one reported with test metrics."""
    if any(k.startswith("test/") for k in metrics):
        return "final"
    return f"epoch_{int(metrics.get('epoch', 0)):04d}"


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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_FILE}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)
    return folder / STATE_FILE


def load_state(folder: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_state`` (tensors and plain values only)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no rayrec checkpoint here")
    return torch.load(path, map_location="cpu", weights_only=True)


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
