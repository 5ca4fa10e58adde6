"""Multi-loss strategies, each shown on scripted losses: switch points, weights, queue, KD."""

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from rayrec.config.joint import (
    AdaptiveAlternatingConfig,
    CurriculumConfig,
    DistillationConfig,
    DWAConfig,
    FixedAlternatingConfig,
    MemoryBankConfig,
    StageConfig,
    UncertaintyConfig,
)
from rayrec.errors import ConfigError
from rayrec.strategies import (
    DWA,
    AdaptiveAlternating,
    Curriculum,
    Distillation,
    FixedAlternating,
    MemoryBank,
    Uncertainty,
    build_strategies,
    stage_loss_keys,
)
from rayrec.strategies.contrastive import info_nce
from rayrec.strategies.distillation import two_way_kd
from rayrec.strategies.weighting import dwa_weights


def feed(schedule, curves: dict[str, list[float]]) -> None:
    """Feed each turn the next value of the active module's scripted curve until one runs out."""
    pos = dict.fromkeys(curves, 0)
    while pos[schedule.active] < len(curves[schedule.active]):
        m = schedule.active
        schedule.observe({m: curves[m][pos[m]]})
        pos[m] += 1


# ----------------------------------------------------------------------------- alternation


def test_adaptive_alternation_switches_at_plateau_and_cap():
    s = AdaptiveAlternating(AdaptiveAlternatingConfig(window=3, threshold=0.05, min_steps=6, max_steps=12))
    # sasrec: falls, then flat at 5 -> windows (6,5,5|5,5,5)... the first window pair below 5 % is at step 11
    # retriever: falls by 1 every step -> never a plateau -> capped at 12 steps (global step 23)
    # sasrec again: rises -> relative improvement < 0 as soon as min_steps=6 allows (step 29)
    sasrec = [10, 9, 8, 7, 6, 5, 5, 5, 5, 5, 5] + [5, 6, 7, 8, 9, 10]
    retriever = [30 - i for i in range(12)] + [1.0] * 5  # 5 < min_steps: no further switch
    feed(s, {"sasrec": sasrec, "retriever": retriever})
    assert [e[:4] for e in s.events] == [
        (11, "sasrec", "retriever", "plateau"),
        (23, "retriever", "sasrec", "cap"),
        (29, "sasrec", "retriever", "plateau"),
    ]
    assert s.steps_per_module == {"sasrec": 17, "retriever": 17} and s.switches == 3
    stats = s.stats()
    assert stats["strategy/share_sasrec"] == pytest.approx(0.5) and stats["strategy/active"] == 1.0


def test_adaptive_alternation_threshold_is_relative_not_absolute():
    """The seed compared an absolute threshold: a flat loss of 1000 never 'improved less than 0.01'."""
    s = AdaptiveAlternating(AdaptiveAlternatingConfig(window=2, threshold=0.01, min_steps=4, max_steps=1000))
    for _ in range(4):
        s.observe({"sasrec": 1000.0, "retriever": 1000.0})
    assert s.events == [(4, "sasrec", "retriever", "plateau")]


def test_adaptive_alternation_waits_for_two_full_windows():
    s = AdaptiveAlternating(AdaptiveAlternatingConfig(window=5, threshold=0.5, min_steps=2, max_steps=100))
    for step in range(1, 10):
        s.observe({"sasrec": 1.0})
        assert s.switches == 0, f"switched at step {step} with fewer than 2 windows of losses"
    s.observe({"sasrec": 1.0})
    assert s.events == [(10, "sasrec", "retriever", "plateau")]


def test_adaptive_alternation_missing_loss_key_is_an_error():
    s = AdaptiveAlternating(AdaptiveAlternatingConfig())
    with pytest.raises(ConfigError, match="watches the loss 'sasrec'.*\\['loss', 'retriever_loss'\\]"):
        s.observe({"loss": 1.0, "retriever_loss": 2.0})


def test_adaptive_alternation_state_round_trip_continues_identically():
    cfg = AdaptiveAlternatingConfig(window=2, threshold=0.1, min_steps=3, max_steps=7)
    curve = [5.0, 4.0, 3.5, 3.4, 3.39, 3.2, 3.0, 2.9, 2.89, 2.88, 2.7, 2.6, 2.59, 2.58]
    a, b = AdaptiveAlternating(cfg), AdaptiveAlternating(cfg)
    for i, v in enumerate(curve):
        if i == 5:
            b.load(a.state())
        a.observe({"sasrec": v, "retriever": v})
        if i >= 5:
            b.observe({"sasrec": v, "retriever": v})
    assert a.events == b.events and a.state() == b.state() and a.switches >= 2


def test_fixed_alternation_every_n_steps():
    s = FixedAlternating(FixedAlternatingConfig(every=3))
    seen = []
    for _ in range(9):
        seen.append(s.active[0])
        s.observe({})
    assert "".join(seen) == "sssrrrsss"
    assert [e[0] for e in s.events] == [3, 6, 9] and s.steps_per_module == {"sasrec": 6, "retriever": 3}


# ----------------------------------------------------------------------------- weighting


def test_uncertainty_log_vars_are_optimised_to_inverse_loss_weights():
    w = Uncertainty(UncertaintyConfig(), ("sasrec", "retriever"))
    params = list(w.parameters())
    assert len(params) == 2 and all(p.requires_grad for p in params)
    assert {p.device.type for p in w.to("cpu").parameters()} == {"cpu"}  # moves with the module
    opt = torch.optim.Adam(params, lr=0.05)
    losses = {"sasrec": torch.tensor(4.0), "retriever": torch.tensor(0.5)}
    for _ in range(1500):
        opt.zero_grad()
        w.combine(losses).backward()
        opt.step()
    # optimum: s_k = log(2 L_k), i.e. weight exp(-s_k) = 1 / (2 L_k)
    assert w.weight("sasrec") == pytest.approx(1 / 8, rel=0.02)
    assert w.weight("retriever") == pytest.approx(1.0, rel=0.02)
    assert w.stats()["strategy/log_var_sasrec"] == pytest.approx(math.log(8), abs=0.02)


def test_dwa_weights_from_epoch_loss_ratios():
    d = DWA(DWAConfig(temperature=2.0), ("sasrec", "retriever"))
    assert d.weights == {"sasrec": 1.0, "retriever": 1.0}
    d.end_epoch({"sasrec": 2.0, "retriever": 1.0})
    assert d.weights == {"sasrec": 1.0, "retriever": 1.0}  # one epoch: no ratio yet
    d.end_epoch({"sasrec": 1.0, "retriever": 1.0})  # sasrec halved, retriever stalled
    ea, eb = math.exp(0.5 / 2), math.exp(1.0 / 2)
    assert d.weight("sasrec") == pytest.approx(2 * ea / (ea + eb))
    assert d.weight("retriever") == pytest.approx(2 * eb / (ea + eb))
    assert d.weight("retriever") > 1 > d.weight("sasrec")  # the slower-falling loss gets more weight
    total = d.combine({"sasrec": torch.tensor(1.0), "retriever": torch.tensor(3.0)})
    assert float(total) == pytest.approx(d.weight("sasrec") + 3 * d.weight("retriever"))
    assert dwa_weights([{"a": 1.0}], ("a",), 2.0) == {"a": 1.0}


def test_dwa_keeps_a_loss_that_was_not_trained_this_epoch():
    d = DWA(DWAConfig(), ("sasrec", "retriever"))
    d.end_epoch({"sasrec": 2.0, "retriever": 2.0})
    d.end_epoch({"sasrec": 1.0})  # retriever idle under alternation: ratio 1
    assert d.history[-1]["retriever"] == 2.0 and d.weight("retriever") > d.weight("sasrec")


def test_curriculum_weights_by_phase():
    cfg = CurriculumConfig(phases=[{"until_epoch": 2, "weights": {"sasrec": 1.0, "retriever": 0.0}},
                                   {"until_epoch": 4, "weights": {"sasrec": 0.5, "retriever": 1.0}}])
    c = Curriculum(cfg, ("sasrec", "retriever"), "end_to_end")
    seen = []
    for epoch in (1, 2, 3, 4, 7):
        c.start_epoch(epoch)
        seen.append((c.weight("sasrec"), c.weight("retriever")))
    assert seen == [(1.0, 0.0), (1.0, 0.0), (0.5, 1.0), (0.5, 1.0), (0.5, 1.0)]
    bad = CurriculumConfig(phases=[{"until_epoch": 1, "weights": {"fused": 1.0}}])
    with pytest.raises(ConfigError, match="fused exists only in end_to_end"):
        Curriculum(bad, ("sasrec", "retriever"), "joint_finetune")
    with pytest.raises(ValidationError, match="strictly increasing"):
        CurriculumConfig(phases=[{"until_epoch": 3, "weights": {}}, {"until_epoch": 2, "weights": {}}])


# ----------------------------------------------------------------------------- memory bank


def test_info_nce_counts_the_positive_once():
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(2, 8), dim=-1), F.normalize(torch.randn(2, 8), dim=-1)
    queue = F.normalize(torch.randn(5, 8), dim=-1)
    pos_ids = torch.tensor([7, 9])
    queue_ids = torch.tensor([3, 7, 0, 4, 9])  # slot 1 holds row 0's item, slot 4 row 1's; slot 2 is empty
    queue[1], queue[4] = k[0], k[1]  # the same item's key from an earlier batch
    got = info_nce(q, k, queue, queue_ids, pos_ids, 0.1)
    expect = []
    for m, valid in ((0, [0, 3, 4]), (1, [0, 1, 3])):
        logits = torch.cat([(q[m] @ k[m])[None], q[m] @ queue[valid].T]) / 0.1
        expect.append(-(logits[0] - torch.logsumexp(logits, 0)))
    assert float(got) == pytest.approx(float(torch.stack(expect).mean()), rel=1e-5)


def test_memory_bank_queue_wraps_and_is_capped():
    bank = MemoryBank(MemoryBankConfig(queue_size=4, dim=4), user_dim=6, item_dim=5)
    bank.enqueue(torch.ones(3, 4), torch.tensor([1, 2, 3]))
    bank.enqueue(2 * torch.ones(3, 4), torch.tensor([4, 5, 6]))
    assert bank.queue_ids.tolist() == [5, 6, 3, 4] and int(bank.ptr) == 2
    bank.enqueue(torch.zeros(6, 4), torch.arange(10, 16))  # more than the queue: the newest 4 stay
    assert sorted(bank.queue_ids.tolist()) == [12, 13, 14, 15]
    keys = torch.ones(2, 4)
    keys[0, 1] = float("nan")  # a step the health check skips must not poison the queue
    bank.enqueue(keys, torch.tensor([20, 21]))
    assert torch.isfinite(bank.queue).all() and 21 in bank.queue_ids.tolist() and 20 not in bank.queue_ids.tolist()
    assert MemoryBankConfig(queue_size=65536).queue_size == 65536
    with pytest.raises(ValidationError):
        MemoryBankConfig(queue_size=65537)


def test_memory_bank_loss_trains_both_projections():
    bank = MemoryBank(MemoryBankConfig(queue_size=16, dim=8, weight=0.5), user_dim=6, item_dim=5)

    class Out:
        user_state = torch.randn(4, 6, requires_grad=True)
        item_vec = torch.randn(4, 5, requires_grad=True)
        target_ids = torch.tensor([1, 2, 3, 4])

    loss = bank(Out)
    loss.backward()
    assert Out.user_state.grad is not None and Out.item_vec.grad is not None
    assert bank.stats()["strategy/queue_fill"] == pytest.approx(4 / 16)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)  # empty queue: only the positive -> log 1 = 0


# ----------------------------------------------------------------------------- distillation


def test_two_way_kd_values_and_gradient_directions():
    sas = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    ret = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    t = 2.0
    p_s, p_r = F.softmax(sas.detach() / t, -1), F.softmax(ret.detach() / t, -1)
    kl_sr = (p_s * (p_s.log() - p_r.log())).sum()
    kl_rs = (p_r * (p_r.log() - p_s.log())).sum()
    assert float(two_way_kd(sas, ret, t, "both").detach()) == pytest.approx(t * t * float(kl_sr + kl_rs), rel=1e-5)
    two_way_kd(sas, ret, t, "to_retriever").backward()
    assert sas.grad is None and ret.grad is not None  # SASRec only teaches
    assert float(two_way_kd(ret, ret, t)) == pytest.approx(0.0, abs=1e-7)
    d = Distillation(DistillationConfig(weight=0.25, temperature=t, direction="to_sasrec"))

    class Out:
        sas_cand, ret_cand = sas, ret

    assert float(d(Out).detach()) == pytest.approx(0.25 * t * t * float(kl_rs), rel=1e-5)


# ----------------------------------------------------------------------------- composition


class FakeOut:
    def __init__(self, **losses):
        self.losses = {k: torch.tensor(v, requires_grad=True) for k, v in losses.items()}


def test_strategy_set_trains_only_the_active_module_loss():
    stage = StageConfig(name="joint_finetune", epochs=1,
                        strategies=[{"name": "fixed_alternating", "every": 2}, {"name": "uncertainty"}])
    s = build_strategies(stage, user_dim=8, item_dim=8)
    assert s.active_modules() == ("sasrec",) and len(list(s.parameters())) == 2
    total, parts = s.total(FakeOut(sasrec=2.0, retriever=5.0), s.active_modules())
    assert set(parts) == {"sasrec"} and float(total) == pytest.approx(2.0)  # exp(0) * 2 + 0
    s.start_epoch(1)
    for _ in range(4):
        s.observe({m: 1.0 for m in s.active_modules()})
    stats = s.end_epoch()
    assert stats["strategy/switches_epoch"] == 2 and stats["strategy/epoch_share_retriever"] == 0.5
    assert stats["strategy/switches_from_sasrec_epoch"] == 1 and stats["strategy/switches_from_retriever_epoch"] == 1
    # the schedule state travels in the state dict (checkpoints)
    again = build_strategies(stage, user_dim=8, item_dim=8)
    again.load_state_dict(s.state_dict())
    assert again.schedule.state() == s.schedule.state()


def test_end_to_end_has_a_fused_loss_and_pretraining_one_module():
    e2e = StageConfig(name="end_to_end", epochs=1)
    assert stage_loss_keys(e2e) == ("sasrec", "retriever", "fused")
    s = build_strategies(e2e, user_dim=8, item_dim=8)
    total, parts = s.total(FakeOut(sasrec=1.0, retriever=2.0, fused=3.0), s.active_modules())
    assert set(parts) == {"sasrec", "retriever", "fused"} and float(total) == pytest.approx(6.0)
    assert stage_loss_keys(StageConfig(name="pretrain_retriever", epochs=1)) == ("retriever",)
    with pytest.raises(ValidationError, match="at most one schedule"):
        StageConfig(name="joint_finetune", epochs=1,
                    strategies=[{"name": "fixed_alternating"}, {"name": "adaptive_alternating"}])


def test_a_skipped_step_keeps_the_plan_of_turns():
    fixed = FixedAlternating(FixedAlternatingConfig(every=2))
    fixed.observe({"sasrec": 1.0})
    fixed.observe_skipped()  # NaN step: still the second step of sasrec's turn
    assert fixed.active == "retriever" and fixed.step == 2
    adaptive = AdaptiveAlternating(AdaptiveAlternatingConfig(window=1, min_steps=1, max_steps=2, threshold=0.0))
    adaptive.observe({"sasrec": 1.0})
    adaptive.observe_skipped()  # counts towards the cap, adds no loss to the plateau window
    assert adaptive.active == "retriever" and list(adaptive.recent) == []
