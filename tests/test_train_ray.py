"""`rayrec train` on Ray Train: MLflow records, checkpoints, eval of a checkpoint, 2 workers."""

import pytest
from mlflow.tracking import MlflowClient

from rayrec import recipes
from rayrec.cli import main
from rayrec.config import dump_job
from rayrec.data.dataset import open_prepared
from rayrec.errors import RayrecError
from rayrec.runs import COMPLETE_MARKER
from rayrec.train.checkpoint import load_state, seed_everything
from rayrec.train.inputs import data_info
from rayrec.train.specs import build


def test_one_worker_run_logs_everything(ray_session, tiny_job):
    out = recipes.run(tiny_job)
    assert out.metrics["test/hr@10"] > 0.2 and out.metrics["epoch"] == 3 and out.metrics["test/rows"] == 300
    assert out.checkpoint and out.checkpoint.endswith("final")
    assert load_state(out.checkpoint)["epoch"] == 3
    assert (out.run_dir / COMPLETE_MARKER).exists()

    c = MlflowClient(tiny_job.tracking.uri.replace("sqlite:///", "sqlite:///"))
    run = c.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden"] == "16" and run.data.params["train.optim.lr"] == "0.005"
    losses = c.get_metric_history(out.mlflow_run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3]
    assert len(c.get_metric_history(out.mlflow_run_id, "val/ndcg_at_10")) == 3
    assert "test/ndcg_at_10" in run.data.metrics and "train/seqs_per_s" in run.data.metrics
    artifacts = {a.path for a in c.list_artifacts(out.mlflow_run_id)}
    assert {"learning_curves.png", "config", "data"} <= artifacts
    assert [a.path for a in c.list_artifacts(out.mlflow_run_id, "data")] == ["data/manifest.json"]

    # running the same job again starts a new run folder instead of "resuming" a finished one
    again = recipes.run(tiny_job.model_copy(update={"train": tiny_job.train.model_copy(update={"epochs": 1})}))
    assert again.run_dir.name == "t_v2" and again.mlflow_run_id != out.mlflow_run_id


def _variant(cfg, name: str, **data):
    cfg = cfg.model_copy(deep=True)
    cfg.run.name = name
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


@pytest.mark.slow
def test_sliding_windows_give_the_same_run_in_this_process_in_memory_on_ray_and_streamed(ray_session, tiny_job, caplog):
    """The plain loop, Ray with the row tables in the object store and Ray streaming from Ray Data
    train on the same windows in the same shuffled order: the same losses and test metrics."""
    cfg = tiny_job.model_copy(deep=True)
    cfg.train.windows, cfg.train.shuffle_buffer, cfg.train.epochs = "sliding", 64, 2
    cfg.model.loss.name, cfg.model.loss.num_negatives = "bce", 2  # negatives drawn on the data path too
    with caplog.at_level("INFO", logger="rayrec.recipes.sequential"):
        runs = {"local": recipes.run(_variant(cfg, "local"), local=True, console=False),
                "memory": recipes.run(_variant(cfg, "memory", ingest="memory"), console=False),
                "stream": recipes.run(_variant(cfg, "stream", ingest="stream"), console=False)}
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "windows (sliding)" in said and "put in the object store" in said and "streaming from Ray Data" in said
    c = MlflowClient(cfg.tracking.uri)
    losses = {k: [m.value for m in sorted(c.get_metric_history(o.mlflow_run_id, "train/loss"), key=lambda m: m.step)]
              for k, o in runs.items()}
    windows = data_info(open_prepared(cfg.data.path), cfg).train_rows
    assert windows > 300  # more rows than users
    for k in ("memory", "stream"):
        assert losses[k] == pytest.approx(losses["local"], rel=1e-4), k
        for m in ("test/ndcg@10", "test/hr@10", "test/rows"):
            assert runs[k].metrics[m] == pytest.approx(runs["local"].metrics[m], rel=1e-4), (k, m)
    assert runs["stream"].metrics["test/rows"] == 300  # every row once, split across the stream


def test_too_many_workers_fail_fast(ray_session, tiny_job):
    cfg = tiny_job.model_copy(deep=True)
    cfg.scaling.num_workers = 4
    cfg.scaling.resources_per_worker = {"CPU": 1.0}
    with pytest.raises(RayrecError, match="4 workers x 1 CPU"):
        recipes.run(cfg)


def test_eval_command_on_a_checkpoint(ray_session, tiny_job, tmp_path, capsys):
    cfg = tiny_job.model_copy(deep=True)
    cfg.train.epochs = 1
    out = recipes.run(cfg, local=True)
    job = tmp_path / "job.yaml"
    job.write_text(dump_job(cfg))
    assert main(["eval", str(job), "--checkpoint", out.checkpoint, "--split", "test"]) == 0
    printed = capsys.readouterr().out
    assert f"{out.metrics['test/ndcg@10']:.4f}" in printed


@pytest.mark.slow
def test_two_workers_ddp(ray_session, tiny_job):
    """2 DDP workers, with a phase that freezes the blocks (DDP must then look for unused parameters)."""
    from rayrec.config.progressive import PhaseConfig

    cfg = tiny_job.model_copy(deep=True)
    cfg.scaling.num_workers = 2
    cfg.train.phases = [PhaseConfig(name="embed", until_epoch=1, freeze=["blocks"]), PhaseConfig(name="all")]
    cfg.run.checkpoint.num_to_keep = 5
    out = recipes.run(cfg)
    assert out.metrics["epoch"] == 3 and out.metrics["test/hr@10"] > 0.2
    # each test row evaluated exactly once across the two workers
    assert out.metrics["test/rows"] == 300
    e1, e2 = (load_state(out.run_dir / f"epoch_000{e}")["model"] for e in (1, 2))
    blocks = [k for k in e1 if k.startswith("blocks")]
    seed_everything(cfg.run.seed)  # the workers' initial weights
    init = build(cfg, data_info(open_prepared(cfg.data.path), cfg)).state_dict()
    assert all(e1[k].equal(init[k]) for k in blocks) and not e1["item_emb.weight"].equal(init["item_emb.weight"])
    c = MlflowClient(cfg.tracking.uri)
    assert [m.value for m in sorted(c.get_metric_history(out.mlflow_run_id, "phase"), key=lambda m: m.step)] == [1, 2, 2]
    assert not all(e1[k].equal(e2[k]) for k in blocks)


def test_worker_logs_drop_ray_trains_per_report_metric_dump_but_keep_warnings():
    import logging

    from ray.train.v2._internal.execution import context

    from rayrec.workers import quiet_worker_logs

    report_log = logging.getLogger(context.__file__)  # where Ray logs "Reporting training result N: ..."
    old = report_log.level
    try:
        report_log.setLevel(logging.NOTSET)
        quiet_worker_logs()
        assert not report_log.isEnabledFor(logging.INFO) and report_log.isEnabledFor(logging.WARNING)
        assert not logging.getLogger("ray.data").isEnabledFor(logging.INFO)
    finally:
        report_log.setLevel(old)
