"""The progressive-training toolkit on SASRec: param groups, phases, gradient health, KL annealing."""

import logging
import math

import pytest
import torch
from torch import nn

from rayrec.cli import main
from rayrec.config import dump_job
from rayrec.config.progressive import KLAnnealConfig
from rayrec.config.schema import JobConfig
from rayrec.data.dataset import open_prepared
from rayrec.errors import ConfigError
from rayrec.models.sasrec import SASRec
from rayrec.tracking.mlflow_tracking import Tracker
from rayrec.train.checkpoint import load_state
from rayrec.train.health import SKIPPED, TrainingHealthError
from rayrec.train.inputs import data_info
from rayrec.train.local import run_local
from rayrec.train.phases import PhaseRunner, kl_factor, lr_factor
from rayrec.train.specs import build

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def job(base: JobConfig, **train) -> JobConfig:
    data = base.model_dump(mode="json")
    data["train"].update(train)
    return JobConfig.model_validate(data)


def local(cfg: JobConfig, run_dir=None, resume_from=None):
    cfg = cfg.model_copy(deep=True)
    cfg.run.checkpoint.num_to_keep = None  # the tests read every epoch's checkpoint
    ds = open_prepared(cfg.data.path)
    return run_local(cfg, ds, data_info(ds, cfg), run_dir=run_dir, tracker=Tracker.null(), resume_from=resume_from)


def model_of(cfg: JobConfig) -> SASRec:
    torch.manual_seed(0)
    return build(cfg, data_info(open_prepared(cfg.data.path), cfg))


def one_step(runner: PhaseRunner, model, batch) -> None:
    runner.total(model_losses(model, batch), epoch=1, step=0).backward()
    runner.opt.step()
    runner.opt.zero_grad(set_to_none=True)


def model_losses(model, batch):
    from rayrec.train.phases import model_losses as ml

    return ml(model, batch)


def a_batch(cfg: JobConfig):
    from rayrec.train.local import PlainBatches

    ds = open_prepared(cfg.data.path)
    return next(iter(PlainBatches(cfg, ds, data_info(ds, cfg)).train(1)))


# ----------------------------------------------------------------------------- param groups


def test_group_multipliers_reach_the_optimizer_and_norms_biases_embeddings_do_not_decay(tiny_job):
    cfg = job(tiny_job, optim={"lr": 0.001, "weight_decay": 0.1, "groups": [
        {"pattern": "item_emb*", "lr_mult": 2.0}, {"pattern": "blocks", "lr_mult": 0.5, "wd_mult": 0.5}]})
    model = model_of(cfg)
    runner = PhaseRunner(model, cfg, 10)
    runner.enter(runner.plans[0], 0)
    of = {id(p): g for g in runner.opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert of[id(named["item_emb.weight"])]["lr"] == pytest.approx(0.002)
    assert of[id(named["item_emb.weight"])]["weight_decay"] == 0.0  # an embedding
    qkv = next(n for n in named if n.startswith("blocks.0.") and n.endswith("weight") and named[n].ndim == 2)
    assert of[id(named[qkv])]["lr"] == pytest.approx(0.0005) and of[id(named[qkv])]["weight_decay"] == pytest.approx(0.05)
    bias = next(n for n in named if n.startswith("blocks.0.") and n.endswith("bias"))
    assert of[id(named[bias])]["lr"] == pytest.approx(0.0005) and of[id(named[bias])]["weight_decay"] == 0.0
    assert of[id(named["ln_final.weight"])]["weight_decay"] == 0.0 and of[id(named["ln_final.weight"])]["lr"] == 0.001
    assert sum(len(g["params"]) for g in runner.opt.param_groups) == len(named)

    everything = job(cfg, optim={**cfg.train.optim.model_dump(), "decay_all": True})
    runner = PhaseRunner(model, everything, 10)
    runner.enter(runner.plans[0], 0)
    of = {id(p): g for g in runner.opt.param_groups for p in g["params"]}
    assert of[id(named["item_emb.weight"])]["weight_decay"] == pytest.approx(0.1)

    typo = job(tiny_job, optim={"groups": [{"pattern": "item_embedding*", "lr_mult": 2.0}]})
    with pytest.raises(ConfigError, match="train.optim.groups: pattern 'item_embedding\\*' matches no parameter"):
        PhaseRunner(model, typo, 10)


def test_print_groups_shows_each_phase_and_trains_nothing(tiny_job, tmp_path, capsys):
    cfg = job(tiny_job, epochs=2, optim={"lr": 0.01, "weight_decay": 0.1, "groups": [
        {"pattern": "item_emb*", "lr_mult": 2.0}]},
        phases=[{"name": "warm", "until_epoch": 1, "freeze": ["blocks"]},
                {"name": "all", "lr_mult": 0.5}])
    path = tmp_path / "job.yaml"
    path.write_text(dump_job(cfg))
    assert main(["train", str(path), "--print-groups"]) == 0
    out = capsys.readouterr().out
    assert "phase 1/2 warm (epochs 1-1)" in out and "phase 2/2 all (epochs 2-2)" in out
    warm, rest = out.split("phase 2/2")
    assert "item_emb* (no decay)" in warm and "0.02" in warm and "blocks" not in warm.split("frozen")[0]
    assert "0.01" in rest  # item_emb: 0.01 x 2 x phase 0.5
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- phases


def test_phase_boundary_keeps_adam_state_of_params_that_keep_training(tiny_job):
    cfg = job(tiny_job, epochs=2, phases=[{"name": "a", "until_epoch": 1, "freeze": ["blocks"]},
                                          {"name": "b", "freeze": ["item_emb"]}])
    model = model_of(cfg)
    runner = PhaseRunner(model, cfg, 10)
    batch = a_batch(cfg)
    runner.enter(runner.plans[0], 0)
    named = dict(model.named_parameters())
    assert not any(p.requires_grad for n, p in named.items() if n.startswith("blocks"))
    one_step(runner, model, batch)
    pos_state = {k: v.clone() for k, v in runner.opt.state[named["pos_emb.weight"]].items()}
    emb_before = named["item_emb.weight"].detach().clone()

    runner.enter(runner.plans[1], 10)
    in_opt = {id(p) for g in runner.opt.param_groups for p in g["params"]}
    assert id(named["item_emb.weight"]) not in in_opt and not named["item_emb.weight"].requires_grad
    kept = runner.opt.state[named["pos_emb.weight"]]
    assert all(torch.equal(kept[k], pos_state[k]) for k in pos_state)  # moments carried over
    block = next(p for n, p in named.items() if n.startswith("blocks"))
    assert id(block) in in_opt and block not in runner.opt.state  # newly trainable: fresh state
    one_step(runner, model, batch)
    assert torch.equal(named["item_emb.weight"], emb_before)  # frozen: no step, no decay
    assert runner.opt.state[named["pos_emb.weight"]]["step"] == pos_state["step"] + 1


def test_phases_in_a_run_freeze_weigh_and_log(tiny_job, tmp_path):
    cfg = job(tiny_job, epochs=3, phases=[{"name": "warm", "until_epoch": 1, "freeze": ["blocks"]},
                                          {"name": "all", "lr_mult": 0.5, "warmup_steps": 0}])
    init = model_of(cfg).state_dict()
    final, rep = local(cfg, run_dir=tmp_path / "run")
    assert [m["phase"] for m in rep.metrics[:-1]] == [1.0, 2.0, 2.0]
    e1, e2 = load_state(tmp_path / "run" / "epoch_0001")["model"], load_state(tmp_path / "run" / "epoch_0002")["model"]
    blocks = [k for k in init if k.startswith("blocks")]
    assert all(torch.equal(e1[k], init[k]) for k in blocks)  # frozen in phase 1
    assert not all(torch.equal(e2[k], e1[k]) for k in blocks)  # trained in phase 2
    assert not torch.equal(e1["item_emb.weight"], init["item_emb.weight"])
    assert math.isfinite(final["test/ndcg@10"])


def test_resume_in_the_middle_of_a_phase_continues_exactly(tiny_job, tmp_path):
    cfg = job(tiny_job, epochs=3, phases=[{"name": "a", "until_epoch": 1, "freeze": ["item_emb"]},
                                          {"name": "b", "lr_mult": 0.5, "groups": [{"pattern": "blocks", "lr_mult": 3}]}])
    full, rep_full = local(cfg, run_dir=tmp_path / "full")
    resumed, rep = local(cfg, run_dir=tmp_path / "cut", resume_from=tmp_path / "full" / "epoch_0002")
    assert rep.metrics[0]["epoch"] == 3 and rep.metrics[0]["phase"] == 2.0
    assert rep.metrics[0]["train/loss"] == pytest.approx(rep_full.metrics[2]["train/loss"], rel=1e-6)
    assert resumed["test/ndcg@10"] == pytest.approx(full["test/ndcg@10"], rel=1e-6)


def test_phase_config_errors_name_the_key(tiny_job):
    with pytest.raises(ValueError, match="strictly increasing"):
        job(tiny_job, epochs=4, phases=[{"name": "a", "until_epoch": 3}, {"name": "b", "until_epoch": 2}])
    with pytest.raises(ValueError, match=r"last phase \(a\) ends at epoch 2 but train.epochs is 4"):
        job(tiny_job, epochs=4, phases=[{"name": "a", "until_epoch": 2}])
    with pytest.raises(ValueError, match=r"phases\[0\] \(a\).until_epoch is 5, past train.epochs \(4\)"):
        job(tiny_job, epochs=4, phases=[{"name": "a", "until_epoch": 5}, {"name": "b"}])
    with pytest.raises(ValueError, match=r"last phase \(b\) would have no epochs"):
        job(tiny_job, epochs=4, phases=[{"name": "a", "until_epoch": 4}, {"name": "b"}])
    cfg = job(tiny_job, epochs=2, phases=[{"name": "a", "until_epoch": 1, "loss_weights": {"kl": 0.5}},
                                          {"name": "b"}])
    with pytest.raises(ConfigError, match=r"phases\[0\] \(a\)\.loss_weights: \['kl'\].*\['rec'\]"):
        PhaseRunner(model_of(cfg), cfg, 10)
    cfg = job(tiny_job, epochs=2, phases=[{"name": "a", "until_epoch": 1}, {"name": "b", "freeze": ["encoder"]}])
    with pytest.raises(ConfigError, match=r"phases\[1\] \(b\)\.freeze: 'encoder' matches no parameter"):
        PhaseRunner(model_of(cfg), cfg, 10)  # found before the first step, not when phase b begins
    # a global rule may match only parameters a phase freezes; a phase's own rule must match trainable ones
    ok = job(tiny_job, epochs=2, optim={"groups": [{"pattern": "blocks", "lr_mult": 0.5}]},
             phases=[{"name": "a", "until_epoch": 1, "freeze": ["blocks"]}, {"name": "b"}])
    PhaseRunner(model_of(ok), ok, 10)
    bad = job(tiny_job, epochs=2, phases=[
        {"name": "a", "until_epoch": 1, "freeze": ["blocks"], "groups": [{"pattern": "blocks", "lr_mult": 2}]},
        {"name": "b"}])
    with pytest.raises(ConfigError, match=r"phases\[0\] \(a\).groups: pattern\(s\) \['blocks'\] match no trainable"):
        PhaseRunner(model_of(bad), bad, 10)


def test_warmup_belongs_to_the_run_and_cosine_ends_at_zero_in_each_phase():
    from rayrec.config.schema import OptimConfig
    from rayrec.train.phases import warmup_of

    assert lr_factor(0, total=10, warmup=4, schedule="cosine") == pytest.approx(0.25)
    assert lr_factor(9, total=10, warmup=0, schedule="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr_factor(10, total=10, warmup=0, schedule="cosine") == 0.0
    # a phase that starts 10 steps into a 15-step warmup continues the ramp, then decays over the rest
    assert [lr_factor(s, total=10, warmup=15, done=10, schedule="constant") for s in (0, 4, 5)] == [11 / 15, 1.0, 1.0]
    assert lr_factor(5, total=10, warmup=15, done=10, schedule="cosine") == 1.0
    assert lr_factor(10, total=10, warmup=15, done=10, schedule="cosine") == 0.0
    optim = OptimConfig(warmup_steps=15)
    assert warmup_of(optim, None, 10) == (15, 10) and warmup_of(optim, 3, 40) == (3, 0)
    assert lr_factor(0, total=10, warmup=15, done=40, schedule="constant") == 1.0  # warmup long over


# ----------------------------------------------------------------------------- KL annealing


def test_kl_annealing_factors():
    lin = KLAnnealConfig(schedule="linear", warmup=20)
    assert [kl_factor(lin, epoch=e, step=0) for e in (1, 10, 20, 30)] == [0.05, 0.5, 1.0, 1.0]  # seed: min(1, epoch/20)
    cos = KLAnnealConfig(schedule="cosine", warmup=10, unit="step")
    assert kl_factor(cos, epoch=1, step=0) == 0.0 and kl_factor(cos, epoch=1, step=5) == pytest.approx(0.5)
    assert kl_factor(cos, epoch=1, step=10) == pytest.approx(1.0)
    cyc = KLAnnealConfig(schedule="cyclical", warmup=10, unit="step", ratio=0.5)
    assert [kl_factor(cyc, epoch=1, step=s) for s in (0, 2, 5, 9, 10, 12)] == [0.0, 0.4, 1.0, 1.0, 0.0, 0.4]
    assert kl_factor(KLAnnealConfig(schedule="linear", warmup=10, floor=0.1), epoch=0, step=0) == 0.1
    assert kl_factor(KLAnnealConfig(), epoch=1, step=0) == 1.0


class TwoLosses(nn.Module):
    loss_names = ("rec", "kl")

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))


def test_phase_weights_and_kl_factor_make_the_total(tiny_job):
    cfg = job(tiny_job, epochs=2, kl_anneal={"schedule": "linear", "warmup": 4},
              phases=[{"name": "a", "until_epoch": 1, "loss_weights": {"rec": 0.5}}, {"name": "b"}])
    runner = PhaseRunner(TwoLosses(), cfg, 10)
    runner.enter(runner.plans[0], 0)
    parts = {"rec": torch.tensor(2.0), "kl": torch.tensor(8.0)}
    assert float(runner.total(parts, epoch=1, step=0)) == pytest.approx(0.5 * 2 + 0.25 * 8)
    runner.enter(runner.plans[1], 10)
    assert float(runner.total(parts, epoch=2, step=10)) == pytest.approx(2 + 0.5 * 8)
    assert runner.metrics(2, 10, {"rec", "kl"}) == {"phase": 2.0, "train/kl_factor": 0.5}


# ----------------------------------------------------------------------------- gradient health


def nan_every(n: int, monkeypatch, *, always: bool = False):
    """SASRec's loss is NaN on every n-th call (or always)."""
    calls = {"n": 0}
    orig = SASRec.loss

    def loss(self, batch):
        calls["n"] += 1
        out = orig(self, batch)
        return out * float("nan") if always or calls["n"] % n == 0 else out

    monkeypatch.setattr(SASRec, "loss", loss)
    return calls


def test_nan_steps_are_skipped_and_the_run_matches_a_clean_one(tiny_job, monkeypatch):
    cfg = job(tiny_job, epochs=4, batch_size=8, health={"log_every": 20})
    clean, _ = local(cfg)
    nan_every(50, monkeypatch)
    logged = []
    from rayrec.train import local as local_mod

    monkeypatch.setattr(local_mod.LocalReporter, "log_step", lambda self, m, step: logged.append((step, m)))
    final, rep = local(cfg)
    skipped = sum(m[SKIPPED] for m in rep.metrics[:-1])
    assert skipped == final["health/skipped_steps_total"] == 3  # 38 steps an epoch x 4, one NaN in 50
    state_ok = all(math.isfinite(m["train/loss"]) for m in rep.metrics[:-1])
    assert state_ok and math.isfinite(final["test/ndcg@10"])
    assert final["test/ndcg@10"] == pytest.approx(clean["test/ndcg@10"], rel=0.01)
    assert sum(m.get("health/nonfinite_item_emb", 0) for m in rep.metrics[:-1]) == 3
    assert logged and logged[0][0] == 20
    assert {"health/grad_norm/item_emb", "health/grad_norm/blocks"} <= set(logged[0][1])
    assert {"train/grad_norm_item_emb", "train/grad_norm_blocks", "train/grad_norm_ln_final"} <= set(rep.metrics[0])


def test_consecutive_nan_steps_stop_the_run_naming_the_modules(tiny_job, monkeypatch):
    cfg = job(tiny_job, epochs=1, health={"max_bad_steps": 3})
    calls = nan_every(1, monkeypatch, always=True)
    with pytest.raises(TrainingHealthError, match=r"3 optimizer steps in a row.*\['item_emb', 'pos_emb', 'blocks', 'ln_final'\]") as e:
        local(cfg)
    assert calls["n"] == 3 and "max_bad_steps=3" in str(e.value)


def test_vanishing_gradients_are_warned_and_counted(tiny_job, monkeypatch, caplog):
    cfg = job(tiny_job, epochs=1, health={"vanish_below": 1e-3})
    orig = SASRec.loss
    monkeypatch.setattr(SASRec, "loss", lambda self, batch: orig(self, batch) * 1e-6)
    with caplog.at_level(logging.WARNING, logger="rayrec.train.health"):
        _, rep = local(cfg)
    assert rep.metrics[0]["health/vanishing_blocks"] == 10  # every step of the epoch (300 rows / 32)
    warned = [r.getMessage() for r in caplog.records if "vanishing gradient" in r.getMessage()]
    assert any("module blocks" in w for w in warned)
    assert len([w for w in warned if "module blocks" in w]) == 1  # once per module and epoch


def test_fp16_scaler_overflow_is_a_counted_skip_that_leaves_the_schedule(tiny_job):
    from rayrec.train.health import GradHealth
    from rayrec.train.loop import _step

    model = TwoLosses()
    runner = PhaseRunner(model, tiny_job, 10)
    runner.enter(runner.plans[0], 0)
    health = GradHealth(model.named_parameters(), tiny_job.train.health)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(model.w.sum() * float("inf")).backward()
    assert _step(runner, health, scaler, 1.0) is False
    assert runner.sched.last_epoch == 0 and health.skipped == 1 and scaler.get_scale() == 2.0
    assert torch.equal(model.w.detach(), torch.ones(3))
    scaler.scale(model.w.sum()).backward()
    assert _step(runner, health, scaler, 1.0) is True and runner.sched.last_epoch == 1 and health.consecutive == 0


def test_a_short_last_accumulation_step_is_a_mean_over_its_own_batches(tiny_job):
    from rayrec.train.health import GradHealth
    from rayrec.train.loop import LossModule, train_epoch

    batch = a_batch(tiny_job)
    grads = {}
    for accum in (1, 3):  # one batch: a full step at accum 1, a short last step at accum 3
        cfg = job(tiny_job, grad_accum=accum, optim={"lr": 0.01, "grad_clip": None})
        model = model_of(cfg)
        runner = PhaseRunner(model, cfg, 1)
        runner.enter(runner.plans[0], 0)
        health = GradHealth(model.named_parameters(), cfg.train.health)

        def check(*a, accum=accum, model=model, check=health.check, **k):
            grads[accum] = [p.grad.clone() for p in model.parameters()]
            return check(*a, **k)

        health.check = check
        torch.manual_seed(1)
        stats = train_epoch(LossModule(model), [batch], runner, health, cfg, torch.device("cpu"))
        assert stats.steps == 1
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads[1], grads[3], strict=True))
