"""The framework-free loop: learning, early stopping, exact resume, baselines, preflight errors."""

import math

import pytest
import torch

from rayrec import recipes
from rayrec.config.schema import JobConfig
from rayrec.data.dataset import open_prepared
from rayrec.errors import RayrecError
from rayrec.tracking.mlflow_tracking import Tracker
from rayrec.train.checkpoint import load_state
from rayrec.train.inputs import data_info
from rayrec.train.local import run_local


def local(cfg: JobConfig, run_dir=None, resume_from=None):
    cfg = cfg.model_copy(deep=True)
    cfg.run.checkpoint.num_to_keep = None  # the tests read every epoch's checkpoint
    ds = open_prepared(cfg.data.path)
    return run_local(cfg, ds, data_info(ds, cfg), run_dir=run_dir, tracker=Tracker.null(), resume_from=resume_from)


def test_sasrec_learns_structure_above_chance(tiny_job):
    final, rep = local(tiny_job.model_copy(update={"train": tiny_job.train.model_copy(update={"epochs": 4})}))
    losses = [m["train/loss"] for m in rep.metrics[:-1]]
    assert losses[-1] < losses[0] - 0.3
    chance = 10 / 120
    assert final["test/hr@10"] > 3 * chance
    assert rep.metrics[-1]["best_epoch"] >= 1


def test_popularity_baseline_is_evaluated_without_training(tiny_job):
    cfg = tiny_job.model_copy(update={"model": JobConfig.model_validate({"model": {"name": "popularity"}}).model})
    final, _ = local(cfg)
    assert 0 < final["test/hr@10"] < 1 and "val/ndcg@10" in final


class Crash(Exception):
    pass


def test_resume_continues_exactly(tiny_job, tmp_path):
    """Epoch 3 after resuming from epoch 2's checkpoint == epoch 3 of an uninterrupted run."""
    full, rep_full = local(tiny_job, run_dir=tmp_path / "full")
    # interrupted run: crash right after epoch 2's checkpoint is written
    from rayrec.train import local as local_mod

    orig = local_mod.LocalReporter.report

    def crashing(self, metrics, state):
        orig(self, metrics, state)
        if metrics.get("epoch") == 2 and state is not None and "test/hr@10" not in metrics:
            raise Crash

    local_mod.LocalReporter.report = crashing
    try:
        with pytest.raises(Crash):
            local(tiny_job, run_dir=tmp_path / "cut")
    finally:
        local_mod.LocalReporter.report = orig
    state = load_state(tmp_path / "cut" / "epoch_0002")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    resumed, rep = local(tiny_job, run_dir=tmp_path / "cut", resume_from=tmp_path / "cut" / "epoch_0002")
    assert rep.metrics[0]["epoch"] == 3
    assert rep.metrics[0]["train/loss"] == pytest.approx(rep_full.metrics[2]["train/loss"], rel=1e-6)
    assert resumed["test/ndcg@10"] == pytest.approx(full["test/ndcg@10"], rel=1e-6)


def test_early_stopping_and_best_weights(tiny_job, tmp_path):
    cfg = tiny_job.model_copy(deep=True)
    cfg.train.epochs = 8
    cfg.train.optim.lr = 0.3  # diverges after a while: validation stops improving
    cfg.train.optim.grad_clip = None
    cfg.train.early_stopping.patience = 1
    final, rep = local(cfg, run_dir=tmp_path / "r")
    epochs = [m["epoch"] for m in rep.metrics[:-1]]
    best = final["best_epoch"]
    assert epochs[-1] == best + 1 < 8  # stopped one epoch after the best
    assert final["stopped_early"] == 1.0
    state = load_state(tmp_path / "r" / "final")
    for k, v in state["best_model"].items():
        assert torch.equal(v, state["model"][k])
    assert math.isclose(final["best/val/ndcg@10"], max(m["val/ndcg@10"] for m in rep.metrics[:-1]))


def test_sampled_eval_mode(tiny_job):
    cfg = tiny_job.model_copy(deep=True)
    cfg.train.epochs = 1
    cfg.train.eval.mode = "sampled:20"
    final, _ = local(cfg)
    assert final["test/hr@10"] >= 0.3  # 10 of 21 candidates: sampled is far easier than full ranking


def test_preflight_errors_before_any_worker(tiny_job, tmp_path):
    cfg = tiny_job.model_copy(deep=True)
    cfg.data.path = tmp_path / "absent"
    with pytest.raises(RayrecError, match="absent"):
        recipes.run(cfg)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cfg = tiny_job.model_copy(deep=True)
    cfg.run.storage_path = ro / "runs"
    try:
        import os

        if os.geteuid() != 0:  # root ignores permission bits
            with pytest.raises(RayrecError, match="storage_path"):
                recipes.run(cfg)
    finally:
        ro.chmod(0o700)
    cfg = tiny_job.model_copy(deep=True)
    cfg.tracking.uri = "http://127.0.0.1:9"  # nothing listens on the discard port
    with pytest.raises(RayrecError, match="127.0.0.1:9"):
        recipes.run(cfg)


def test_storage_path_that_is_a_file(tiny_job, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    cfg = tiny_job.model_copy(deep=True)
    cfg.run.storage_path = f / "runs"
    with pytest.raises(RayrecError, match="cannot be created"):
        recipes.run(cfg)


def test_evaluate_hands_every_batchs_target_ranks_to_on_ranks(tiny_job):
    from rayrec.eval.metrics import MetricSums
    from rayrec.train.evaluation import evaluate
    from rayrec.train.local import PlainBatches
    from rayrec.train.specs import build

    ds = open_prepared(tiny_job.data.path)
    info = data_info(ds, tiny_job)
    model = build(tiny_job.model_copy(update={"model": JobConfig.model_validate({"model": {"name": "popularity"}}).model}),
                  info)
    seen, sums = [], MetricSums([10])

    def keep(batch, ranks):
        seen.append((batch["target"].clone(), ranks.clone()))
        sums.update(ranks)

    out = evaluate(model, PlainBatches(tiny_job, ds, info).test(), tiny_job, info.num_items, torch.device("cpu"),
                   prefix="test/", on_ranks=keep)
    targets = torch.cat([t for t, _ in seen])
    assert len(targets) == out["test/rows"] == len(ds.table("test"))
    assert all(len(t) == len(r) for t, r in seen) and all((r >= 1).all() for _, r in seen)
    assert sums.means("test") == {k: v for k, v in out.items() if k != "test/rows"}
