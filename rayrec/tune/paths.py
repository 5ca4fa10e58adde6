"""Dotted paths into a job's plain-data form, including items of lists.

``train.optim.lr`` walks mappings. A segment after a list picks an item by index
(``model.stages.2.lr``) or, for lists of named items (stages, strategies), by name
(``model.stages.joint_finetune.strategies.adaptive_alternating.threshold``), which
survives reordering. A missing last key of a mapping is allowed (a ``dict`` field such
as ``lr: {sasrec: ...}`` may not hold it yet); the job schema then decides.
"""

from __future__ import annotations

import copy
from typing import Any

from rayrec.config.loader import list_index
from rayrec.errors import ConfigError


class PathError(ConfigError):
    """A dotted path does not lead to a value of the job (message says where it stopped)."""


def locate(data: Any, path: str) -> list[str | int]:
    """The concrete keys of ``path`` in ``data`` (list selectors turned into indices)."""
    parts = path.split(".")
    keys: list[str | int] = []
    node = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "(top level)"
        if isinstance(node, list):
            index = _list_index(node, part, where)
            keys.append(index)
            node = node[index]
        elif isinstance(node, dict):
            if part not in node and not last:
                raise PathError(f"'{path}': {where} has no key '{part}' (keys: {', '.join(map(str, node))})")
            keys.append(part)
            node = node.get(part)
        else:
            raise PathError(f"'{path}': {where} is a value ({node!r}), not a section")
    return keys


def _list_index(items: list[Any], part: str, where: str) -> int:
    try:
        return list_index(items, part, where)
    except ConfigError as e:
        raise PathError(str(e)) from None


def get_path(data: Any, path: str) -> Any:
    """The value at ``path`` (``None`` when its last key is absent)."""
    node = data
    for key in locate(data, path):
        node = node[key] if isinstance(node, list) else node.get(key)
    return node


def schema_path(data: Any, path: str) -> str:
    """``path`` with list selectors dropped, as ``config_paths`` lists it."""
    keys = locate(data, path)
    return ".".join(k for k in keys if isinstance(k, str))


def set_paths(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``data`` with the value of each dotted path replaced."""
    out = copy.deepcopy(data)
    for path, value in values.items():
        keys = locate(out, path)
        node = out
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return out
