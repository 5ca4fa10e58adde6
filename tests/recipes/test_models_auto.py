"""Every registered model, tiny, through the normal path (RecBole's ``test_model_auto``).

For each name the registry holds: ``rayrec train jobs/quickstart.yaml --local`` with ``model`` replaced
by a tiny section of that model, one epoch; the losses and test metrics must be finite and
well-formed (every test row ranked among the items), and ``rayrec eval`` of the checkpoint must
score the test split to the same metrics. A newly registered model is covered without an edit here:
it runs with its config's defaults unless ``TINY`` shrinks it.
"""

from __future__ import annotations

import json
import math

import pytest


def registered_models() -> list[str]:
    """The names of every registered model (the one place that knows where the registry lives)."""
    from rayrec.train.specs import MODEL_SPECS

    return sorted(MODEL_SPECS)


def tiny_model(name: str, tmp_path) -> dict:
    """A small ``model:`` section for ``name`` (defaults for a model not listed)."""
    seq = {"hidden": 16, "num_blocks": 1, "max_len": 20}
    tiny = {
        "sasrec": seq,
        "multi_interest": {**seq, "num_interests": 2, "vae": {"latent": 8}, "complex": {"dim": 8}},
        "ur4rec": {"sasrec": seq, "retriever": {"hidden": 16, "num_negatives": 7, "train_positions": 4},
                   "fusion": {"top_n": 40},
                   "features": {"text_model": "hash:32", "user_text": "dataset", "item_text": "dataset",
                                "dir": str(tmp_path / "features"), "cache_dir": str(tmp_path / "cache")},
                   "stages": [{"name": "end_to_end", "epochs": 1}]},
    }
    return {"name": name, **tiny.get(name, {})}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", registered_models())
def test_model_trains_and_scores(name, pin, tiny_mm_dataset, tmp_path, tracking, capsys):
    import pandas as pd

    job = pin.jobs / "quickstart.yaml"
    overrides = [f"data.path={tiny_mm_dataset}", "data.prepare_if_missing=false",
                 f"model={json.dumps(tiny_model(name, tmp_path))}", "train.epochs=1", "train.windows=last",
                 "train.optim.warmup_steps=0", f"run.storage_path={tmp_path}/runs", "run.name=auto",
                 *tracking]
    pin.cli("train", job, "--local", "--json", tmp_path / "final.json", *overrides)

    final = json.loads((tmp_path / "final.json").read_text())
    items = len(pd.read_parquet(tiny_mm_dataset / "items.parquet"))
    rows = len(pd.read_parquet(tiny_mm_dataset / "test.parquet"))
    assert final["test/rows"] == rows, final
    assert all(math.isfinite(v) for v in final.values()), final
    assert 1 <= final["test/mean_rank"] <= items  # each test target ranked among the items
    hr = [final[f"test/hr@{k}"] for k in (5, 10, 20)]
    assert 0 <= hr[0] <= hr[1] <= hr[2] <= 1 and 0 < final["test/mrr"] <= 1, final

    ckpt = tmp_path / "runs" / "auto" / "final"
    from rayrec.train.checkpoint import load_state
    from rayrec.train.specs import spec_of

    history = load_state(ckpt)["history"]
    if spec_of(name).parameter_free:  # nothing to train (popularity): fitted, evaluated, its counts checkpointed
        assert history == [] and "best_epoch" not in final
    else:
        assert [m["epoch"] for m in history] == [1]
        losses = {k: v for k, v in history[0].items() if k.startswith("train/loss")}
        assert "train/loss" in losses and all(math.isfinite(v) for v in losses.values()), losses
    capsys.readouterr()
    pin.cli("eval", job, "--checkpoint", ckpt, *overrides)  # the checkpoint alone scores test the same
    out = capsys.readouterr().out
    assert f"{final['test/ndcg@10']:.4f}" in out and f"{final['test/hr@10']:.4f}" in out, out
