"""One spec per model: everything the platform knows about a model, in one place.

A spec says how the model is built (from its config and the item count, or, for models that
read more, from the prepared data), which recipe trains it, whether it has anything to train,
and how ``rayrec train --print-groups`` plans its optimizer groups. Driver code looks models
up here by ``model.name``; it never compares names.

Adding a model: its config (``rayrec.config``), its module and builder (``rayrec.models``), and
one ``ModelSpec`` line in ``MODEL_SPECS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from rayrec.config.schema import JobConfig
from rayrec.errors import ConfigError
from rayrec.models import build_multi_interest, build_popularity, build_sasrec, build_ur4rec
from rayrec.train.groups import Group
from rayrec.train.inputs import DataInfo

#: (title, param groups, frozen parameter names) per optimizer the job builds
GroupPlan = Callable[[JobConfig, nn.Module], Iterator[tuple[str, list[Group], list[str]]]]


def phase_groups(cfg: JobConfig, model: nn.Module):
    """One optimizer per phase of ``train.phases`` (one phase without any)."""
    from rayrec.train.phases import group_plan

    yield from group_plan(cfg, model)


def stage_groups(cfg: JobConfig, model: nn.Module):
    """One optimizer per stage and trained module (the joint model)."""
    from rayrec.train.joint import group_plan

    yield from group_plan(cfg, model)


def build_with_features(cfg: JobConfig, info: DataInfo) -> nn.Module:
    """The joint model with its frozen text/image features read from the dataset folder."""
    from rayrec.train.joint import build_joint

    return build_joint(cfg, info.num_items, info.path)


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """What the platform needs to know about one model (``model.name``)."""

    name: str
    build: Callable[..., nn.Module]  # builder(num_items, model_cfg, **inputs)
    recipe: str  # the recipe that trains it (``rayrec.recipes.RECIPES``)
    parameter_free: bool = False  # fitted from counts on the driver, never on Ray Train workers
    build_from_data: Callable[[JobConfig, DataInfo], nn.Module] | None = None  # when it reads more than the config
    group_plan: GroupPlan = phase_groups


MODEL_SPECS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("sasrec", build_sasrec, recipe="sequential"),
    ModelSpec("multi_interest", build_multi_interest, recipe="sequential"),
    ModelSpec("popularity", build_popularity, recipe="sequential", parameter_free=True),
    ModelSpec("ur4rec", build_ur4rec, recipe="joint", build_from_data=build_with_features, group_plan=stage_groups),
)}


def spec_of(name: str) -> ModelSpec:
    if name not in MODEL_SPECS:
        raise ConfigError(f"unknown model '{name}'; registered: {sorted(MODEL_SPECS)}")
    return MODEL_SPECS[name]


def build_model(model_cfg: Any, num_items: int, **inputs) -> nn.Module:
    """The model a job's ``model:`` section names, over items 1..num_items (``inputs``: what its
    builder needs besides, e.g. the joint model's ``features``)."""
    return spec_of(model_cfg.name).build(num_items, model_cfg, **inputs)


def build(cfg: JobConfig, info: DataInfo) -> nn.Module:
    """The job's model over the prepared data ``info`` describes."""
    spec = spec_of(cfg.model.name)
    return spec.build_from_data(cfg, info) if spec.build_from_data else spec.build(info.num_items, cfg.model)


def has_parameters(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())
