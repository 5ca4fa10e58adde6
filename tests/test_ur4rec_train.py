"""Staged joint training in the framework-free loop: stages, flags, schedules, zeroed grads, resume."""

import logging
import math
import shutil

import numpy as np
import pytest
import torch

from rayrec.cli import main
from rayrec.config import dump_job
from rayrec.config.schema import JobConfig
from rayrec.data.dataset import open_prepared
from rayrec.errors import DataError
from rayrec.tracking.mlflow_tracking import Tracker
from rayrec.train.checkpoint import load_state
from rayrec.train.inputs import data_info
from rayrec.train.joint import StageRunner, build_joint, fit_joint, no_sync, plan_stages, prepare_features
from rayrec.train.local import PlainBatches, run_local

STAGES = [
    {"name": "pretrain_sasrec", "epochs": 1},
    {"name": "pretrain_retriever", "epochs": 1},
    {"name": "joint_finetune", "epochs": 2, "strategies": [
        {"name": "adaptive_alternating", "window": 1, "threshold": 0.02, "min_steps": 2, "max_steps": 3},
        {"name": "distillation", "weight": 0.2}, {"name": "memory_bank", "queue_size": 512, "dim": 16}]},
    {"name": "end_to_end", "epochs": 1, "strategies": [{"name": "uncertainty"}]},
]


def joint_job(data, tmp_path, stages=STAGES, **features) -> JobConfig:
    return JobConfig.model_validate({
        "data": {"path": str(data), "prepare_if_missing": False},
        "model": {"name": "ur4rec", "sasrec": {"hidden": 16, "num_blocks": 1, "dropout": 0.1, "max_len": 20},
                  "retriever": {"hidden": 16, "num_negatives": 7, "train_positions": 4},
                  "fusion": {"top_n": 40, "calibrate": [0.3, 0.9]},
                  "features": {"text_model": "hash:32", "cache_dir": str(tmp_path / "cache"), **features},
                  "stages": stages},
        "train": {"batch_size": 32, "optim": {"lr": 0.005, "warmup_steps": 0}, "shuffle_buffer": 0,
                  "early_stopping": {"patience": 5}, "eval": {"ks": [10], "batch_size": 128}},
        "tracking": {"enabled": False},
        "run": {"name": "j", "storage_path": str(tmp_path / "runs"), "seed": 0},
    })


@pytest.fixture(scope="module")
def mm_data(tiny_mm_dataset, tmp_path_factory):
    """The tiny multimodal dataset with hash-text features computed once."""
    cfg = joint_job(tiny_mm_dataset, tmp_path_factory.mktemp("feat"))
    prepare_features(cfg, tiny_mm_dataset, use_ray=False)
    return tiny_mm_dataset


def local(cfg, run_dir=None, resume_from=None):
    cfg = cfg.model_copy(deep=True)
    cfg.run.checkpoint.num_to_keep = None  # the tests read every epoch's checkpoint
    ds = open_prepared(cfg.data.path)
    return run_local(cfg, ds, data_info(ds, cfg), run_dir=run_dir, tracker=Tracker.null(), resume_from=resume_from,
                     loop=fit_joint)


def test_four_stages_train_what_they_say(mm_data, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="rayrec.train.joint")
    final, rep = local(joint_job(mm_data, tmp_path), run_dir=tmp_path / "run")
    epochs = rep.metrics[:-1]
    assert [m["stage"] for m in epochs] == [1, 2, 3, 3, 4]
    flags = [(m["stage/trainable_sasrec"], m["stage/trainable_retriever"]) for m in epochs]
    assert flags == [(1, 0), (0, 1), (1, 1), (1, 1), (1, 1)]
    assert epochs[0]["train/steps_retriever"] == 0 and epochs[1]["train/steps_sasrec"] == 0
    assert "stage 2/pretrain_retriever begins at epoch 2" in caplog.text  # boundaries are logged
    for m in epochs[2:4]:  # adaptive alternation: both modules train and hand over within every joint epoch
        assert m["strategy/switches_from_sasrec_epoch"] >= 1 and m["strategy/switches_from_retriever_epoch"] >= 1
        assert 0 < m["strategy/epoch_share_sasrec"] < 1 and "train/loss_distillation" in m and "train/loss_memory_bank" in m
    assert epochs[4]["train/loss_fused"] > 0 and "strategy/log_var_fused" in epochs[4]
    for m in epochs[2:]:  # fused epochs: SASRec's share re-chosen on validation, its metric reported
        key = "fusion/ndcg_at_10_w{:.2f}".format(m["fusion/weight"])
        assert m["fusion/weight"] in (0.3, 0.9) and m[key] == m["val/ndcg@10"]
        assert m["val/ndcg@10"] == max(m["fusion/ndcg_at_10_w0.30"], m["fusion/ndcg_at_10_w0.90"])
    best = epochs[int(final["best_epoch"]) - 1]
    assert float(load_state(tmp_path / "run" / "final")["best_model"]["fusion_weight"]) == pytest.approx(best["fusion/weight"])
    assert epochs[3]["train/loss_sasrec"] < epochs[0]["train/loss_sasrec"]  # both modules' losses fall
    assert epochs[3]["train/loss_retriever"] < epochs[1]["train/loss_retriever"]
    assert final["test/hr@10"] > 3 * 10 / 120 and final["best_epoch"] in (3, 4, 5)  # best of the fused stages
    assert final["health/skipped_steps_total"] == 0  # the summary both loops report (train.evaluation.final_test)
    state = load_state(tmp_path / "run" / "epoch_0003")
    assert state["stage"] == 2 and state["stage_state"]["strategy"]
    job = tmp_path / "job.yaml"  # `rayrec eval` rebuilds the model with its features and gets the same numbers
    job.write_text(dump_job(joint_job(mm_data, tmp_path)))
    assert main(["eval", str(job), "--checkpoint", str(tmp_path / "run" / "final")]) == 0
    assert f"{final['test/ndcg@10']:.4f}" in capsys.readouterr().out


def first_stage(cfg: JobConfig):
    """(model, the StageRunner of its first stage on one CPU worker, epoch 1's training batches)."""
    ds = open_prepared(cfg.data.path)
    info = data_info(ds, cfg)
    torch.manual_seed(0)
    model = build_joint(cfg, info.num_items, info.path)
    runner = StageRunner(plan_stages(cfg.model.stages)[0], model, cfg, torch.device("cpu"), 10, no_sync,
                         lambda t: t, 1)
    return model, runner, iter(PlainBatches(cfg, ds, info).train(1))


def test_schedules_advance_with_their_module_and_every_grad_is_zeroed(mm_data, tmp_path):
    stages = [{"name": "joint_finetune", "epochs": 1, "strategies": [{"name": "fixed_alternating", "every": 2}]}]
    cfg = joint_job(mm_data, tmp_path, stages=stages)
    model, runner, batches = first_stage(cfg)
    trained = []
    for _ in range(5):
        before = {n: p.detach().clone() for n, p in model.retriever.named_parameters()}
        _, _, active = runner.step([next(batches)])
        trained.append(sorted(active)[0])
        assert all(p.grad is None for p in model.parameters()), "a gradient survived the step"
        if active == {"sasrec"}:  # the idle retriever did not move
            assert all(torch.equal(p, before[n]) for n, p in model.retriever.named_parameters())
    assert trained == ["sasrec", "sasrec", "retriever", "retriever", "sasrec"]
    assert runner.scheds["sasrec"].last_epoch == 3 and runner.scheds["retriever"].last_epoch == 2


def test_resume_inside_the_joint_stage_continues_exactly(mm_data, tmp_path):
    stages = [{"name": "pretrain_sasrec", "epochs": 1},
              {"name": "joint_finetune", "epochs": 2, "strategies": [
                  {"name": "adaptive_alternating", "window": 1, "min_steps": 2, "max_steps": 3}]}]
    cfg = joint_job(mm_data, tmp_path, stages=stages)
    full, rep_full = local(cfg, run_dir=tmp_path / "full")
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full" / "epoch_0002", cut / "epoch_0002")
    resumed, rep = local(cfg, run_dir=cut, resume_from=cut / "epoch_0002")
    assert rep.metrics[0]["epoch"] == 3
    for key in ("train/loss_sasrec", "train/loss_retriever", "strategy/switches", "val/ndcg@10"):
        assert rep.metrics[0][key] == pytest.approx(rep_full.metrics[2][key], rel=1e-5), key
    assert resumed["test/ndcg@10"] == pytest.approx(full["test/ndcg@10"], rel=1e-5)


def test_sampled_evaluation_scores_candidates(mm_data, tmp_path):
    cfg = joint_job(mm_data, tmp_path, stages=[{"name": "pretrain_sasrec", "epochs": 1},
                                               {"name": "end_to_end", "epochs": 1}])
    cfg.train.eval.mode = "sampled:20"
    final, _ = local(cfg)
    assert 0 < final["test/hr@10"] <= 1 and final["test/mean_rank"] <= 21


def test_features_of_another_dataset_are_refused(mm_data, tiny_dataset, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_dataset, other)
    shutil.copytree(mm_data / "features", other / "features")
    items = np.load(other / "features" / "item_text.npy")
    np.save(other / "features" / "item_text.npy", items[:-1])  # one item short
    np.save(other / "features" / "item_text_ok.npy", np.ones(len(items) - 1, dtype=bool))
    cfg = joint_job(other, tmp_path)
    with pytest.raises(DataError, match=r"item_text.npy has 120 rows but items.parquet has 120 items \(\+1 padding row = 121\)"):
        build_joint(cfg, 120, other)
    np.save(other / "features" / "item_text.npy", np.zeros((121, 7), dtype=np.float32))
    np.save(other / "features" / "item_text_ok.npy", np.ones(121, dtype=bool))
    with pytest.raises(DataError, match="item_text.npy has dimension 7 but .*user_text.npy has 32"):
        build_joint(cfg, 120, other)


# ----------------------------------------------------------------------------- defects of the joint loop


def test_grad_accum_accumulates_and_the_schedule_follows_optimizer_steps(mm_data, tmp_path):
    """Defect 1: grad_accum=2 took a step every batch (10 steps on a schedule sized for 5)."""
    cfg = joint_job(mm_data, tmp_path, stages=[{"name": "pretrain_sasrec", "epochs": 1}])
    cfg.train.grad_accum = 2
    cfg.train.optim.schedule = "cosine"
    _, rep = local(cfg)
    micro = len(PlainBatches(cfg, open_prepared(mm_data), data_info(open_prepared(mm_data), cfg)).train(1))
    assert micro >= 6 and rep.metrics[0]["train/steps"] == -(-micro // 2)
    assert rep.metrics[0]["train/lr_sasrec"] == pytest.approx(0.0, abs=1e-12)  # the cosine ended on its last step


def test_end_to_end_with_alternation_is_refused_with_the_reason(mm_data, tmp_path):
    """Defect 2: the fused loss was silently dropped on every step of end_to_end + alternation."""
    with pytest.raises(ValueError, match="end_to_end.*fused loss needs both modules every step"):
        joint_job(mm_data, tmp_path, stages=[{"name": "end_to_end", "epochs": 1, "strategies": [
            {"name": "fixed_alternating", "every": 2}, {"name": "dwa"}]}])


def test_a_nan_loss_is_skipped_not_spread_and_the_run_matches_a_clean_one(mm_data, tmp_path, monkeypatch):
    """Defect 4: one NaN loss made every SASRec weight NaN for the rest of the run."""
    from rayrec.models.joint import UR4Rec

    stages = [{"name": "pretrain_sasrec", "epochs": 2},
              {"name": "joint_finetune", "epochs": 2, "strategies": [{"name": "fixed_alternating", "every": 3}]}]
    cfg = joint_job(mm_data, tmp_path, stages=stages)
    cfg.train.batch_size = 8
    clean, _ = local(cfg)
    orig, calls = UR4Rec.outputs, {"n": 0}

    def outputs(self, batch, losses, needs=frozenset()):
        out = orig(self, batch, losses, needs)
        calls["n"] += 1
        if calls["n"] % 50 == 0:
            out.losses = {k: v * float("nan") for k, v in out.losses.items()}
        return out

    monkeypatch.setattr(UR4Rec, "outputs", outputs)
    final, rep = local(cfg, run_dir=tmp_path / "nan")
    skipped = sum(m["health/skipped_steps"] for m in rep.metrics[:-1])
    assert skipped == calls["n"] // 50 >= 2
    state = load_state(tmp_path / "nan" / "final")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(math.isfinite(m["train/loss"]) for m in rep.metrics[:-1])
    assert final["test/ndcg@10"] == pytest.approx(clean["test/ndcg@10"], rel=0.01)


def test_module_schedules_are_sized_for_their_own_steps_under_alternation(mm_data, tmp_path):
    """Defect 5: each module's cosine was sized for the whole stage, so it ended at half the LR."""
    stages = [{"name": "joint_finetune", "epochs": 2, "strategies": [{"name": "fixed_alternating", "every": 2}]}]
    cfg = joint_job(mm_data, tmp_path, stages=stages)
    cfg.train.optim.schedule = "cosine"
    _, rep = local(cfg)
    last = rep.metrics[1]
    for m in ("sasrec", "retriever"):
        assert last[f"train/lr_{m}"] < 0.05 * cfg.train.optim.lr, m


def test_warmup_continues_across_stages_unless_a_stage_has_its_own(mm_data, tmp_path):
    """Defect 5: warmup restarted every stage, so short stages never reached their LR."""
    stages = [{"name": "joint_finetune", "epochs": 1, "strategies": [{"name": "fixed_alternating", "every": 2}]},
              {"name": "end_to_end", "epochs": 1, "warmup_steps": 3}]
    cfg = joint_job(mm_data, tmp_path, stages=stages)
    cfg.train.optim.warmup_steps = 15
    ds = open_prepared(mm_data)
    info = data_info(ds, cfg)
    model = build_joint(cfg, info.num_items, info.path)
    plans = plan_stages(cfg.model.stages)
    runner = StageRunner(plans[0], model, cfg, torch.device("cpu"), 10, no_sync, lambda t: t, 1,
                         module_steps={"sasrec": 10, "retriever": 0})
    assert runner.warmups == {"sasrec": (15, 10), "retriever": (15, 0)}  # the run's ramp, continued
    assert runner.optims["sasrec"].param_groups[0]["lr"] == pytest.approx(cfg.train.optim.lr * 11 / 15)
    assert runner.optims["retriever"].param_groups[0]["lr"] == pytest.approx(cfg.train.optim.lr / 15)
    assert runner.totals == {"sasrec": 6, "retriever": 4}  # 10 steps, every 2: s s r r s s r r s s
    own = StageRunner(plans[1], model, cfg, torch.device("cpu"), 10, no_sync, lambda t: t, 1,
                      module_steps={"sasrec": 40, "retriever": 40})
    assert own.warmups == {"sasrec": (3, 0), "retriever": (3, 0)}


def test_optim_groups_apply_inside_each_modules_optimizer(mm_data, tmp_path, capsys):
    cfg = joint_job(mm_data, tmp_path, stages=[{"name": "end_to_end", "epochs": 1, "lr": {"retriever": 0.001}}])
    cfg.train.optim.groups = [{"pattern": "sasrec.item_emb*", "lr_mult": 2.0}]
    ds = open_prepared(mm_data)
    info = data_info(ds, cfg)
    model = build_joint(cfg, info.num_items, info.path)
    runner = StageRunner(plan_stages(cfg.model.stages)[0], model, cfg, torch.device("cpu"), 10, no_sync,
                         lambda t: t, 1)
    lrs = {g["name"]: g["initial_lr"] for g in runner.optims["sasrec"].param_groups}
    assert lrs["sasrec.item_emb* (no decay)"] == pytest.approx(0.01) and lrs["default"] == pytest.approx(0.005)
    assert {g["initial_lr"] for g in runner.optims["retriever"].param_groups} == {0.001}
    cfg.train.optim.groups = [{"pattern": "item_emb*", "lr_mult": 2.0}]
    with pytest.raises(Exception, match="'item_emb\\*' matches no parameter of the ur4rec model"):
        StageRunner(plan_stages(cfg.model.stages)[0], model, cfg, torch.device("cpu"), 10, no_sync, lambda t: t, 1)


def test_a_short_last_accumulation_step_is_a_mean_over_its_own_batches(mm_data, tmp_path):
    ds = open_prepared(mm_data)
    info = data_info(ds, joint_job(mm_data, tmp_path, stages=[{"name": "pretrain_sasrec", "epochs": 1}]))
    grads = {}
    for accum in (1, 2):
        cfg = joint_job(mm_data, tmp_path, stages=[{"name": "pretrain_sasrec", "epochs": 1}])
        cfg.train.grad_accum = accum
        cfg.train.optim.grad_clip = None
        torch.manual_seed(0)
        model = build_joint(cfg, info.num_items, info.path)

        def sync(params, accum=accum):
            grads[accum] = [p.grad.clone() for p in params if p.grad is not None]

        runner = StageRunner(plan_stages(cfg.model.stages)[0], model, cfg, torch.device("cpu"), 10, sync,
                             lambda t: t, 1)
        torch.manual_seed(1)
        runner.step([next(iter(PlainBatches(cfg, ds, info).train(1)))])
    assert len(grads[1]) > 5 and all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads[1], grads[2], strict=True))


def test_both_loops_step_through_the_one_schedule(mm_data, tiny_job, tmp_path):
    """``phases.py``'s scheduler semantics hold in both loops: a SASRec phase and a joint stage that
    trains SASRec alone, over the same steps, step through the same LR factors -- from the run's
    start, and continuing the run's warmup after steps done before them."""
    from rayrec.train.phases import PhaseRunner
    from rayrec.train.specs import build

    def factors(opt, sched, n):
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"] / opt.param_groups[0]["initial_lr"])
            opt.step()  # no gradients: moves nothing
            sched.step()
        return out

    spe, epochs = 5, 2
    seq = tiny_job.model_copy(deep=True)
    seq.train.epochs, seq.train.optim.warmup_steps, seq.train.optim.schedule = epochs, 7, "cosine"
    joint = joint_job(mm_data, tmp_path, stages=[{"name": "pretrain_sasrec", "epochs": epochs}])
    joint.train.optim.warmup_steps, joint.train.optim.schedule = 7, "cosine"
    seq_model = build(seq, data_info(open_prepared(seq.data.path), seq))
    joint_model = build_joint(joint, data_info(open_prepared(mm_data), joint).num_items, mm_data)
    for done in (0, 4):  # a phase / stage that starts 4 steps into the run's 7-step warmup
        phases = PhaseRunner(seq_model, seq, spe)
        phases.enter(phases.plans[0], done)
        stage = StageRunner(plan_stages(joint.model.stages)[0], joint_model, joint, torch.device("cpu"), spe,
                            no_sync, lambda t: t, 1, module_steps={"sasrec": done, "retriever": 0})
        got_seq = factors(phases.opt, phases.sched, spe * epochs + 1)
        got_joint = factors(stage.optims["sasrec"], stage.scheds["sasrec"], spe * epochs + 1)
        assert got_seq == pytest.approx(got_joint), done
        assert got_seq[0] == pytest.approx((done + 1) / 7) and got_seq[-1] == pytest.approx(0.0)


def test_fp16_loss_scaling_in_the_joint_loop_skips_an_overflow_and_counts_it(mm_data, tmp_path):
    """The joint loop scales fp16 losses as the sequential loop does: an overflowing step lowers the
    scale, is counted as skipped, and moves no weight and no schedule; the next step trains."""
    cfg = joint_job(mm_data, tmp_path, stages=[{"name": "pretrain_sasrec", "epochs": 1}])
    model, runner, batches = first_stage(cfg)
    runner.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)  # what fp16 autocast on a GPU gets
    before = {n: p.detach().clone() for n, p in model.sasrec.named_parameters()}
    runner._micro(next(batches))
    next(p for p in model.sasrec.parameters() if p.grad is not None).grad.fill_(float("inf"))
    assert runner._finish() is None
    assert runner.scaler.get_scale() == 2.0 and runner.health.skipped_total == 1
    assert runner.scheds["sasrec"].last_epoch == 0
    assert all(torch.equal(p, before[n]) for n, p in model.sasrec.named_parameters())
    assert runner.step([next(batches)]) is not None and runner.scheds["sasrec"].last_epoch == 1
    assert any(not torch.equal(p, before[n]) for n, p in model.sasrec.named_parameters())


def test_a_stage_patience_ends_that_stage_alone_and_the_next_starts_on_schedule(mm_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rayrec.train.joint")
    stages = [{"name": "pretrain_sasrec", "epochs": 6, "lr": {"sasrec": 1e-6}, "patience": 1},  # no progress
              {"name": "pretrain_retriever", "epochs": 2}]
    cfg = joint_job(mm_data, tmp_path, stages=stages)
    assert cfg.train.early_stopping.patience == 5  # the run's patience would let stage 1 run all 6 epochs
    final, rep = local(cfg)
    epochs = rep.metrics[:-1]
    ran = [m["epoch"] for m in epochs if m["stage"] == 1]
    assert 2 <= len(ran) < 6 and "stage pretrain_sasrec stopped early" in caplog.text
    assert [m["epoch"] for m in epochs if m["stage"] == 2] == [7, 8]  # stage 2 keeps its epochs and patience


def test_the_final_test_keeps_the_pretrained_sasrec_when_the_fusion_validates_worse(mm_data, tmp_path, capsys):
    """An untrained retriever fused at weight 0 ranks worse than the SASRec it joins: the final test
    must not end below that SASRec on validation (model.select: fused_or_sasrec, the default)."""
    stages = [{"name": "pretrain_sasrec", "epochs": 3},
              {"name": "joint_finetune", "epochs": 1, "lr": {"sasrec": 1e-9, "retriever": 1e-9}}]

    def job(select):
        cfg = joint_job(mm_data, tmp_path / select, stages=stages)
        cfg.model.fusion.weight, cfg.model.fusion.calibrate, cfg.model.select = 0.0, [], select
        return cfg

    old, rep_old = local(job("fused"))
    new, rep = local(job("fused_or_sasrec"), run_dir=tmp_path / "run")
    sas_val = max(m["val/ndcg@10"] for m in rep.metrics[:3])
    assert rep.metrics[3]["val/ndcg@10"] < sas_val  # the fused epoch validates worse
    assert old["best_epoch"] == 4 and old["select/sasrec_alone"] == 0.0  # the switch keeps the old selection
    assert new["best_epoch"] in (1, 2, 3) and new["select/sasrec_alone"] == 1.0
    assert new["best/val/ndcg@10"] == sas_val and new["test/ndcg@10"] > old["test/ndcg@10"]
    best = load_state(tmp_path / "run" / "final")["best_model"]
    assert bool(best["sasrec_alone"])  # the choice travels with the weights: `rayrec eval` ranks the same way
    path = tmp_path / "job.yaml"
    path.write_text(dump_job(job("fused_or_sasrec")))
    assert main(["eval", str(path), "--checkpoint", str(tmp_path / "run" / "final")]) == 0
    assert f"{new['test/ndcg@10']:.4f}" in capsys.readouterr().out
