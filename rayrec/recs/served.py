"""The MLflow pyfunc model ``rayrec export`` logs (models-from-code: MLflow runs this file to build it).

Input: a DataFrame with ``user_id`` (a raw user id of the training data) and/or ``history`` (raw item
ids, oldest first, for a user the model never saw); params ``k`` (default 10) and ``include_seen``
(default false). A row with a history is scored on it; a row with only a known ``user_id`` on that
user's every event (``rayrec recommend --as-of all``); a row with neither known gets the most
popular items. Output: ``rayrec recommend``'s rows (user_id, rank, item_id, score); a row without a
user id is named ``row N``.

Everything the model reads is in its ``bundle`` artifact (``rayrec.recs.export`` writes it): the
scorer's checkpoint or adapter, the item vocabulary, the users' histories, the popularity counts,
and for the joint model its frozen features. Ray is never started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

BUNDLE = "bundle"


class RayrecModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from rayrec.recs.bundle import open_bundle

        self.bundle = open_bundle(Path(context.artifacts[BUNDLE]))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        return self.bundle.recommend(model_input, int(params.get("k", 10)), bool(params.get("include_seen", False)))


mlflow.models.set_model(RayrecModel())
