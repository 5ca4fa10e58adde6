"""SASRec and the popularity baseline: shapes, causality, padding, losses, learning."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayrec.config.schema import LossConfig, PopularityConfig, SASRecConfig
from rayrec.eval.metrics import full_ranks
from rayrec.models import Popularity, SASRec
from rayrec.models.sasrec import binary_loss, build_sasrec, gbce_beta, uniform_negatives
from rayrec.train.specs import MODEL_SPECS, build_model

N = 30  # items 1..30
L = 8  # max_len


def tiny(loss: str = "ce", dropout: float = 0.0, **loss_kw) -> SASRec:
    torch.manual_seed(0)
    loss_cfg = LossConfig(name=loss, **loss_kw)
    cfg = SASRecConfig(hidden=16, num_blocks=1, num_heads=2, dropout=dropout, max_len=L, loss=loss_cfg)
    return build_sasrec(N, cfg)


def cyclic_batch(batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Item i is always followed by i % N + 1; rows are left-padded to random lengths."""
    start = torch.randint(1, N + 1, (batch, 1), generator=gen)
    seq = (start - 1 + torch.arange(L + 1)) % N + 1  # [B, L+1]
    length = torch.randint(2, L + 2, (batch, 1), generator=gen)
    seq = seq.masked_fill(torch.arange(L + 1) < L + 1 - length, 0)  # left padding
    return {"input_ids": seq[:, :-1], "targets": seq[:, 1:]}


def test_shapes():
    model = tiny().eval()
    ids = torch.randint(1, N + 1, (3, L))
    assert model(ids).shape == (3, L, 16)
    assert model(ids[:, :5]).shape == (3, 5, 16)
    scores = model.score(torch.randint(0, N + 1, (3, L + 4)))  # longer histories are cut
    assert scores.shape == (3, N + 1)
    assert torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()


def test_causality():
    model = tiny().eval()
    ids = torch.randint(1, N + 1, (2, L), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 5] = ids[:, 5] % N + 1
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5], b[:, 5])


def test_left_padding_does_not_change_last_output():
    model = tiny(dropout=0.2).eval()
    seq = torch.tensor([[4, 7, 2, 9, 11]])
    padded = torch.tensor([[0, 0, 0, 4, 7, 2, 9, 11]])
    torch.testing.assert_close(model(padded)[:, -1], model(seq)[:, -1])
    torch.testing.assert_close(model.score(padded), model.score(seq))
    empty = torch.zeros(2, L, dtype=torch.long)
    assert torch.isfinite(model(empty)).all() and torch.isfinite(model.score(empty)[:, 1:]).all()


def test_ce_excludes_padding_logit_and_padded_positions():
    model = tiny().eval()
    batch = cyclic_batch(4, torch.Generator().manual_seed(0))
    h = model(batch["input_ids"])
    keep = batch["targets"] != 0
    logits = h[keep] @ model.item_emb.weight.T  # [M, N+1]
    logits[:, 0] = float("-inf")
    manual = F.cross_entropy(logits, batch["targets"][keep])
    torch.testing.assert_close(model.loss(batch), manual)
    padded = {k: torch.cat([v, torch.zeros_like(v[:1])]) for k, v in batch.items()}
    torch.testing.assert_close(model.loss(padded), manual)  # an all-padding row adds nothing


def test_gbce_matches_formula_and_equals_bce_at_t0():
    model = tiny("bce", num_negatives=3).eval()
    batch = cyclic_batch(4, torch.Generator().manual_seed(1))
    keep = batch["targets"] != 0
    batch["negatives"] = torch.randint(1, N + 1, (*batch["targets"].shape, 3))
    bce = model.loss(batch)
    model.cfg = model.cfg.model_copy(update={"loss": LossConfig(name="gbce", num_negatives=3)})
    model.cfg.loss.gbce_t = 0.0
    assert torch.equal(model.loss(batch), bce)

    model.cfg.loss.gbce_t = 0.5
    h, emb = model(batch["input_ids"])[keep].double(), model.item_emb.weight.double()
    s_pos = (h * emb[batch["targets"][keep]]).sum(-1)  # [M]
    s_neg = torch.einsum("mh,mnh->mn", h, emb[batch["negatives"][keep]])  # [M, 3]
    alpha = 3 / (N - 1)
    beta = alpha * (0.5 * (1 - 1 / alpha) + 1 / alpha)  # the paper's form
    per_pos = -beta * torch.sigmoid(s_pos).log() - (1 - torch.sigmoid(s_neg)).log().sum(-1)
    torch.testing.assert_close(model.loss(batch).double(), (per_pos / 4).mean(), rtol=1e-5, atol=0)
    assert gbce_beta(3, N, 0.5) == pytest.approx(beta)


def test_binary_loss_is_stable_for_large_logits():
    # positive logit -100: -beta*log sigmoid(-100) = 0.5 * 100; negative 100: -log(1-sigmoid) = 100
    loss = binary_loss(torch.tensor([-100.0]), torch.tensor([[100.0]]), beta=0.5)
    assert loss.item() == pytest.approx((0.5 * 100 + 100) / 2)  # mean over 1 + 1 terms


def test_uniform_negatives_never_hit_the_positive():
    pos = torch.randint(1, N + 1, (500,))
    negs = uniform_negatives(pos, 7, N)
    assert not (negs == pos[:, None]).any()
    assert int(negs.min()) >= 1 and int(negs.max()) <= N


@pytest.mark.parametrize(
    "loss,kw", [("ce", {}), ("bce", {"num_negatives": 4}), ("gbce", {"num_negatives": 4})]
)
def test_training_learns_the_cyclic_pattern(loss, kw):
    model = tiny(loss, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        step_loss = model.loss(cyclic_batch(64, gen))
        assert torch.isfinite(step_loss)
        opt.zero_grad()
        step_loss.backward()
        opt.step()
        losses.append(step_loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]

    model.eval()
    test = cyclic_batch(256, torch.Generator().manual_seed(99))
    history = torch.cat([test["input_ids"], test["targets"][:, :-1]], 1)[:, -L:]
    with torch.no_grad():
        ranks = full_ranks(model.score(history), test["targets"][:, -1])
    hr10 = (ranks <= 10).float().mean().item()
    assert hr10 > 0.9  # chance is 10 / 30


def test_popularity_ranks_items_by_count():
    model = build_model(PopularityConfig(), num_items=5)
    assert isinstance(model, Popularity)
    model.fit([[1, 2, 2], np.array([2, 3], dtype=np.int32), [0, 3, 2]])  # 1:1, 2:4, 3:2, 4:0, 5:0
    scores = model.score(torch.zeros(2, 3, dtype=torch.long))
    assert scores.shape == (2, 6) and scores[0, 0] == float("-inf")
    # order 2 > 3 > 1 > 4 > 5 (4 and 5 tie on count; the lower index wins)
    ranks = full_ranks(scores[:1].expand(5, -1), torch.tensor([2, 3, 1, 4, 5]))
    assert ranks.tolist() == [1, 2, 3, 4, 5]
    assert model.state_dict()["counts"].tolist() == [0, 1, 4, 2, 0, 0]
    with pytest.raises(ValueError):
        model.fit([[6]])


def test_registry_builds_each_model_from_its_config():
    assert {"sasrec", "popularity", "ur4rec"} <= set(MODEL_SPECS)
    assert isinstance(build_model(SASRecConfig(hidden=16, num_blocks=1), num_items=N), SASRec)
