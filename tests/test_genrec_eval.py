"""Evaluation: metrics on a handmade results file, popularity baseline, and the local path end to end."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from mlflow.tracking import MlflowClient

from rayrec.cli import main
from rayrec.config.genrec import GenRecJobConfig
from rayrec.data.dataset import open_prepared
from rayrec.genrec import evaluate as E

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sid(i: int | None) -> str | None:
    return None if i is None else f"<a_{i}>"


def row(target: int, predicted: list[int | None]) -> dict:
    return {"user_idx": target, "input": "The user interacted with: <a_0>", "target": sid(target),
            "target_item": target, "predictions": [sid(i) for i in predicted], "predicted_items": predicted,
            "rank": E.rank_of(target, predicted)}


HANDMADE = [row(1, [1, 2, 3, 4, 5]), row(2, [5, 4, 2, 1, 3]), row(3, [1, 2, 4, 5, None]), row(4, [1, 4, 2, 3, 5])]


def test_metrics_of_a_handmade_results_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(HANDMADE))
    rows = json.loads(path.read_text())
    assert [r["rank"] for r in rows] == [1, 3, None, 2]
    m = E.metrics_from_results(rows, [1, 3, 5], "test")
    assert m["test/hr@1"] == pytest.approx(1 / 4)
    assert m["test/hr@3"] == pytest.approx(3 / 4) and m["test/hr@5"] == pytest.approx(3 / 4)
    assert m["test/ndcg@1"] == pytest.approx(1 / 4)
    assert m["test/ndcg@3"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(3)) / 4)
    assert m["test/invalid"] == 1 and m["test/rows"] == 4
    assert set(m) == {"test/hr@1", "test/hr@3", "test/hr@5", "test/ndcg@1", "test/ndcg@3", "test/ndcg@5",
                      "test/invalid", "test/rows", "test/ambiguous_targets"}


def test_show_prints_hits_or_misses_with_the_rank(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(HANDMADE))
    assert main(["genrec", "show", str(path), "--incorrect", "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "1 of 4 rows (misses)" in out and "rank > 5" in out and "target <a_3>" in out
    assert main(["genrec", "show", str(path), "--correct", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 of 4 rows (hits)" in out and "1. <a_1> *" in out and "rank 3" in out


def test_popularity_baseline_ranks_by_train_counts(tiny_dataset):
    ds = open_prepared(tiny_dataset)
    counts = Counter(int(i) for seq in ds.table("train")["seq"] for i in seq)
    order = sorted(range(1, ds.num_items + 1), key=lambda i: (-counts[i], i))
    targets = ds.table("test")["target"].astype(int).tolist()
    m = E.popularity_metrics(ds, targets, [10], "test")
    assert m["test_popularity/hr@10"] == pytest.approx(sum(t in order[:10] for t in targets) / len(targets))


def write_test_index(dataset, folder) -> None:
    """A fixed unique SID per item (building one with MiniLM is tested in test_genrec_sids)."""
    from rayrec.genrec.semantic_ids import write_index
    from rayrec.genrec.tiny import grid_index

    write_index(grid_index(open_prepared(dataset).table("items")), folder, "items")


@pytest.fixture(scope="module")
def tiny_genrec(tiny_dataset, tmp_path_factory):
    """A minute-sized genrec job on the shared 120-item dataset, writing under a temp folder."""
    tmp = tmp_path_factory.mktemp("genrec")
    write_test_index(tiny_dataset, tmp / "sids")
    return GenRecJobConfig.model_validate({
        "data": {"path": str(tiny_dataset), "prepare_if_missing": False},
        "sids": {"method": "file", "dir": str(tmp / "sids"), "name": "items"},
        "prompts": {"tasks": {"sid_seq": 1.0, "title_to_sid": 0.5}, "max_history": 3, "max_examples": 600},
        "model": {"tiny": {"hidden": 32}, "max_length": 96},
        "train": {"epochs": 1, "batch_size": 32, "lr": 5e-3, "logging_steps": 5, "val_rows": 16,
                  "lora": {"r": 4, "alpha": 8}},
        "eval": {"num_beams": 10, "ks": [1, 5, 10], "batch_size": 16, "max_rows": 40},
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 0.5}},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "tests"},
        "run": {"name": "g", "storage_path": str(tmp / "runs")},
    })


def test_local_sft_then_evaluation_end_to_end(tiny_genrec):
    from rayrec import recipes

    out = recipes.run(tiny_genrec, local=True)
    assert out.checkpoint and "val/ndcg@10" in out.metrics and "val/loss" in out.metrics
    res = E.evaluate_adapter(tiny_genrec, out.checkpoint, local=True)
    assert res.metrics["test/invalid"] == 0 and res.metrics["test/rows"] == 40
    assert "test_popularity/hr@10" in res.metrics and 0 <= res.metrics["test/hr@10"] <= 1
    rows = json.loads(res.results_path.read_text())
    assert len(rows) == 40 and {"input", "target", "predictions", "rank"} <= set(rows[0])
    assert all(len(r["predictions"]) == 10 and None not in r["predictions"] for r in rows)
    run = MlflowClient(tiny_genrec.tracking.uri).get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED" and "test/hr_at_10" in run.data.metrics
    assert {"train/loss", "val/loss", "val/ndcg_at_10", "sids/collision_rate"} <= set(run.data.metrics)
    assert run.data.params["train.lora.r"] == "4"
