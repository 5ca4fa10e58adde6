"""Recipes: what each kind of job does differently, run by the one driver (``rayrec.runs``).

* ``sequential``: SASRec, the multi-interest model and the popularity baseline (``rayrec train``).
* ``joint``: the UR4Rec joint model, trained in stages (``rayrec train``).
* ``sft``: LoRA SFT of a causal LM on semantic-ID prompts (``rayrec sft``).
* ``grpo``: GRPO of an SFT adapter with recommendation rewards (``rayrec grpo``).

Each recipe module defines ``RECIPE``, a ``rayrec.runs.Recipe``. Modules are imported
when first asked for, so ``rayrec train`` never imports the LLM stack.

Which recipe runs a job: its kind (``rayrec.config.kinds``) names it (``sft``, ``grpo``); a
sequential job's model spec (``rayrec.train.specs``) names it for its model.

Adding a job kind: write ``rayrec/recipes/<name>.py`` with its ``RECIPE`` (schema,
``prepare``, ``record``, ``trainer`` with its worker loop, ``local``, ``outcome``) and
add one line to ``RECIPES`` (a new model of ``JobConfig`` needs only its ``ModelSpec``).
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

def recipe_named(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}'; registered: {sorted(RECIPES)}")
    return importlib.import_module(RECIPES[name]).RECIPE


def recipe_name_for(cfg: Any) -> str:
    """The recipe of a validated job: named by its kind, or (a sequential job) by its model's spec."""
    from rayrec.config.kinds import kind_of
    from rayrec.train.specs import spec_of

    return kind_of(cfg).recipe or spec_of(cfg.model.name).recipe


def recipe_for(cfg: Any) -> Recipe:
    return recipe_named(recipe_name_for(cfg))


def run(cfg: Any, **kwargs) -> Outcome:
    """``run_job`` with the recipe of ``cfg`` (what ``rayrec train``, ``sft`` and ``grpo`` do)."""
    return run_job(recipe_for(cfg), cfg, **kwargs)


__all__ = ["RECIPES", "recipe_for", "recipe_name_for", "recipe_named", "run"]
