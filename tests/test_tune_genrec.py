"""Sweeps of a generative base job: every trial runs `rayrec sft`'s recipe through the driver
(``run_job``) with the sweep's report callback, as a child run of the sweep in MLflow, and the best trial's config is
a job file for `rayrec sft`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_genrec_ray import job_dict

from rayrec.config import load_model
from rayrec.config.genrec import GenRecJobConfig
from rayrec.tune.reports import LAST_EPOCH_KEY, Objective, is_final
from rayrec.tune.runner import COMPLETE_MARKER, run_sweep
from rayrec.tune.space import load_space

PARAMS = {"train.lora.r": {"dist": "choice", "values": [4, 8]},
          "train.lora.alpha": {"dist": "choice", "values": [8, 16]},
          "train.lr": {"dist": "loguniform", "low": 1e-3, "high": 1e-2}}


def genrec_job(dataset: Path, tmp: Path) -> dict:
    """Two short epochs of test_genrec_ray's tiny job (fixed SID index, 120-item dataset)."""
    cfg = job_dict(dataset, tmp, epochs=2)
    del cfg["eval"]["max_rows"]  # the sweep scores on train.val_rows; the test split is not decoded
    return cfg


def test_the_last_epoch_report_of_a_generative_trial_is_final():
    obj = Objective("val/ndcg@5", "max", last_epoch=2)
    first = obj.complete({"epoch": 1.0, "val/ndcg@5": 0.2})
    last = obj.complete({"epoch": 2.0, "val/ndcg@5": 0.1})
    assert not is_final(first) and is_final(last) and last[LAST_EPOCH_KEY]
    assert last["best/val/ndcg@5"] == 0.2


@pytest.mark.slow
def test_lora_sweep_trials_are_sft_runs_in_mlflow_child_runs(ray_session, tiny_dataset, tmp_path):
    job = genrec_job(tiny_dataset, tmp_path)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    space = {"job": "job.yaml", "metric": "val/ndcg@5", "num_samples": 2, "max_concurrent_trials": 2,
             "params": PARAMS, "trial": {"num_workers": 1, "resources_per_worker": {"CPU": 0.25}, "driver_cpu": 0.25},
             "searcher": {"name": "random", "seed": 0}, "scheduler": {"name": "none"},
             "storage_path": str(tmp_path / "tune")}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    sweep = load_space(tmp_path / "space.yaml")
    assert isinstance(sweep.job, GenRecJobConfig)

    out = run_sweep(sweep)
    assert not out.interrupted and (out.sweep_dir / COMPLETE_MARKER).exists()
    assert [(r.status, r.epochs) for r in out.rows] == [("completed", 2)] * 2

    # every epoch of both trials reached Tune with the metric, the objective and the epoch
    for row in out.rows:
        lines = (out.sweep_dir / f"trial_{row.trial_id}" / "result.json").read_text().splitlines()
        reports = [json.loads(line) for line in lines]
        assert [r["epoch"] for r in reports] == [1, 2]
        assert all("val/ndcg@5" in r and "val/hr@5" in r and "best/val/ndcg@5" in r for r in reports)
        assert [bool(r.get(LAST_EPOCH_KEY)) for r in reports] == [False, True]
        assert row.value == max(r["val/ndcg@5"] for r in reports)

    # one MLflow child run per trial: the searched values, the per-epoch metrics, the adapter
    uri = job["tracking"]["uri"]
    c = MlflowClient(uri)
    parent = c.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.job_kind"] == "genrec"
    kids = c.search_runs([c.get_experiment_by_name("tests").experiment_id],
                         f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    assert sorted(k.data.tags["rayrec.trial_id"] for k in kids) == sorted(r.trial_id for r in out.rows)
    rows = {r.trial_id: r for r in out.rows}
    for kid in kids:
        row = rows[kid.data.tags["rayrec.trial_id"]]
        assert kid.info.status == "FINISHED" and kid.data.tags["rayrec.trial_status"] == "completed"
        assert set(kid.data.params) == set(PARAMS)
        assert int(kid.data.params["train.lora.r"]) == row.params["train.lora.r"]
        assert float(kid.data.params["train.lr"]) == pytest.approx(row.params["train.lr"])
        assert len(c.get_metric_history(kid.info.run_id, "val/ndcg_at_5")) == 2
        adapter = Path(kid.data.tags["rayrec.checkpoint"])  # the best adapter, for `rayrec eval-genrec --adapter`
        assert adapter.name == "checkpoint" and (adapter / "adapter_model.safetensors").is_file()
        assert kid.data.tags["rayrec.adapter"] == str(adapter)

    # the best trial's config is a job that `rayrec sft` loads, with the best values
    best = load_model(GenRecJobConfig, out.best_job)
    assert best.train.lora.r == out.best.params["train.lora.r"] and best.train.lr == pytest.approx(
        out.best.params["train.lr"])
    assert best.train.epochs == 2 and best.run.storage_path == Path(job["run"]["storage_path"])
    assert f"# Run: rayrec sft {out.best_job}" in out.best_job.read_text()
