"""Recipes: what each kind of job does differently, run by the one driver (``rayrec.runs``).

* ``sequential``: SASRec, the multi-interest model and the popularity baseline (``rayrec train``).
* ``joint``: the UR4Rec joint model, trained in stages (``rayrec train``).
* ``sft``: LoRA SFT of a causal LM on semantic-ID prompts (``rayrec sft``).
* ``grpo``: GRPO of an SFT adapter with recommendation rewards (``rayrec grpo``).

Each recipe module defines ``RECIPE``, a ``rayrec.runs.Recipe``. Modules are imported
when first asked for, so ``rayrec train`` never imports the LLM stack.

Adding a job kind: write ``rayrec/recipes/<name>.py`` with its ``RECIPE`` (schema,
``prepare``, ``record``, ``trainer`` with its worker loop, ``local``, ``outcome``) and
add one line to ``RECIPES`` (and, for a new model of ``JobConfig``, one to ``MODEL_RECIPES``).
"""

from __future__ import annotations

import importlib
from typing import Any

from rayrec.errors import ConfigError
from rayrec.runs import Outcome, Recipe, run_job

#: recipe name -> module defining ``RECIPE``
RECIPES: dict[str, str] = {
    "sequential": "rayrec.recipes.sequential",
    "joint": "rayrec.recipes.joint",
    "sft": "rayrec.recipes.sft",
    "grpo": "rayrec.recipes.grpo",
}

#: model name of a ``JobConfig`` (``model.name``) -> the recipe that trains it
MODEL_RECIPES: dict[str, str] = {"sasrec": "sequential", "popularity": "sequential", "ur4rec": "joint",
                                 "multi_interest": "sequential"}


def recipe_named(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}'; registered: {sorted(RECIPES)}")
    return importlib.import_module(RECIPES[name]).RECIPE


def recipe_name_for(cfg: Any) -> str:
    """The recipe of a validated job: by its schema, then (a ``JobConfig``) by its model."""
    from rayrec.genrec.config import GenRecJobConfig, GRPOJobConfig

    if isinstance(cfg, GRPOJobConfig):
        return "grpo"
    if isinstance(cfg, GenRecJobConfig):
        return "sft"
    name = cfg.model.name
    if name not in MODEL_RECIPES:
        raise ConfigError(f"model '{name}' has no recipe; registered: {sorted(MODEL_RECIPES)}")
    return MODEL_RECIPES[name]


def recipe_for(cfg: Any) -> Recipe:
    return recipe_named(recipe_name_for(cfg))


def run(cfg: Any, **kwargs) -> Outcome:
    """``run_job`` with the recipe of ``cfg`` (what ``rayrec train``, ``sft`` and ``grpo`` do)."""
    return run_job(recipe_for(cfg), cfg, **kwargs)


__all__ = ["MODEL_RECIPES", "RECIPES", "recipe_for", "recipe_name_for", "recipe_named", "run"]
