"""The ur4rec quickstart job end to end on Ray Train with 2 workers (shrunk by overrides)."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rayrec import recipes
from rayrec.config import load_job
from rayrec.train.checkpoint import load_state

JOB = Path(__file__).resolve().parents[1] / "jobs" / "ur4rec_quickstart.yaml"
STAGES = ("[{name: pretrain_sasrec, epochs: 1}, {name: pretrain_retriever, epochs: 1},"
          " {name: joint_finetune, epochs: 2, strategies: [{name: adaptive_alternating, window: 1,"
          " min_steps: 2, max_steps: 2}, {name: distillation}]}, {name: end_to_end, epochs: 1}]")


@pytest.mark.slow
def test_quickstart_on_ray_two_workers_logs_stages_and_switches(ray_session, tmp_path):
    cfg = load_job(JOB, [
        f"data.path={tmp_path}/data", "data.synth={users: 300, items: 120, topics: 4, mean_len: 20, images: true}",
        "model.sasrec.hidden=16", "model.sasrec.num_blocks=1", "model.sasrec.max_len=20",
        "model.retriever.hidden=16", "model.retriever.num_negatives=7", "model.fusion.top_n=40",
        "model.features.text_model=hash:64", f"model.features.cache_dir={tmp_path}/cache", f"model.stages={STAGES}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"run.storage_path={tmp_path}/runs",
    ])
    assert cfg.scaling.num_workers == 2
    out = recipes.run(cfg)
    assert out.metrics["epoch"] == 5 and out.metrics["test/hr@10"] > 3 * 10 / 120
    state = load_state(out.checkpoint)
    assert state["stage"] == 3 and state["best_model"] is not None

    c = MlflowClient(cfg.tracking.uri)
    run = c.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "ur4rec"
    stage = [int(m.value) for m in sorted(c.get_metric_history(out.mlflow_run_id, "stage"), key=lambda m: m.step)]
    assert stage == [1, 2, 3, 3, 4]
    switches = {m.step: m.value for m in c.get_metric_history(out.mlflow_run_id, "strategy/switches_epoch")}
    assert set(switches) == {3, 4} and min(switches.values()) >= 2
    for key in ("strategy/share_sasrec", "strategy/active", "train/loss_retriever", "stage/trainable_sasrec"):
        assert c.get_metric_history(out.mlflow_run_id, key), key
    assert [a.path for a in c.list_artifacts(out.mlflow_run_id, "data")] == ["data/features.json", "data/manifest.json"]
