"""`rayrec compare` and `rayrec diagnose` on runs logged into a temporary MLflow store.

The runs are logged the way training logs them (``Tracker``, one step per epoch, ``@`` keys),
with histories scripted to show each problem diagnose must find. The sweep test in
test_tune_sweep.py runs both commands on real trial runs as well.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from rayrec.cli import main
from rayrec.errors import RayrecError
from rayrec.tracking.compare import compare, differing_params
from rayrec.tracking.diagnose import diagnose
from rayrec.tracking.mlflow_tracking import Tracker, open_run

NAN = float("nan")


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One store for the module (creating an MLflow database takes seconds); runs differ by name."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def log_run(uri: str, name: str, history: dict[str, list[float]], params: dict | None = None,
            tags: dict | None = None, final: dict | None = None, experiment: str = "diag") -> str:
    """One run with per-epoch metrics (epoch = list position + 1) and an optional final report."""
    tracker = open_run(uri, experiment, f"/runs/{name}", name, tags=tags)
    tracker.log_params(params or {})
    epochs = max(len(v) for v in history.values())
    for e in range(epochs):
        tracker.log_metrics({k: v[e] for k, v in history.items() if e < len(v)}, step=e + 1)
    if final:
        tracker.log_metrics(final, step=epochs)
    tracker.finish("FINISHED")
    return tracker.run_id


def kinds(report) -> set[str]:
    return {f.kind for f in report.findings}


# --- diagnose ---------------------------------------------------------------------------------


def test_overfitting_is_found_with_the_epoch_it_began(uri):
    rid = log_run(uri, "overfit", {"train/loss": [4.0, 3.5, 3.0, 2.6, 2.3],
                                   "val/ndcg@10": [0.10, 0.15, 0.14, 0.12, 0.11]})
    report = diagnose(uri, rid)
    f = next(f for f in report.findings if f.kind == "overfitting")
    assert f.epoch == 3 and f.severity == "warning"
    assert "train/loss fell 3.5 -> 2.3 (-34.3%)" in f.message
    assert "val/ndcg@10 dropped (0.15 at epoch 2 -> 0.11 at epoch 5, -26.7%)" in f.message


def test_a_module_whose_loss_never_moves_is_not_learning(uri):
    rid = log_run(uri, "dead", {"train/loss": [4.0, 3.6, 3.3, 3.1], "train/loss/retriever": [2.3026] * 4,
                                "val/ndcg@10": [0.1, 0.12, 0.13, 0.14]})
    report = diagnose(uri, rid)
    dead = [f for f in report.findings if f.kind == "not_learning"]
    assert len(dead) == 1 and dead[0].message.startswith("train/loss/retriever never moved: 2.303")
    assert "overfitting" not in kinds(report)


def test_nan_steps_are_listed(uri):
    rid = log_run(uri, "nan", {"train/loss": [4.0, 3.5, NAN, NAN], "val/ndcg@10": [0.1, 0.12, 0.0, 0.0]})
    report = diagnose(uri, rid)
    assert report.findings[0].kind == "nan_inf" and report.findings[0].severity == "error"
    assert "train/loss was NaN at epoch(s) 3, 4 (2 of 4 values; first at epoch 3)" in report.findings[0].message


def test_skipped_nan_steps_and_vanishing_gradients_are_reported(uri):
    rid = log_run(uri, "health", {"train/loss": [4.0, 3.5, 3.2], "val/ndcg@10": [0.1, 0.12, 0.13],
                                  "health/skipped_steps": [0, 2, 1], "health/nonfinite_blocks": [0, 2, 1],
                                  "health/nonfinite_item_emb": [0, 1, 0], "health/vanishing_causal": [0, 0, 7]},
                  params={"train.health.vanish_below": "1e-07"})
    report = diagnose(uri, rid)
    nan = next(f for f in report.findings if f.kind == "nan_grad")
    assert nan.epoch == 2 and "3 optimizer step(s) were skipped" in nan.message
    assert "at epoch(s) 2 (2), 3 (1)" in nan.message and "blocks (3), item_emb (1)" in nan.message
    van = next(f for f in report.findings if f.kind == "vanishing")
    assert van.epoch == 3 and van.message.startswith("module causal: gradient norm below 1e-07 in 7 step(s)")
    assert "nan_inf" not in kinds(report) and "ok" not in kinds(report)


def test_alternation_that_never_switched(uri):
    rid = log_run(uri, "stuck", {"train/loss": [4.0, 3.5, 3.2], "val/ndcg@10": [0.1, 0.12, 0.13],
                                 "strategy/switches": [0, 0, 0], "strategy/share_sasrec": [1.0, 1.0, 1.0],
                                 "strategy/share_retriever": [0.0, 0.0, 0.0]},
                  params={"model.stages": "[{'name': 'joint_finetune', 'strategies': [{'name': 'adaptive_alternating'}]}]"})
    report = diagnose(uri, rid)
    messages = {f.kind: f.message for f in report.findings}
    assert messages["no_switch"].startswith("alternation never switched: strategy/switches stayed 0 over 3 epochs")
    assert messages["starved"] == "module retriever never trained: strategy/share_retriever is 0 after 3 epochs"


def test_early_stopping_and_a_metric_that_never_improved(uri):
    rid = log_run(uri, "stopped", {"train/loss": [4.0, 3.9, 3.8, 3.7], "val/ndcg@10": [0.2, 0.19, 0.18, 0.17]},
                  params={"train.early_stopping.patience": "3", "train.epochs": "20"},
                  final={"stopped_early": 1.0, "best_epoch": 1.0, "test/ndcg@10": 0.18})
    report = diagnose(uri, rid)
    messages = {f.kind: f.message for f in report.findings}
    assert messages["early_stop"].startswith("early stopping triggered after epoch 4 of 20 (patience 3): "
                                             "best val/ndcg@10 0.2 at epoch 1")
    assert messages["no_improvement"].startswith("val/ndcg@10 was best at the first epoch (0.2 at epoch 1)")


def test_healthy_run_says_so_and_the_cli_writes_a_figure(uri, tmp_path, capsys):
    rid = log_run(uri, "fine", {"train/loss": [4.0, 3.5, 3.2, 3.0], "val/ndcg@10": [0.1, 0.12, 0.13, 0.14]})
    assert main(["diagnose", rid[:10], "--tracking-uri", uri, "--out", str(tmp_path / "diag")]) == 0
    out = capsys.readouterr().out
    assert "[info] ok: no problem found: train/loss 4 -> 3 (-25.0%); best val/ndcg@10 0.14 at epoch 4 of 4" in out
    assert (tmp_path / "diag" / "diagnose.png").stat().st_size > 5000


def test_unknown_run_is_a_clear_error(uri):
    with pytest.raises(RayrecError, match="no MLflow run with id deadbeef"):
        diagnose(uri, "deadbeef")


# --- compare ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_runs(uri) -> dict[str, str]:
    """A sweep parent and four trials (lr, dropout vary; num_blocks is the same), plus a stray run."""
    parent = open_run(uri, "exp", "/runs/sw", "sw", tags={"rayrec.kind": "sweep"})
    ids = {"parent": parent.run_id}
    curves = {"a": [0.10, 0.20, 0.25], "b": [0.12, 0.15, 0.14], "c": [0.05, 0.07], "d": [0.2, 0.3, 0.31]}
    lrs = {"a": "0.001", "b": "0.01", "c": "0.0001", "d": "0.003"}
    for name, curve in curves.items():
        ids[name] = log_run(uri, f"sw/{name}", {"val/ndcg@10": curve, "train/loss": [4 - i * 0.2 for i in range(len(curve))]},
                            params={"train.optim.lr": lrs[name], "model.dropout": str(0.1 * len(name + lrs[name])),
                                    "model.num_blocks": "2"},
                            tags={"mlflow.parentRunId": parent.run_id, "rayrec.sweep": "sw",
                                  "rayrec.trial_status": "stopped_early" if len(curve) < 3 else "completed"},
                            final={"test/ndcg@10": 0.9} if len(curve) == 3 else None, experiment="exp")
    ids["other"] = log_run(uri, "other", {"val/ndcg@10": [0.5]}, params={"train.optim.lr": "0.5"}, experiment="exp")
    return ids


def test_compare_sorts_by_best_metric_and_shows_only_differing_params(uri, sweep_runs, tmp_path):
    result = compare(uri, "exp", metric="val/ndcg@10", sweep="sw", out=tmp_path / "cmp", top=2)
    t = result.table
    assert list(t["name"]) == ["sw/d", "sw/a", "sw/b", "sw/c"]  # best val first; the parent is not a run here
    assert list(t["best val/ndcg@10"]) == [0.31, 0.25, 0.15, 0.07]
    assert list(t["status"]) == ["completed", "completed", "completed", "stopped_early"]
    assert list(t["epochs"]) == [3, 3, 3, 2]
    assert "train.optim.lr" in result.params and "model.num_blocks" not in result.params
    assert t["train.optim.lr"].tolist() == [0.003, 0.001, 0.01, 0.0001]  # numbers again, not strings
    assert set(result.curves) == {sweep_runs["d"], sweep_runs["a"]}
    names = {p.name for p in result.files}
    assert names == {"runs.csv", "runs.md", "metric_vs_params.png", "learning_curves.png", "parallel_coordinates.png"}
    assert pd.read_csv(tmp_path / "cmp" / "runs.csv")["name"].tolist() == ["sw/d", "sw/a", "sw/b", "sw/c"]
    md = (tmp_path / "cmp" / "runs.md").read_text()
    assert md.startswith("# exp: 4 runs by best val/ndcg@10 (max)") and "| sw/d |" in md
    assert all((tmp_path / "cmp" / n).stat().st_size > 5000 for n in names if n.endswith(".png"))


def test_compare_runs_filter_and_cli(uri, sweep_runs, tmp_path, capsys):
    argv = ["compare", "exp", "--tracking-uri", uri, "--runs", "other", sweep_runs["b"][:8],
            "--out", str(tmp_path / "c2")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "exp: 2 runs by best val/ndcg@10 (max)" in out
    assert out.index("other") < out.index("sw/b")
    with pytest.raises(RayrecError, match="no run with id, id prefix or name nope"):
        compare(uri, "exp", runs=["nope"])


def test_compare_errors_name_what_exists(uri, sweep_runs):
    with pytest.raises(RayrecError, match="no MLflow experiment 'nope' .* experiments there: .*exp"):
        compare(uri, "nope")
    with pytest.raises(RayrecError, match="--metric val/accuracy: 'val/accuracy' is not a ranking metric"):
        compare(uri, "exp", metric="val/accuracy")


def test_differing_params_counts_a_missing_param_as_different():
    frame = pd.DataFrame({"params.a": ["1", "1"], "params.b": ["1", None], "params.c": ["x", "y"]})
    assert differing_params(frame) == ["b", "c"]


def test_tracker_history_round_trip_keeps_nan(uri):
    rid = log_run(uri, "n", {"val/ndcg@10": [0.1, NAN]})
    assert math.isnan(Tracker(uri, rid).history("val/ndcg@10")[1][1])


def test_compare_draws_runs_of_different_kinds(uri, tmp_path):
    """An SFT run and a GRPO run side by side: a param only one of them has (grpo.beta) and a text param
    (model.base, grpo.adapter) are drawn, with '-' for the run that lacks it."""
    log_run(uri, "sft", {"val/ndcg@10": [0.20, 0.21]}, params={"train.lr": "0.005", "model.base": "tiny"},
            experiment="kinds")
    log_run(uri, "grpo", {"val/ndcg@10": [0.22]}, params={"train.lr": "0.0003", "model.base": "/m/base",
                                                         "grpo.beta": "0.001", "grpo.adapter": "/runs/sft"},
            experiment="kinds")
    result = compare(uri, "kinds", out=tmp_path / "cmp")
    assert list(result.table["name"]) == ["grpo", "sft"] and "grpo.beta" in result.params
    assert (tmp_path / "cmp" / "metric_vs_params.png").stat().st_size > 5000
