"""Model builders, looked up by the config's `name` in a plain dict."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from rayrec.config.joint import JointConfig
from rayrec.config.multi_interest import MultiInterestConfig
from rayrec.config.schema import PopularityConfig, SASRecConfig
from rayrec.errors import ConfigError
from rayrec.models.joint import UR4Rec, build_ur4rec
from rayrec.models.multi_interest import MultiInterest, build_multi_interest
from rayrec.models.popularity import Popularity, build_popularity
from rayrec.models.sasrec import SASRec, build_sasrec

# name -> builder(num_items, cfg)
MODELS: dict[str, Callable[..., nn.Module]] = {
    "sasrec": build_sasrec,
    "popularity": build_popularity,
    "ur4rec": build_ur4rec,  # also needs features=JointFeatures (rayrec.train.joint.build_joint loads them)
    "multi_interest": build_multi_interest,
}

#: models with nothing to train: fitted from counts on the driver, never on Ray Train workers
PARAMETER_FREE = frozenset({"popularity"})


def build_model(cfg: SASRecConfig | PopularityConfig | JointConfig | MultiInterestConfig, num_items: int, **inputs) -> nn.Module:
    """Build the model named by `cfg.name` (a job's `model:` section) over items 1..num_items.

    ``inputs`` are extra data a builder needs (ur4rec: ``features``)."""
    builder = MODELS.get(cfg.name)
    if builder is None:
        raise ConfigError(f"unknown model '{cfg.name}'; registered: {sorted(MODELS)}")
    return builder(num_items, cfg, **inputs)


__all__ = ["MODELS", "PARAMETER_FREE", "MultiInterest", "Popularity", "SASRec", "UR4Rec", "build_model", "build_popularity", "build_sasrec",
           "build_ur4rec"]
