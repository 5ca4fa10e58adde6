"""The models and their builders (``builder(num_items, model_cfg, **inputs)``).

Which builder a job's ``model.name`` gets, with the rest the platform knows about each model
(recipe, parameter-free, optimizer-group plan), is its spec in ``rayrec.train.specs``.
"""

from __future__ import annotations

from rayrec.models.joint import UR4Rec, build_ur4rec
from rayrec.models.multi_interest import MultiInterest, build_multi_interest
from rayrec.models.popularity import Popularity, build_popularity
from rayrec.models.sasrec import SASRec, build_sasrec

__all__ = ["MultiInterest", "Popularity", "SASRec", "UR4Rec", "build_multi_interest", "build_popularity",
           "build_sasrec", "build_ur4rec"]
