"""GRPO: rewards and rollouts alone, bad input before any worker, the trainer on a tiny SFT adapter.

One SFT adapter (the session fixture ``sft`` of conftest) is trained once and every GRPO test continues it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from rayrec.config.genrec import GenRecJobConfig, GRPOJobConfig
from rayrec.data.dataset import open_prepared
from rayrec.errors import ConfigError
from rayrec.genrec import rewards as R
from rayrec.genrec.rollouts import Group, inject_target, pick_dynamic

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- rewards alone


def test_rule_and_ranking_rewards_on_handmade_groups():
    # two groups of 3 in rank order; targets 7 and 9; one invalid output in the second group
    items, targets = [5, 7, 6, 1, None, 2], [7, 7, 7, 9, 9, 9]
    assert R.rule(items, targets) == [0, 1, 0, 0, 0, 0]
    pen = R.rank_penalties(3)
    assert sum(pen) == pytest.approx(-1) and pen[0] < pen[1] < pen[2] < 0
    assert pen[0] == pytest.approx(-1 / (1 + 1 / math.log2(3) + 0.5))
    got = R.ranking(items, targets, group_size=3)
    # group 1 holds the target: wrong items get the penalty of their rank; group 2 does not: 0, and the
    # invalid output the largest penalty
    assert got == pytest.approx([pen[0], 1.0, pen[2], 0.0, pen[0], 0.0])
    with pytest.raises(ValueError, match="groups of 4"):
        R.ranking(items, targets, group_size=4)


def test_semantic_and_collaborative_rewards():
    emb = np.zeros((4, 2), dtype=np.float32)
    emb[1], emb[2], emb[3] = [1, 0], [0, 1], [math.sqrt(0.5), math.sqrt(0.5)]
    ctx = R.RewardContext(embeddings=emb, scorer=lambda hist, items: [0.1 * i + 0.01 * len(h)
                                                                      for h, i in zip(hist, items)])
    assert R.semantic([1, 2, 3, None], [1, 1, 1, 1], ctx=ctx) == pytest.approx([1, 0, math.sqrt(0.5), -1])
    got = R.collaborative([2, None, 3], [[1], [1, 2], [1, 2, 3]], ctx=ctx)
    assert got == pytest.approx([0.21, 0.0, 0.33])  # the invalid output is never scored
    with pytest.raises(ValueError, match="collaborative_checkpoint"):
        R.collaborative([1], [[1]], ctx=R.RewardContext())


def test_group_advantages_are_standardised_within_groups():
    r = [1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]
    adv = R.group_advantages(r, 4)
    sd = np.std([1, 0, 0, 0], ddof=1)
    assert adv[:4] == pytest.approx([0.75 / (sd + 1e-4), -0.25 / (sd + 1e-4), -0.25 / (sd + 1e-4), -0.25 / (sd + 1e-4)])
    assert adv[4:] == pytest.approx([0, 0, 0, 0])  # equal rewards: no signal
    assert R.group_advantages(r, 4, scale=False)[:2] == pytest.approx([0.75, -0.25])


def test_add_gt_injects_the_target():
    g = inject_target(Group([[1], [2], [3]], [1, 2, 3], [[0.0], [0.0], [0.0]]), 8, [8, 0])
    assert g.items == [1, 2, 8] and g.completion_ids[-1] == [8, 0] and g.injected == [False, False, True]
    g = inject_target(Group([[1], [8]], [1, 8], [[0.0], [0.0]]), 8, [8, 0])
    assert g.items == [1, 8] and not any(g.injected)


# ----------------------------------------------------------------------------- config and bad input


def test_config_errors_explain_the_rule(tmp_path):
    from rayrec.config.loader import load_model

    with pytest.raises(ValueError, match="not a multiple of grpo.num_generations=8.*whole groups"):
        GRPOJobConfig.model_validate({"train": {"batch_size": 12}})
    GRPOJobConfig.model_validate({"train": {"batch_size": 4, "grad_accum": 2}, "grpo": {"num_generations": 8}})
    with pytest.raises(ValueError, match="sid_to_title.*title"):
        GRPOJobConfig.model_validate({"prompts": {"tasks": {"sid_seq": 1.0, "sid_to_title": 0.5}}})
    with pytest.raises(ValueError, match="rollout=sample"):
        GRPOJobConfig.model_validate({"grpo": {"dynamic_sampling": True}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"grpo": {"rewards": {"rankng": 1.0}}}))
    with pytest.raises(ConfigError, match=r"grpo\.rewards\.rankng.*ranking"):
        load_model(GRPOJobConfig, path)


def grpo_job(sft, name: str, **sections) -> GRPOJobConfig:
    common, adapter, tmp = sft
    job = {**common, "prompts": {"tasks": {"sid_seq": 1.0}, "max_history": 3, "max_examples": 48},
           "train": {"max_steps": 2, "batch_size": 16, "lr": 2e-3, "logging_steps": 1, "val_rows": 8, "save_steps": 2},
           "grpo": {"adapter": adapter, "num_generations": 4, "beta": 0.05, "add_gt": True},
           "run": {"name": name, "storage_path": str(tmp / "runs")}}
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value}
    return GRPOJobConfig.model_validate(job)


def test_bad_adapters_lora_and_rewards_fail_before_any_worker(sft, tmp_path):
    from rayrec.config.loader import dump_job
    from rayrec.config.schema import JobConfig
    from rayrec.recipes import recipe_named
    from rayrec.runs import Run
    from rayrec.train.checkpoint import save_state

    prepare = recipe_named("grpo").prepare
    run = Run(tmp_path / "run", local=True)

    def fails(match: str, **sections):
        with pytest.raises(ConfigError, match=match):
            prepare(grpo_job(sft, "bad", **sections), run)

    fails("grpo.adapter is not set", grpo={"adapter": None})
    fails("no such folder", grpo={"adapter": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    fails("not a rayrec SFT checkpoint.*genrec.json", grpo={"adapter": str(tmp_path / "empty")})
    fails("model.base='/elsewhere/qwen' but the SFT adapter .* was trained on", model={"base": "/elsewhere/qwen"})
    fails(r"train.lora.r=8 but the SFT adapter .* has r=4", train={"lora": {"r": 8, "alpha": 8}})
    fails(r"train.lora.target_modules=\['q_proj'\] but", train={"lora": {"r": 4, "alpha": 8,
                                                                         "target_modules": ["q_proj"]}})
    fails("needs grpo.collaborative_checkpoint", grpo={"rewards": {"ranking": 1.0, "collaborative": 0.5}})
    fails("num_generations=200 with rollout beam needs that many distinct items",
          grpo={"num_generations": 200}, train={"batch_size": 200})
    # a SASRec checkpoint trained on other data (another item count)
    from rayrec.models.sasrec import build_sasrec

    other = JobConfig.model_validate({"model": {"name": "sasrec", "hidden": 8, "num_blocks": 1, "max_len": 5}})
    save_state({"config": dump_job(other), "model": build_sasrec(50, other.model).state_dict()}, tmp_path / "cf")
    fails("trained on 50 items but this job's data has 120", grpo={
        "rewards": {"collaborative": 1.0, "ranking": 0.0}, "collaborative_checkpoint": str(tmp_path / "cf")})
    # the same count, other items: the same prepared data with two items' ids swapped
    import shutil

    import pandas as pd

    data = tmp_path / "other_data"
    shutil.copytree(sft[0]["data"]["path"], data)
    items = pd.read_parquet(data / "items.parquet")
    items.loc[[0, 1], "source_id"] = items.loc[[1, 0], "source_id"].to_numpy()
    items.to_parquet(data / "items.parquet")
    collaborative_checkpoint(sft, tmp_path / "cf_other", data_path=data)
    fails(r"its items mean other items than this job's \(2 of 120 differ; item_idx 1 is",
          grpo={"rewards": {"collaborative": 1.0, "ranking": 0.0},
                "collaborative_checkpoint": str(tmp_path / "cf_other")})
    collaborative_checkpoint(sft, tmp_path / "cf_gone", data_path=tmp_path / "gone")
    fails("its prepared data .*gone.* cannot be read", grpo={
        "rewards": {"collaborative": 1.0, "ranking": 0.0}, "collaborative_checkpoint": str(tmp_path / "cf_gone")})


def collaborative_checkpoint(sft, folder, items: int = 120, data_path=None):
    """An (untrained) SASRec checkpoint whose job names the given prepared data (default: the module's)."""
    from rayrec.config.loader import dump_job
    from rayrec.config.schema import JobConfig
    from rayrec.models.sasrec import build_sasrec
    from rayrec.train.checkpoint import save_state

    sas = JobConfig.model_validate({"data": {"path": str(data_path or sft[0]["data"]["path"])},
                                    "model": {"name": "sasrec", "hidden": 8, "num_blocks": 1, "max_len": 5}})
    torch.manual_seed(0)
    save_state({"config": dump_job(sas), "model": build_sasrec(items, sas.model).state_dict()}, folder)
    return sas


# ----------------------------------------------------------------------------- the trainer


def local_trainer(cfg: GRPOJobConfig, tmp_path, rollout_log: list | None = None):
    """The recipe's trainer in this process (as `rayrec grpo --local` builds it)."""
    from rayrec.recipes import grpo as G
    from rayrec.runs import Run
    from rayrec.tracking.mlflow_tracking import Tracker

    run = Run(tmp_path / "run", local=True, tracker=Tracker.null())
    inputs = G.prepare(cfg, run)
    trainer = G.make_trainer(cfg, inputs.loop_config(run), run.tracker, inputs.data.train.to_dict("records"),
                             inputs.data.valid.to_dict("records"), tmp_path / "ckpt", use_gpu=False, show=False,
                             extra_callbacks=[])
    if rollout_log is not None:
        inner = trainer.rollout_func

        def logged(prompts, t):
            out = inner(prompts, t)
            rollout_log.append(out)
            return out

        trainer.rollout_func = logged
    return trainer


def first_batch(trainer) -> list[dict]:
    return next(iter(trainer.get_train_dataloader()))


def test_reference_is_the_sft_policy_kl_zero_before_the_first_update(sft, tmp_path):
    cfg = grpo_job(sft, "kl0")
    trainer = local_trainer(cfg, tmp_path)
    model = trainer.model
    params = dict(model.named_parameters())
    ref_rows = [n for n in params if n.endswith("trainable_tokens_delta.ref")]
    assert ref_rows, "the reference adapter has SID rows"
    for name in ref_rows:  # TRL's copy skipped these (named '...delta.default', no trailing dot)
        assert torch.equal(params[name], params[name.replace(".ref", ".default")])
        assert not params[name].requires_grad
    assert not any(p.requires_grad for n, p in params.items() if ".ref" in n)
    batch = trainer._generate_and_score_completions(first_batch(trainer))
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    width = batch["completion_ids"].shape[1]
    with torch.no_grad():
        policy, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, width)
    ref = batch["ref_per_token_logps"]
    m = batch["completion_mask"].bool()
    assert torch.equal(policy[m], ref[m])  # exactly the same model: KL 0
    kl = torch.exp(ref - policy) - (ref - policy) - 1
    assert float(kl[m].abs().max()) == 0.0


def test_group_advantages_of_a_real_batch(sft, tmp_path):
    """TRL's advantages for our rollouts: the ranking reward standardised within each group (exact std; TRL's
    own step then divides unit spreads by 1 + 1e-4, the same for every group)."""
    cfg = grpo_job(sft, "adv")
    log: list = []
    trainer = local_trainer(cfg, tmp_path, log)
    rows = first_batch(trainer)
    batch = trainer._generate_and_score_completions(rows)
    out = log[-1]
    items = [None if i < 0 else i for i in out["item"]]
    targets = [int(r["target"]) for r in rows]
    assert all(targets[s] in items[s : s + 4] for s in range(0, len(items), 4))  # add_gt: every group has it
    want = R.standardise_groups(np.array(R.ranking(items, targets, 4, ranks=out["rank"]))[:, None], 4)[:, 0] / (1 + 1e-4)
    assert batch["advantages"].numpy() == pytest.approx(want, abs=1e-5)
    assert np.abs(want).max() > 0
    assert all(rows[s]["prompt"] == rows[s + k]["prompt"] for s in range(0, len(rows), 4) for k in range(4))


def test_grpo_trains_the_adapter_keeps_the_base_and_evaluates_valid_items(sft):
    from rayrec import recipes
    from rayrec.genrec.evaluate import evaluate_adapter
    from rayrec.genrec.lm import load_for_eval

    _, adapter, _ = sft
    cfg = grpo_job(sft, "train")
    out = recipes.run(cfg, local=True)
    assert out.checkpoint.endswith("checkpoint-2") and "val/ndcg@10" in out.metrics
    assert {"train/reward", "train/kl", "train/frac_reward_zero_std", "train/rewards/ranking/mean",
            "train/rollout/distinct_items"} <= set(out.metrics)
    before, _, _ = load_for_eval(adapter)
    after, _, meta = load_for_eval(out.checkpoint)
    assert meta["stage"] == "grpo" and meta["sft_adapter"] == adapter
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    base = [n for n in b if "lora_" not in n and "trainable_tokens" not in n]
    assert base and all(torch.equal(b[n], a[n]) for n in base)  # every base weight bit-identical
    assert any(not torch.equal(b[n], a[n]) for n in b if "lora_" in n)  # and the adapter moved
    res = evaluate_adapter(cfg, out.checkpoint, local=True)
    assert res.metrics["test/invalid"] == 0 and res.metrics["test/rows"] == 24
    assert all(None not in r["predicted_items"] and len(r["predictions"]) == 10 for r in res.rows)
    # rayrec recommend decodes the same beams from the GRPO adapter (its job is kept in genrec.json)
    from rayrec.recs.recommend import Request, read_recs, recommend

    ds = open_prepared(cfg.data.path)
    users = ds.table("users").set_index("user_idx")["source_id"].astype(str)
    listed = Path(out.checkpoint).parent / "users.txt"
    listed.write_text("\n".join(users[[r["user_idx"] for r in res.rows]]))
    recommend(Request(Path(out.checkpoint), 10, include_seen=True, users=listed), listed.parent / "recs", local=True)
    recs, meta = read_recs(listed.parent / "recs")
    items = ds.table("items").set_index("item_idx")["source_id"].astype(str)
    assert meta["model"] == "genrec (grpo)" and len(recs) == 240
    assert recs.groupby("user_id", sort=False)["item_id"].apply(list).tolist() == [
        [items[i] for i in r["predicted_items"]] for r in res.rows]
    run = MlflowClient(cfg.tracking.uri).get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["rayrec.recipe"] == "grpo"
    assert run.data.tags["rayrec.sft_adapter"] == adapter
    assert {"train/reward", "train/kl", "val/ndcg_at_10"} <= set(run.data.metrics)


def test_resume_continues_the_step_count_and_the_mlflow_run(sft, monkeypatch):
    from transformers import TrainerCallback

    from rayrec import recipes
    from rayrec.genrec import grpo as G

    cfg = grpo_job(sft, "resume", train={"max_steps": 4, "save_steps": 2})

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("killed at step 3")

    build = G.build_trainer
    monkeypatch.setattr(G, "build_trainer", lambda *a, callbacks, **k: build(*a, callbacks=callbacks + [Crash()], **k))
    with pytest.raises(RuntimeError, match="killed at step 3"):
        recipes.run(cfg, local=True)
    monkeypatch.setattr(G, "build_trainer", build)
    run_dir = cfg.run.storage_path / "resume"
    first = MlflowClient(cfg.tracking.uri).search_runs(
        [MlflowClient(cfg.tracking.uri).get_experiment_by_name("tests").experiment_id],
        filter_string="attributes.run_name = 'resume'")[0]
    assert first.info.status == "FAILED"
    out = recipes.run(cfg, local=True, resume_from=str(run_dir / "checkpoints" / "checkpoint-2"))
    assert out.mlflow_run_id == first.info.run_id and out.run_dir == run_dir
    state = json.loads((run_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    steps = [m.step for m in MlflowClient(cfg.tracking.uri).get_metric_history(out.mlflow_run_id, "train/reward")]
    assert {1, 2, 3, 4} <= set(steps)
    # the checkpoint resumed from carries its own validation scores, so it can still be picked as the best
    resumed = json.loads((run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert any(e.get("step") == 2 and "val/ndcg@10" in e for e in resumed["log_history"])


def test_the_best_checkpoint_survives_rotation(sft, tmp_path):
    """save_total_limit keeps the last checkpoints *and* the best one by validation, which the local path
    then picks (HF's rotation reads the state's best checkpoint, which the validation ranking sets)."""
    from types import SimpleNamespace

    from transformers import TrainerState
    from transformers.trainer_utils import rotate_checkpoints

    from rayrec.genrec.evaluate import val_ranking_callback
    from rayrec.genrec.lm import SID_FILE, load_tokenizer
    from rayrec.genrec.semantic_ids import read_index
    from rayrec.recipes.sft import best_local

    _, adapter, _ = sft
    cfg = grpo_job(sft, "rot")
    tok = load_tokenizer(adapter)
    item_sids = read_index(f"{adapter}/{SID_FILE}").for_items(open_prepared(cfg.data.path).table("items"))
    cb = val_ranking_callback([], item_sids, tok, cfg, tracker=None, on="save")
    args, state = SimpleNamespace(output_dir=str(tmp_path)), TrainerState()
    for step, score in [(1, 0.30), (2, 0.20), (3, 0.25), (4, 0.10)]:
        state.global_step = step
        (tmp_path / f"checkpoint-{step}").mkdir()
        rotate_checkpoints(str(tmp_path), save_total_limit=2, best_model_checkpoint=state.best_model_checkpoint)
        state.log_history.append({"step": step, "val/ndcg@10": score})
        cb.keep_best(args, state, {"val/ndcg@10": score})
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-4"]
    assert best_local(state.log_history, tmp_path, "val/ndcg@10", "max").endswith("checkpoint-1")


@pytest.mark.slow
def test_grpo_with_deepspeed_zero2_on_two_ray_train_workers(ray_session, sft):
    """Two GRPO steps on two Ray Train workers through DeepSpeed ZeRO-2 (CPU, gloo): each worker
    generates whole groups and the reported checkpoint holds the ZeRO optimizer shards of both ranks,
    the adapter and what evaluation needs."""
    from pathlib import Path

    from rayrec import recipes

    cfg = grpo_job(sft, "zero2", train={"deepspeed": "zero2"}, scaling={"num_workers": 2})
    out = recipes.run(cfg)
    ckpt = Path(out.checkpoint)
    assert ckpt.name == "checkpoint" and "val/ndcg@10" in out.metrics and "train/kl" in out.metrics
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    for rank in (0, 1):
        assert list((ckpt / "global_step2").glob(f"*zero_pp_rank_{rank}_*optim_states.pt")), sorted(
            p.name for p in ckpt.rglob("*"))
    assert {"adapter_model.safetensors", "genrec.json", "sids.index.json", "tokenizer.json"} <= {
        p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "genrec.json").read_text())["stage"] == "grpo"


def test_beam_groups_ignore_the_checkpoints_sampling_settings(sft):
    """Beam rollouts are a pure function of the weights: a checkpoint shipping do_sample/top-k/temperature
    (as Instruct models do) changes nothing; a second call shares no state with the first."""
    from rayrec.genrec.constrained import build_trie
    from rayrec.genrec.lm import SID_FILE, load_for_eval
    from rayrec.genrec.rollouts import generate_groups
    from rayrec.genrec.semantic_ids import read_index

    _, adapter, _ = sft
    model, tok, _ = load_for_eval(adapter)
    from pathlib import Path

    item_sids = read_index(Path(adapter) / SID_FILE).for_items(
        open_prepared(sft[0]["data"]["path"]).table("items"))
    trie = build_trie(tok, item_sids)
    prompts = ["The user interacted with: " + "".join(item_sids[i]) for i in (3, 17)]
    first = generate_groups(model, tok, prompts, trie, size=6)
    model.generation_config.update(do_sample=True, temperature=7.0, top_k=2, num_beams=1)
    second = generate_groups(model, tok, prompts, trie, size=6)
    assert [g.items for g in first] == [g.items for g in second]
    assert all(len(set(g.items)) == 6 and None not in g.items for g in first)  # G distinct valid items


def test_semantic_and_collaborative_rewards_and_unconstrained_rollouts_in_a_real_batch(sft, tmp_path):
    from rayrec.genrec.grpo import load_collaborative

    sas = collaborative_checkpoint(sft, tmp_path / "cf")
    model, max_len = load_collaborative(tmp_path / "cf", open_prepared(sft[0]["data"]["path"]).table("items"))
    scorer = R.sasrec_scorer(model, max_len)
    probs = scorer([[1, 2, 3], [4]], [5, 6])
    with torch.no_grad():
        want = torch.softmax(model.score(torch.tensor([[0, 0, 1, 2, 3], [0, 0, 0, 0, 4]])), -1)
    assert probs == pytest.approx([float(want[0, 5]), float(want[1, 6])])

    cfg = grpo_job(sft, "mixed", grpo={"rollout": "sample", "constrained": False, "add_gt": False, "rewards": {
        "ranking": 1.0, "semantic": 0.5, "collaborative": 0.5}, "collaborative_checkpoint": str(tmp_path / "cf")})
    assert sas.model.max_len == max_len
    log: list = []
    trainer = local_trainer(cfg, tmp_path, log)
    rows = first_batch(trainer)
    batch = trainer._generate_and_score_completions(rows)
    out = log[-1]
    assert torch.isfinite(batch["advantages"]).all()
    invalid = [k for k, i in enumerate(out["item"]) if i < 0]
    assert invalid  # the one-epoch SFT policy of this module emits no real item without the trie
    # they are counted...
    assert trainer._metrics["train"]["rollout/invalid"][-1] == pytest.approx(len(invalid) / len(out["item"]))
    # ...and get each reward's minimum
    funcs = {f.__name__: f for f in trainer.reward_funcs}
    kw = {"item": out["item"], "target": [r["target"] for r in rows], "history": [r["history"] for r in rows],
          "cf_history": [r["cf_history"] for r in rows]}
    got = {name: f(None, None, None, **kw) for name, f in funcs.items()}
    for k in invalid:
        assert (got["ranking"][k], got["semantic"][k], got["collaborative"][k]) == (R.rank_penalties(4)[0], -1.0, 0.0)
    assert {"ranking", "semantic", "collaborative"} == set(funcs)


def test_beta_zero_builds_no_reference_adapter(sft, tmp_path):
    trainer = local_trainer(grpo_job(sft, "nokl", grpo={"beta": 0.0}), tmp_path)
    names = [n for n, _ in trainer.model.named_parameters()]
    assert not any(".ref" in n for n in names) and trainer.ref_model is None
    batch = trainer._generate_and_score_completions(first_batch(trainer))
    assert batch.get("ref_per_token_logps") is None


# ----------------------------------------------------------------------------- what is learned (issue #25)


def test_copies_of_one_sampled_item_share_its_rank_and_its_penalty():
    items, targets = [5, 5, 7, 6], [7, 7, 7, 7]
    ranks = R.distinct_ranks(items)
    assert ranks == [0, 0, 1, 2]
    pen = R.rank_penalties(4)
    assert R.ranking(items, targets, group_size=4, ranks=ranks) == pytest.approx([pen[0], pen[0], 1.0, pen[2]])


def test_dynamic_sampling_fills_the_group_round_robin_over_distinct_items():
    # the reproduction: 24 samples, item 3 drawn 10 times, 14 other items once, no hit, G = 16
    drawn = [3] * 10 + list(range(10, 24))
    rng = np.random.default_rng(0)
    drawn = [drawn[i] for i in rng.permutation(len(drawn))]
    keep = [drawn[i] for i in pick_dynamic(drawn, target=99, size=16)]
    assert len(keep) == 16 and len(set(keep)) == 15 and keep.count(3) == 2
    # invalid outputs (unconstrained sampling) come last, however often drawn
    assert [[None, None, None, 5, 6][i] for i in pick_dynamic([None, None, None, 5, 6], 9, 3)] == [5, 6, None]
    # hits come first, once per round like every other item
    drawn = [4, 9, 5, 4, 9, 4, 6, 9]
    assert [drawn[i] for i in pick_dynamic(drawn, 9, 5)] == [9, 4, 5, 6, 9]


def test_each_reward_is_standardised_within_its_group():
    rng = np.random.default_rng(0)
    G = 8
    ranking = np.zeros((6, G))
    ranking[:3, 0] = 1.0  # half the groups hold the target; the others give the ranking reward no signal
    ranking[:3, 1:] = -rng.random((3, G - 1)) * 0.3
    collaborative = 1e-3 * rng.random((6, G))  # a softmax probability: tiny spread
    values = np.stack([ranking.ravel(), collaborative.ravel()], 1)
    z = R.standardise_groups(values, G)
    assert np.allclose(z[G * 3:, 0], 0) and np.allclose(z[:, 1].reshape(6, G).std(1, ddof=1), 1)


def test_a_reward_of_tiny_spread_is_not_shrunk_by_an_epsilon():
    r = np.array([[1e-4, 3e-4, 2e-4, 2e-4], [5.0, 5.0, 5.0, 5.0]]).reshape(-1, 1)
    z = R.standardise_groups(r, 4)[:, 0]
    assert np.std(z[:4], ddof=1) == pytest.approx(1.0) and np.allclose(z[4:], 0)
    # TRL's (r - mean) / (std + 1e-4) gives this group 0.45 of its spread
    assert np.std(R.group_advantages(r[:, 0], 4)[:4], ddof=1) == pytest.approx(0.45, abs=0.01)


def test_the_trainer_mixes_rewards_by_their_weights_and_logs_the_raw_rewards(sft, tmp_path):
    collaborative_checkpoint(sft, tmp_path / "cf")
    coefs = []
    for w in (0.5, 1.0):
        cfg = grpo_job(sft, f"mix{w}", grpo={"add_gt": True, "num_generations": 4, "rewards": {
            "ranking": 1.0, "collaborative": w}, "collaborative_checkpoint": str(tmp_path / "cf")})
        log: list = []
        trainer = local_trainer(cfg, tmp_path / f"w{w}", log)
        rows = first_batch(trainer)
        batch = trainer._generate_and_score_completions(rows)
        funcs = {f.__name__: f for f in trainer.reward_funcs}
        kw = {"item": log[-1]["item"], "rank": log[-1]["rank"], "target": [r["target"] for r in rows],
              "history": [r["history"] for r in rows], "cf_history": [r["cf_history"] for r in rows]}
        raw = np.array([funcs["ranking"](None, None, None, **kw), funcs["collaborative"](None, None, None, **kw)],
                       dtype=float).T
        z = np.nan_to_num(R.standardise_groups(raw, 4))
        coef, *_ = np.linalg.lstsq(z, batch["advantages"].numpy(), rcond=None)
        assert np.allclose(z @ coef, batch["advantages"].numpy(), atol=1e-4)
        coefs.append(coef)
        # the logged rewards are the raw ones, not their z-scores
        metrics = trainer._metrics["train"]
        assert metrics["rewards/collaborative/mean"][-1] == pytest.approx(np.nanmean(raw[:, 1]), rel=1e-4)
        assert metrics["rewards/ranking/mean"][-1] == pytest.approx(np.nanmean(raw[:, 0]), abs=1e-6)
    assert coefs[0][1] / coefs[0][0] == pytest.approx(0.5, rel=1e-3)
    assert coefs[1][1] / coefs[1][0] == pytest.approx(1.0, rel=1e-3)


def test_the_collaborative_reward_reads_the_users_train_history_up_to_the_sasrec_window(sft, tmp_path, monkeypatch):
    from rayrec.recipes import grpo as G
    from rayrec.runs import Run

    sas = collaborative_checkpoint(sft, tmp_path / "cf")  # max_len 5, longer than the prompts' 3
    cfg = grpo_job(sft, "cfh", prompts={"tasks": {"sid_seq": 1.0, "title_to_sid": 1.0}, "max_history": 3,
                                        "max_examples": 96},
                   grpo={"rewards": {"ranking": 1.0, "collaborative": 0.5},
                         "collaborative_checkpoint": str(tmp_path / "cf")})
    inputs = G.prepare(cfg, Run(tmp_path / "run", local=True))
    rows = inputs.data.train
    train = inputs.data.ds.table("train")
    seqs = {int(u): [int(i) for i in s] for u, s in zip(train["user_idx"], train["seq"])}
    longer = 0
    for row in rows.itertuples():
        if row.task == "title_to_sid":
            assert list(row.cf_history) == []
            continue
        seq = seqs[row.user_idx]
        assert seq[row.pos] == row.target
        want = seq[max(0, row.pos - sas.model.max_len):row.pos]
        assert list(row.cf_history) == want and list(row.history) == want[-len(row.history):]
        longer += len(want) > len(row.history)
    assert longer > 0  # the reward reads more than the prompt shows
    # a Ray worker runs in another folder: it loads the checkpoint the driver checked, by its absolute path
    loop = inputs.loop_config(Run(tmp_path / "run", local=True))
    assert Path(loop["collaborative"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    assert G.reward_context(cfg, loop).scorer([[1, 2]], [3])[0] > 0
    # rows without a user history are not scored (None), instead of getting SASRec's popularity prior
    ctx = R.RewardContext(scorer=lambda hist, items: [0.5] * len(items))
    assert R.collaborative([3, 4], [[], [1, 2]], ctx=ctx) == [None, 0.5]


def test_rollouts_generate_at_most_eval_batch_size_prompts_at_once(sft, tmp_path, monkeypatch):
    from rayrec.genrec import rollouts

    sizes = []
    real = rollouts.generate_groups

    def counted(model, tokenizer, prompts, *a, **kw):
        sizes.append(len(prompts))
        return real(model, tokenizer, prompts, *a, **kw)

    monkeypatch.setattr(rollouts, "generate_groups", counted)
    cfg = grpo_job(sft, "chunks", train={"batch_size": 8, "grad_accum": 2}, eval={"batch_size": 3})
    trainer = local_trainer(cfg, tmp_path)
    trainer._generate_and_score_completions(first_batch(trainer))
    assert sizes == [3, 1]  # 16 completions = 4 prompts of G 4, generated 3 + 1


def test_one_pass_per_generation_and_no_inert_settings(sft, tmp_path):
    from rayrec.genrec.grpo import grpo_args

    with pytest.raises(ValueError, match="importance_sampling_level=sequence.*changes nothing"):
        grpo_job(sft, "gspo", grpo={"importance_sampling_level": "sequence"})
    with pytest.raises(ValueError, match="scale_rewards=batch with several rewards"):
        grpo_job(sft, "sb", grpo={"scale_rewards": "batch", "rewards": {"ranking": 1.0, "semantic": 1.0}})
    args = grpo_args(grpo_job(sft, "args", train={"batch_size": 8, "grad_accum": 2}), tmp_path, use_gpu=False,
                     deepspeed=None, completion_len=4)
    # TRL uses the current log-probs as the old ones exactly when one generation feeds one optimizer step
    assert args.num_iterations == 1 and args.steps_per_generation == args.gradient_accumulation_steps == 2
    assert args.multi_objective_aggregation == "sum_then_normalize"  # one reward: plain GRPO


def test_samples_are_ranked_by_the_policys_own_log_probability(sft):
    from rayrec.genrec.constrained import build_trie
    from rayrec.genrec.lm import SID_FILE, load_for_eval
    from rayrec.genrec.rollouts import generate_groups
    from rayrec.genrec.semantic_ids import read_index

    common, adapter, _ = sft
    model, tok, _ = load_for_eval(adapter)
    ds = open_prepared(common["data"]["path"])
    trie = build_trie(tok, read_index(Path(adapter) / SID_FILE).for_items(ds.table("items")))
    prompts = ["The user interacted with: " + " ".join(f"<a_{i}>" for i in range(k)) for k in (1, 2, 3)]
    torch.manual_seed(0)
    for prompt in prompts:  # one prompt per call: no padding, so the forward below sees the same positions
        group = generate_groups(model, tok, [prompt], trie, size=8, mode="sample", temperature=3.0)[0]
        p_ids = tok(prompt)["input_ids"]
        totals = []
        for c in group.completion_ids:
            ids = torch.tensor([p_ids + c])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p_ids) - 1:-1].float(), -1)
            totals.append(float(logp[torch.arange(len(c)), torch.tensor(c)].sum()))
        assert all(a >= b - 1e-3 for a, b in zip(totals, totals[1:])), totals


def test_trl_internals_the_recipe_overrides_keep_their_names_and_signatures():
    """A TRL upgrade that renames or re-signs what SidGRPOTrainer overrides or calls fails here, not mid-run."""
    import inspect

    from trl import GRPOConfig, GRPOTrainer
    from trl.models.utils import unwrap_model_for_generation

    def params(f):
        return list(inspect.signature(f).parameters)

    assert params(GRPOTrainer._generate_and_score_completions) == ["self", "inputs"]
    assert params(GRPOTrainer._calculate_rewards) == ["self", "inputs", "prompts", "completions",
                                                      "completion_ids_list"]
    assert params(GRPOTrainer._get_per_token_logps_and_entropies)[:5] == [
        "self", "model", "input_ids", "attention_mask", "logits_to_keep"]
    assert {"batch_size", "compute_entropy"} <= set(params(GRPOTrainer._get_per_token_logps_and_entropies))
    assert params(GRPOTrainer._log_metric)[:3] == ["self", "name", "value"]
    assert {"rollout_func", "reward_funcs", "processing_class"} <= set(params(GRPOTrainer.__init__))
    assert {"gather_deepspeed3_params", "gradient_checkpointing_kwargs"} <= set(params(unwrap_model_for_generation))
    fields = GRPOConfig.__dataclass_fields__
    assert {"multi_objective_aggregation", "num_iterations", "steps_per_generation", "scale_rewards",
            "importance_sampling_level", "reward_weights"} <= set(fields)
    assert fields["multi_objective_aggregation"].default == "sum_then_normalize"


def test_the_reported_validation_score_is_the_chosen_checkpoints(tmp_path):
    from rayrec.recipes import sft as S
    from rayrec.workers.hf import best_local, chosen_metrics

    # locally: checkpoint-2 scored best; the last log entry is checkpoint-4's
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    history = [{"step": 2, "val/ndcg@10": 0.5, "val/hr@10": 0.6}, {"step": 3, "train/loss": 1.0},
               {"step": 4, "val/ndcg@10": 0.3, "val/hr@10": 0.7}]
    best = best_local(history, tmp_path, "val/ndcg@10", "max")
    assert Path(best).name == "checkpoint-2"
    assert chosen_metrics(history, best) == {"val/ndcg@10": 0.5, "val/hr@10": 0.6}
    # on Ray: the Result's best checkpoint, with its own report
    first, last = SimpleNamespace(path=str(tmp_path / "c1")), SimpleNamespace(path=str(tmp_path / "c2"))
    reports = [(first, {"val/ndcg@10": 0.5, "val/hr@10": 0.6}), (last, {"val/ndcg@10": 0.3, "val/hr@10": 0.7})]
    result = SimpleNamespace(checkpoint=last, best_checkpoints=reports, metrics={**reports[1][1], "train/loss": 1.0},
                             get_best_checkpoint=lambda metric, mode: max(reports, key=lambda r: r[1][metric])[0])
    cfg = GenRecJobConfig.model_validate({"train": {"val_rows": 8}})
    out = S.outcome(cfg, result, SimpleNamespace(dir=tmp_path, tracker=SimpleNamespace(run_id="r")))
    assert out.checkpoint == str(tmp_path / "c1" / "checkpoint")
    assert out.metrics["val/ndcg@10"] == 0.5 and out.metrics["val/hr@10"] == 0.6 and out.metrics["train/loss"] == 1.0


def test_sum_then_normalize_keeps_trls_raw_weighted_sum(sft, tmp_path):
    collaborative_checkpoint(sft, tmp_path / "cf")
    cfg = grpo_job(sft, "sum", grpo={"reward_mixing": "sum_then_normalize", "rewards": {
        "ranking": 1.0, "collaborative": 0.5}, "collaborative_checkpoint": str(tmp_path / "cf")})
    log: list = []
    trainer = local_trainer(cfg, tmp_path, log)
    rows = first_batch(trainer)
    batch = trainer._generate_and_score_completions(rows)
    funcs = {f.__name__: f for f in trainer.reward_funcs}
    kw = {"item": log[-1]["item"], "rank": log[-1]["rank"], "target": [r["target"] for r in rows],
          "history": [r["history"] for r in rows], "cf_history": [r["cf_history"] for r in rows]}
    total = np.array(funcs["ranking"](None, None, None, **kw)) + 0.5 * np.array(
        funcs["collaborative"](None, None, None, **kw))
    assert batch["advantages"].numpy() == pytest.approx(R.group_advantages(total, 4), abs=1e-4)
