"""`rayrec recommend` and `rayrec eval-recs` (issue 27): top-K files that agree with `rayrec eval`."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from rayrec.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """A finished SASRec run of the tiny dataset (3 epochs, in this process)."""
    from rayrec import recipes
    from rayrec.config.schema import JobConfig

    work = tmp_path_factory.mktemp("recs")
    cfg = JobConfig.model_validate({
        "data": {"path": str(tiny_dataset), "prepare_if_missing": False},
        "model": {"name": "sasrec", "hidden": 16, "num_blocks": 1, "max_len": 20},
        "train": {"epochs": 3, "batch_size": 32, "optim": {"lr": 0.005}, "windows": "last",
                  "eval": {"ks": [5, 10, 20]}},
        "tracking": {"enabled": False},
        "run": {"name": "r", "storage_path": str(work / "runs"), "seed": 0},
    })
    out = recipes.run(cfg, local=True)
    return cfg, out.run_dir, work


def recs_of(folder):
    return pd.read_parquet(folder / "recs.parquet")


def recs_equal_eval(run: Path, out: Path) -> None:
    """`rayrec recommend` of a finished run, scored by `eval-recs`, equals `rayrec eval` of its checkpoint."""
    from rayrec.recs.evaluate import eval_recs
    from rayrec.recs.recommend import job_of
    from rayrec.train.checkpoint import load_state
    from rayrec.train.local import evaluate_checkpoint

    assert main(["recommend", str(run), "--k", "20", "--out", str(out), "--local"]) == 0
    got = eval_recs(out, "test")
    want, _ = evaluate_checkpoint(job_of(load_state(run / "final")), run / "final", "test")
    for key in ("test/hr@5", "test/ndcg@5", "test/hr@10", "test/ndcg@10", "test/hr@20", "test/ndcg@20"):
        assert got[key] == pytest.approx(want[key], abs=1e-6)


def test_eval_recs_equals_eval_on_the_same_checkpoint(trained, tmp_path, capsys):
    from rayrec.recs.evaluate import eval_recs
    from rayrec.train.local import evaluate_checkpoint

    cfg, run_dir, _ = trained
    assert main(["recommend", str(run_dir), "--k", "20", "--out", str(tmp_path / "recs"), "--local"]) == 0
    assert "300 users x top-20 (as of test)" in capsys.readouterr().out
    got = eval_recs(tmp_path / "recs", "test")
    want, _ = evaluate_checkpoint(cfg, run_dir / "final", "test")
    for k in (5, 10, 20):
        for m in ("hr", "ndcg"):
            assert got[f"test/{m}@{k}"] == pytest.approx(want[f"test/{m}@{k}"], abs=1e-6)
    assert got["test/rows"] == want["test/rows"] == 300
    frame = recs_of(tmp_path / "recs")
    assert list(frame.columns) == ["user_id", "rank", "item_id", "score"] and frame["user_id"].nunique() == 300
    ranks = frame.groupby("user_id")["rank"].apply(list)
    assert all(r == list(range(1, len(r) + 1)) and len(r) <= 20 for r in ranks) and (ranks.map(len) == 20).mean() > 0.9
    assert frame.groupby("user_id")["score"].apply(lambda s: s.is_monotonic_decreasing).all()


def test_seen_items_are_never_recommended_unless_asked(trained, tmp_path):
    cfg, run_dir, _ = trained
    items = pd.read_parquet(cfg.data.path / "items.parquet").set_index("item_idx")["source_id"].astype(str)
    users = pd.read_parquet(cfg.data.path / "users.parquet").set_index("user_idx")["source_id"].astype(str)
    test = pd.read_parquet(cfg.data.path / "test.parquet")
    seen = {users[u]: {items[i] for i in [*h, t]} for u, h, t in zip(test["user_idx"], test["history"], test["target"],
                                                                     strict=True)}
    assert main(["recommend", str(run_dir), "--k", "20", "--out", str(tmp_path / "all"), "--as-of", "all",
                 "--local"]) == 0
    frame = recs_of(tmp_path / "all")
    bad = [(u, i) for u, i in zip(frame["user_id"], frame["item_id"], strict=True) if i in seen[u]]
    assert not bad, (bad[:5], len(bad))
    assert main(["recommend", str(run_dir), "--k", "20", "--out", str(tmp_path / "with"), "--as-of", "all",
                 "--include-seen", "--local"]) == 0
    frame = recs_of(tmp_path / "with")
    assert any(item in seen[user] for user, item in zip(frame["user_id"], frame["item_id"], strict=True))


def test_a_user_list_a_rerun_and_bad_input(trained, tmp_path, capsys, caplog):
    cfg, run_dir, _ = trained
    out = tmp_path / "recs"
    listed = tmp_path / "users.txt"
    listed.write_text("user_id\n3\n7\nnobody\n")
    assert main(["recommend", str(run_dir), "--k", "5", "--out", str(out), "--users", str(listed), "--local"]) == 0
    assert "1 listed users are not in the data" in capsys.readouterr().out and "nobody" in caplog.text
    assert sorted(set(recs_of(out)["user_id"])) == ["3", "7"] and len(recs_of(out)) == 10
    assert main(["recommend", str(run_dir), "--k", "3", "--out", str(out), "--local"]) == 0  # replaced, not appended
    assert set(recs_of(out)["rank"]) == {1, 2, 3} and recs_of(out)["user_id"].nunique() == 300
    for argv, pattern in [
        (["--k", "120"], r"--k 120: must be between 1 and 119 \(the dataset has 120 items\)"),
        (["--users", str(tmp_path / "none.txt")], r"--users .*none.txt: no such file"),
    ]:
        assert main(["recommend", str(run_dir), "--out", str(out), "--local", *argv]) == 2
        assert re.search(pattern, capsys.readouterr().err)
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"x")
    assert main(["recommend", str(run_dir), "--out", str(mine), "--local"]) == 2
    assert "holds no recs.parquet" in capsys.readouterr().err and (mine / "cat.jpg").exists()
    assert main(["eval-recs", str(out), "--split", "valid"]) == 2
    assert "as of 'test', so they do not predict the valid split" in capsys.readouterr().err


def test_ray_data_actors_write_the_same_file_as_local(trained, tmp_path, ray_session):
    _, run_dir, _ = trained
    assert main(["recommend", str(run_dir), "--k", "10", "--out", str(tmp_path / "local"), "--local"]) == 0
    assert main(["recommend", str(run_dir), "--k", "10", "--out", str(tmp_path / "ray"), "--actors", "1",
                 "--batch-size", "64"]) == 0
    pd.testing.assert_frame_equal(recs_of(tmp_path / "local"), recs_of(tmp_path / "ray"))
    assert (tmp_path / "ray" / "rayrec.log").is_file()


def test_the_joint_model_recommends_with_its_fused_score_and_exports_at_the_end(tiny_mm_dataset, tmp_path,
                                                                                  tiny_joint_overrides, capsys):
    job = Path(__file__).resolve().parents[1] / "jobs" / "ur4rec_quickstart.yaml"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", str(job), "--local", f"data.path={tiny_mm_dataset}", "data.prepare_if_missing=false",
                 f"run.storage_path={tmp_path}/runs", "run.name=joint", f"tracking.uri={uri}",
                 "export.name=joint", "export.alias=live", *tiny_joint_overrides(tmp_path)]) == 0
    assert "registered joint version 1 as @live" in capsys.readouterr().out  # export.name: at the end of the run
    run = tmp_path / "runs" / "joint"
    recs_equal_eval(run, tmp_path / "recs")
    # the registered model carries the joint model's features: the same rows in a fresh process
    listed = tmp_path / "users.txt"
    listed.write_text("4\n9\n")
    away, _ = predict_elsewhere("models:/joint@live", uri, listed, [], tmp_path)
    assert main(["recommend", str(run), "--k", "10", "--as-of", "all", "--users", str(listed), "--out",
                 str(tmp_path / "all"), "--local"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(away / "by_user.parquet"), recs_of(tmp_path / "all"))


def first_test_users(data: Path, n: int, path: Path) -> Path:
    """The raw ids of the first ``n`` rows of the test split (the rows ``eval.max_rows`` decodes)."""
    users = pd.read_parquet(data / "users.parquet").set_index("user_idx")["source_id"].astype(str)
    path.write_text("\n".join(users[pd.read_parquet(data / "test.parquet")["user_idx"].head(n)]) + "\n")
    return path


def test_generative_recs_are_real_unseen_items_and_the_beams_eval_genrec_scores(sft, tmp_path, ray_session):
    from rayrec.genrec.evaluate import evaluate_adapter
    from rayrec.recs.evaluate import eval_recs
    from rayrec.recs.generative import adapter_job

    common, adapter, _ = sft
    data = Path(common["data"]["path"])
    listed = first_test_users(data, 24, tmp_path / "users.txt")
    assert main(["recommend", adapter, "--k", "10", "--include-seen", "--users", str(listed), "--out",
                 str(tmp_path / "beams"), "--local"]) == 0
    cfg, _ = adapter_job(Path(adapter), None)  # the job it was trained with, kept in its genrec.json
    want = evaluate_adapter(cfg, adapter, split="test", local=True, out=tmp_path / "eval.json")
    got = eval_recs(tmp_path / "beams", "test", ks=(1, 5, 10))
    for k in (1, 5, 10):
        for m in ("hr", "ndcg"):
            assert got[f"test/{m}@{k}"] == pytest.approx(want.metrics[f"test/{m}@{k}"], abs=1e-6)
    items = pd.read_parquet(data / "items.parquet").set_index("item_idx")["source_id"].astype(str)
    users = pd.read_parquet(data / "users.parquet").set_index("user_idx")["source_id"].astype(str)
    frame = recs_of(tmp_path / "beams")
    by_user = frame.groupby("user_id", sort=False)["item_id"].apply(list)
    assert all(by_user[users[r["user_idx"]]] == [items[i] for i in r["predicted_items"]] for r in want.rows)

    # seen items excluded after decoding; every row a real item; Ray Data actors write the same file
    for where, extra in (("local", ["--local"]), ("ray", ["--actors", "1", "--batch-size", "8"])):
        assert main(["recommend", str(Path(adapter).parents[1]), "--k", "8", "--as-of", "all", "--users",
                     str(listed), "--out", str(tmp_path / where), *extra]) == 0
    pd.testing.assert_frame_equal(recs_of(tmp_path / "local"), recs_of(tmp_path / "ray"))
    frame = recs_of(tmp_path / "local")
    test = pd.read_parquet(data / "test.parquet").set_index("user_idx")
    seen = {users[u]: {items[i] for i in [*test.at[u, "history"], test.at[u, "target"]]} for u in test.index}
    assert len(frame) == 24 * 8 and set(frame["item_id"]) <= set(items)
    assert not [(u, i) for u, i in zip(frame["user_id"], frame["item_id"], strict=True) if i in seen[u]]


def test_fresh_histories_score_like_the_same_history_of_a_known_user(trained, tmp_path, capsys):
    cfg, run_dir, _ = trained
    items = pd.read_parquet(cfg.data.path / "items.parquet").set_index("item_idx")["source_id"].astype(str)
    users = pd.read_parquet(cfg.data.path / "users.parquet").set_index("user_idx")["source_id"].astype(str)
    test = pd.read_parquet(cfg.data.path / "test.parquet").set_index("user_idx")
    u = int(test.index[5])
    events = [*test.at[u, "history"], test.at[u, "target"]]
    rows = [("fresh", items[i], t) for t, i in enumerate(events)][::-1]  # out of order: sorted by timestamp
    rows += [("fresh", "no-such-item", 99), ("cold", "also-unknown", 1)]
    fresh = tmp_path / "histories.csv"
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(fresh, index=False)
    listed = tmp_path / "users.txt"
    listed.write_text(users[u] + "\n")
    assert main(["recommend", str(run_dir), "--k", "10", "--as-of", "all", "--users", str(listed), "--out",
                 str(tmp_path / "known"), "--local"]) == 0
    assert main(["recommend", str(run_dir), "--k", "10", "--histories", str(fresh), "--out", str(tmp_path / "fresh"),
                 "--local"]) == 0
    said = capsys.readouterr().out
    assert "2 events name unknown items (skipped)" in said and "1 users with no known item got the popular" in said
    got, known = recs_of(tmp_path / "fresh"), recs_of(tmp_path / "known")
    mine = got[got["user_id"] == "fresh"].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine.drop(columns="user_id"), known.drop(columns="user_id"))
    train = pd.read_parquet(cfg.data.path / "train.parquet")["seq"]
    counts = pd.Series([i for s in train for i in s]).value_counts()
    top = sorted(counts.index, key=lambda i: (-counts[i], i))[:10]
    cold = got[got["user_id"] == "cold"]
    assert cold["item_id"].tolist() == [items[i] for i in top] and cold["score"].tolist() == [counts[i] for i in top]
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item\n1,2\n")
    assert main(["recommend", str(run_dir), "--histories", str(bad), "--out", str(tmp_path / "x"), "--local"]) == 2
    assert re.search(r"--histories .*bad.csv: no column user_id, item_id", capsys.readouterr().err)


PREDICT = """
import sys, mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
users = [line for line in open(sys.argv[2]).read().split()]
model.predict(pd.DataFrame({"user_id": users}), params={"k": 10}).to_parquet("by_user.parquet")
model.predict(pd.DataFrame({"history": [["nope"], *[[str(i) for i in h] for h in eval(sys.argv[3])]]}),
              params={"k": 5, "include_seen": True}).to_parquet("by_history.parquet")
import ray
assert not ray.is_initialized()
"""


def export_and_predict(run, listed: Path, histories: list, tmp: Path, *extra: str) -> tuple[Path, dict]:
    """``rayrec export`` of ``run``, then ``predict_elsewhere``."""
    uri = f"sqlite:///{tmp}/registry.db"
    assert main(["export", str(run), *extra, "--name", "recs-model", "--alias", "champion", "--tracking-uri", uri]) == 0
    return predict_elsewhere("models:/recs-model@champion", uri, listed, histories, tmp)


def predict_elsewhere(model: str, uri: str, listed: Path, histories: list, tmp: Path) -> tuple[Path, dict]:
    """Predictions of a registered ``model`` in a fresh process in another folder (no Ray):
    by_user.parquet (the listed users, k=10) and by_history.parquet (the histories, k=5, seen included)."""
    import subprocess
    import sys

    away = tmp / "elsewhere"
    away.mkdir()
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run([sys.executable, "-c", PREDICT, model, str(listed), repr(histories)],
                          cwd=away, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return away, {"uri": uri}


def test_an_exported_model_loads_in_a_fresh_process_and_gives_recommends_rows(trained, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg, run_dir, _ = trained
    listed = tmp_path / "users.txt"
    listed.write_text("3\n7\n12\n")
    histories = [["5", "9", "14"], ["22"]]
    away, info = export_and_predict(run_dir, listed, histories, tmp_path)
    assert main(["recommend", str(run_dir), "--k", "10", "--as-of", "all", "--users", str(listed), "--out",
                 str(tmp_path / "recs"), "--local"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(away / "by_user.parquet"), recs_of(tmp_path / "recs"))
    fresh = tmp_path / "fresh.csv"
    pd.DataFrame([(f"row {n + 1}", i, t) for n, h in enumerate(histories) for t, i in enumerate(h)],
                 columns=["user_id", "item_id", "timestamp"]).to_csv(fresh, index=False)
    assert main(["recommend", str(run_dir), "--k", "5", "--include-seen", "--histories", str(fresh), "--out",
                 str(tmp_path / "fresh"), "--local"]) == 0
    served = pd.read_parquet(away / "by_history.parquet")
    pd.testing.assert_frame_equal(served[served["user_id"] != "row 0"].reset_index(drop=True), recs_of(tmp_path / "fresh"))
    assert len(served[served["user_id"] == "row 0"]) == 5  # no known item: the popular items
    client = MlflowClient(info["uri"])
    version = client.get_model_version_by_alias("recs-model", "champion")
    model_info = __import__("mlflow").models.get_model_info("models:/recs-model@champion")
    assert model_info.signature.params.to_dict()[0]["name"] == "k"
    assert {c["name"] for c in model_info.signature.outputs.to_dict()} == {"user_id", "rank", "item_id", "score"}
    assert str(version.version) == "1" and "rayrec.export.name" in client.get_run(version.run_id).data.tags


@pytest.mark.slow
def test_the_registered_model_is_served_over_http_and_a_generative_one_exported(trained, sft, tmp_path):
    """`mlflow models serve` of the alias on 127.0.0.1 answers /invocations with recommend's rows; an SFT
    adapter exports too (base model by path) and its registered model gives recommend's beams."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import requests
    from local_ray import free_ports

    _, run_dir, _ = trained
    listed = tmp_path / "users.txt"
    listed.write_text("3\n7\n")
    away, info = export_and_predict(run_dir, listed, [["5"]], tmp_path)
    port = free_ports(1)[0]
    log = open(tmp_path / "serve.log", "ab")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/recs-model@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=away,
                              env={**os.environ, "MLFLOW_TRACKING_URI": info["uri"]}, stdout=log, stderr=log,
                              start_new_session=True)
    try:
        for _ in range(600):
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "serve.log").read_text()[-3000:])
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60, json={
            "dataframe_split": {"columns": ["user_id"], "data": [["3"], ["7"]]}, "params": {"k": 10}})
        assert answer.ok, answer.text
        got = pd.DataFrame(answer.json()["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    want = pd.read_parquet(away / "by_user.parquet")
    pd.testing.assert_frame_equal(got[want.columns].astype(want.dtypes.to_dict()), want)

    common, adapter, _ = sft
    gen = tmp_path / "gen"
    gen.mkdir()
    listed = first_test_users(Path(common["data"]["path"]), 6, gen / "users.txt")
    away, _ = export_and_predict(adapter, listed, [], gen)
    assert main(["recommend", adapter, "--k", "10", "--as-of", "all", "--users", str(listed), "--out",
                 str(gen / "recs"), "--local"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(away / "by_user.parquet"), recs_of(gen / "recs"))
    assert not (Path(__import__("mlflow").artifacts.download_artifacts(
        "models:/recs-model@champion", tracking_uri=f"sqlite:///{gen}/registry.db")) / "artifacts" / "bundle" / "model"
                / "model.safetensors").exists()  # the base model stays where it is, named by path


def test_a_checkpoint_of_other_data_is_refused_before_any_actor(tiny_dataset, tmp_path, capsys):
    import shutil

    from conftest import _synth

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    assert main(["train", str(Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml"), "--local",
                 f"data.path={data}", "data.prepare_if_missing=false", f"run.storage_path={tmp_path}/runs",
                 "run.name=r", "tracking.enabled=false", "train.epochs=1", "model.hidden=16", "model.max_len=20",
                 "train.eval.ks=[5,10]"]) == 0
    shutil.rmtree(data)
    _synth(data, items=100, users=200)  # the same folder, prepared again from other data
    capsys.readouterr()
    assert main(["recommend", str(tmp_path / "runs" / "r"), "--k", "5", "--out", str(tmp_path / "recs")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"checkpoint .*final was trained on the dataset \w+ \(300 users, 120 items.*now holds", err), err
    assert not (tmp_path / "recs").exists()


def test_the_top_k_is_the_head_of_a_stable_sort_ties_to_the_lower_index():
    import torch

    from rayrec.recs.scoring import ranked_top

    gen = torch.Generator().manual_seed(0)
    for trial in range(400):
        n = int(torch.randint(2, 60, (1,), generator=gen))
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        scores = (torch.randint(0, 4, (5, n), generator=gen).float() if trial % 2
                  else torch.randn(5, n, generator=gen))  # many ties, or none
        scores[torch.rand(5, n, generator=gen) < 0.2] = -torch.inf  # masked (seen) items tie at -inf
        items, top = ranked_top(scores, k)
        want = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
        assert torch.equal(items, want) and torch.equal(top, scores.gather(1, want))


def test_the_multi_interest_model_recommends_what_it_evaluates(tiny_dataset, tmp_path):
    job = Path(__file__).resolve().parents[1] / "jobs" / "multi_interest_quickstart.yaml"
    assert main(["train", str(job), "--local", f"data.path={tiny_dataset}", "data.prepare_if_missing=false",
                 f"run.storage_path={tmp_path}/runs", "run.name=mi", "tracking.enabled=false", "model.hidden=16",
                 "model.num_blocks=1", "model.max_len=20", "model.vae.latent=8", "model.complex.dim=8",
                 "train.epochs=3", "train.phases.components.until_epoch=1", "train.phases.joint.until_epoch=2",
                 "train.optim.warmup_steps=0", "scaling.num_workers=1"]) == 0
    recs_equal_eval(tmp_path / "runs" / "mi", tmp_path / "recs")


def test_a_popularity_run_recommends_the_most_popular_unseen_items(tiny_dataset, tmp_path):
    assert main(["train", str(Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml"), "--local",
                 f"data.path={tiny_dataset}", "data.prepare_if_missing=false", f"run.storage_path={tmp_path}/runs",
                 "run.name=pop", "tracking.enabled=false", "model={name: popularity}", "train.eval.ks=[5,10]"]) == 0
    assert main(["recommend", str(tmp_path / "runs" / "pop"), "--k", "5", "--out", str(tmp_path / "recs"),
                 "--local"]) == 0
    items = pd.read_parquet(tiny_dataset / "items.parquet").set_index("item_idx")["source_id"].astype(str)
    users = pd.read_parquet(tiny_dataset / "users.parquet").set_index("user_idx")["source_id"].astype(str)
    counts = pd.Series([i for s in pd.read_parquet(tiny_dataset / "train.parquet")["seq"] for i in s]).value_counts()
    ranking = sorted(counts.index, key=lambda i: (-counts[i], i))
    got = recs_of(tmp_path / "recs").groupby("user_id", sort=False)["item_id"].apply(list)
    for u, h in pd.read_parquet(tiny_dataset / "test.parquet")[["user_idx", "history"]].head(50).itertuples(index=False):
        assert got[users[u]] == [items[i] for i in ranking if i not in set(h)][:5]
