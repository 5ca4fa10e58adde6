"""The multi-interest model of seed 003: shapes, switches, numerics, what its losses do, and its jobs."""

from pathlib import Path

import pytest
import torch

from rayrec.config import load_job
from rayrec.config.multi_interest import MultiInterestConfig
from rayrec.models.multi_interest import ComplexEncoder, MultiInterest
from rayrec.train.phases import PhaseRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
N, B, L = 40, 6, 12


def model(**cfg) -> MultiInterest:
    torch.manual_seed(0)
    base = {"hidden": 16, "num_blocks": 1, "max_len": L, "num_interests": 3, "vae": {"latent": 4},
            "complex": {"dim": 4}, "train_positions": L}
    return MultiInterest(N, MultiInterestConfig(**{**base, **cfg}))


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, N + 1, (B, L + 1), generator=g)
    ids[:2, :5] = 0  # two left-padded rows
    return {"input_ids": ids[:, :-1], "targets": torch.where(ids[:, :-1] == 0, 0, ids[:, 1:])}


SWITCHES = {
    "full": ({}, {"rec", "kl", "recon", "orthogonality", "diversity", "causal"}, set()),
    "no_vae": ({"vae": {"enabled": False}}, {"rec", "orthogonality", "diversity", "causal"}, {"vae"}),
    "no_causal": ({"causal": {"enabled": False}}, {"rec", "kl", "recon", "orthogonality", "diversity"}, {"causal"}),
    "no_complex": ({"complex": {"enabled": False}}, {"rec", "kl", "recon", "orthogonality", "diversity", "causal"},
                   {"complex"}),
    "k1": ({"num_interests": 1}, {"rec", "kl", "recon", "causal"}, set()),
    "ips": ({"causal": {"method": "ips"}}, {"rec", "kl", "recon", "orthogonality", "diversity", "causal"}, {"causal"}),
    "attention": ({"scoring": "attention", "orthogonality": False, "diversity": False}, {"rec", "kl", "recon", "causal"},
                  set()),
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_switch_gives_its_losses_modules_and_scores(name):
    cfg, losses, off = SWITCHES[name]
    m = model(**cfg)
    out = m.losses(batch())
    assert set(out) == losses == set(m.loss_names) and all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    assert m.disabled_modules == off
    prefixes = {n.split(".")[0] for n, _ in m.named_parameters()}  # (ips: a causal module without parameters)
    assert not (prefixes & off) and {"encoder", "interests"} <= prefixes
    sum(out.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    m.eval()
    with torch.no_grad():
        scores = m.score(batch()["input_ids"])
    assert scores.shape == (B, N + 1) and torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    h = m.encoder(batch()["input_ids"])
    pos = torch.full((B, 2), L - 1)
    assert m.interests(h, batch()["input_ids"], pos).shape == (B, 2, m.cfg.num_interests, 16)


def test_interests_at_a_position_see_only_the_past():
    m = model()
    m.eval()
    ids = batch()["input_ids"]
    h = m.encoder(ids)
    pos = torch.full((B, 1), 5)
    before = m.interests(h, ids, pos)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] % N) + 1  # the future
    assert torch.allclose(m.interests(m.encoder(changed), changed, pos), before, atol=1e-6)


def test_the_complex_encoder_has_finite_gradients_on_zero_and_tiny_inputs():
    enc = ComplexEncoder(N, 4, L, 0.8)
    with torch.no_grad():
        enc.amplitude.weight.fill_(-80.0)  # softplus -> ~1e-35: amplitudes of (almost) zero
        enc.phase.weight.zero_()
    for ids in (torch.zeros(B, L, dtype=torch.long), batch()["input_ids"]):  # all padding; real items, tiny amplitudes
        pos = torch.full((B, 1), L - 1)
        user = enc.user(ids, pos)
        scores = enc.scores((user[0][:, 0], user[1][:, 0]), enc.item_table())
        scores.sum().backward()
        grads = [p.grad for p in enc.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads) and torch.isfinite(scores).all()
        enc.zero_grad()


def overfit(losses: tuple[str, ...], steps: int = 120) -> tuple[dict[str, float], dict[str, float]]:
    """Losses before and after ``steps`` Adam steps on one batch, optimising the sum of ``losses``."""
    m = model(num_interests=4, label_power=1.0)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    data = batch(1)
    first = {k: float(v.detach()) for k, v in m.losses(data).items()}
    for _ in range(steps):
        out = m.losses(data)
        sum(out[k] for k in losses).backward()
        opt.step()
        opt.zero_grad()
    return first, {k: float(v.detach()) for k, v in m.losses(data).items()}


def test_training_lowers_kl_and_recon():
    first, last = overfit(("rec", "recon", "kl"))
    assert last["kl"] < 0.1 * first["kl"] and last["recon"] < 0.5 * first["recon"] and last["rec"] < first["rec"]


def test_the_orthogonality_loss_makes_the_interests_diverge():
    first, last = overfit(("rec", "orthogonality"))
    assert first["orthogonality"] > 0.95  # the interests start alike (the state at t plus small read-outs)
    assert last["orthogonality"] < 0.6 * first["orthogonality"] and last["rec"] < first["rec"]


def test_a_detached_vae_leaves_the_interests_alone():
    m = model(vae={"latent": 4, "shape_interests": False})
    out = m.losses(batch())
    (out["recon"] + out["kl"]).backward()
    assert all(p.grad is None or not p.grad.any() for n, p in m.named_parameters() if not n.startswith("vae."))
    assert any(p.grad is not None and p.grad.any() for n, p in m.named_parameters() if n.startswith("vae."))


def test_ips_counts_training_targets_and_weighs_rare_ones_up():
    m = model(causal={"method": "ips"})
    data = batch()
    m.losses(data)
    assert int(m.causal.counts.sum()) == int((data["targets"] != 0).sum())
    m.eval()
    before = m.causal.counts.clone()
    m.losses(data)
    assert torch.equal(m.causal.counts, before)  # evaluation does not count


def test_the_jobs_phases_and_table_hold_for_every_ablation(tiny_dataset):
    """The seed-003 job names recon/causal/vae/...: switching a module off must not make them errors."""
    job = ROOT / "jobs" / "multi_interest_quickstart.yaml"
    for extra in ([], ["model.vae.enabled=false"], ["model.causal.enabled=false"], ["model.complex.enabled=false"],
                  ["model.num_interests=1"], ["model.causal.method=ips"]):
        cfg = load_job(job, [f"data.path={tiny_dataset}", "model.hidden=16", "model.num_blocks=1", "model.max_len=20",
                             *extra])
        m = MultiInterest(120, cfg.model)
        runner = PhaseRunner(m, cfg, 10)  # checks every phase's patterns, rules and loss names
        runner.enter(runner.plans[0], 0)
        frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
        assert frozen == ({"causal.bias"} if "causal" not in m.disabled_modules else set())
        lrs = {g["name"]: g["initial_lr"] for g in runner.opt.param_groups}
        assert lrs["encoder.item_emb* (no decay)"] == pytest.approx(2 * cfg.train.optim.lr)
        if m.complex is not None:
            assert lrs["complex (no decay)"] == pytest.approx(0.5 * cfg.train.optim.lr)
    for name in ("multi_interest_beauty.yaml", "multi_interest_beauty_e2e.yaml"):
        cfg = load_job(ROOT / "jobs" / name)
        assert cfg.data.source == "amazon" and cfg.train.epochs == 50
    assert [p.until_epoch for p in load_job(ROOT / "jobs" / "multi_interest_beauty.yaml").train.phases] == [10, 30, None]
    assert load_job(ROOT / "jobs" / "multi_interest_beauty_e2e.yaml").train.phases == []


@pytest.mark.slow
def test_quickstart_job_on_ray_train_two_workers(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    from rayrec import recipes

    cfg = load_job(ROOT / "jobs" / "multi_interest_quickstart.yaml", [
        f"data.path={tmp_path}/data", "data.synth={users: 300, items: 120, topics: 4, mean_len: 20, images: false}",
        "model.hidden=16", "model.num_blocks=1", "model.max_len=20", "model.vae.latent=8", "model.complex.dim=8",
        "train.epochs=4", "train.phases.components.until_epoch=1", "train.phases.joint.until_epoch=2",
        "train.batch_size=16", "train.optim.warmup_steps=0",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"run.storage_path={tmp_path}/runs"])
    assert cfg.scaling.num_workers == 2
    out = recipes.run(cfg)
    assert out.metrics["epoch"] == 4 and out.metrics["test/rows"] == 300 and out.metrics["test/hr@10"] > 10 / 120
    c = MlflowClient(cfg.tracking.uri)
    phase = [m.value for m in sorted(c.get_metric_history(out.mlflow_run_id, "phase"), key=lambda m: m.step)]
    assert phase == [1, 2, 3, 3]
    for key in ("train/loss_rec", "train/loss_kl", "train/loss_causal", "train/kl_factor", "train/grad_norm_vae"):
        assert c.get_metric_history(out.mlflow_run_id, key.replace("@", "_at_")), key
    rec = [m.value for m in sorted(c.get_metric_history(out.mlflow_run_id, "train/loss_rec"), key=lambda m: m.step)]
    assert rec[-1] < rec[0] - 0.05, rec
