"""The retriever (experts, router, masks, fallbacks), the joint model's outputs and score fusion."""

import pytest
import torch

from rayrec.config.joint import FusionConfig, JointConfig
from rayrec.models.joint import BELOW, fuse, last_positions, ranks, zscore
from rayrec.models.retriever import JointFeatures
from rayrec.train.specs import build_model

N, U, L = 40, 10, 8


def joint(**over) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = JointConfig.model_validate({"sasrec": {"hidden": 16, "num_blocks": 1, "max_len": L, "dropout": 0.0},
                                      "retriever": {"hidden": 16, "dropout": 0.0, "num_negatives": 5,
                                                    "train_positions": 3}, **over})
    return build_model(cfg, N, features=JointFeatures.random(N, U)).eval()


def batch():
    ids = torch.tensor([[0, 0, 0, 3, 5, 7, 9, 11], [1, 2, 4, 6, 8, 10, 12, 14]])
    tgt = torch.tensor([[0, 0, 0, 5, 7, 9, 11, 13], [2, 4, 6, 8, 10, 12, 14, 16]])
    return {"input_ids": ids, "targets": tgt, "user_idx": torch.tensor([1, 2]), "history": ids}


def test_retriever_is_causal_per_query_position():
    m = joint()
    b = batch()
    cand = torch.randint(1, N + 1, (2, 2, 4))
    pos = torch.tensor([[4, 5], [4, 5]])
    before = m.retriever(b["input_ids"], b["user_idx"], cand, pos)
    later = b["input_ids"].clone()
    later[:, 6:] = torch.tensor([20, 21])  # items after every query position
    after = m.retriever(later, b["user_idx"], cand, pos)
    torch.testing.assert_close(before, after)
    earlier = b["input_ids"].clone()
    earlier[:, 5] = 30  # visible to the query at position 5, not to the one at 4
    moved = m.retriever(earlier, b["user_idx"], cand, pos)
    torch.testing.assert_close(before[:, 0], moved[:, 0])
    assert not torch.allclose(before[:, 1], moved[:, 1])


def test_the_content_prior_ranks_items_whose_text_is_like_the_recent_history():
    """``retriever.content_prior``: the recency-weighted cosine of each candidate's text with the history's
    is added at the learned scale; an item whose text is the last item's outranks the rest; 0 = off."""
    feats = JointFeatures.random(N, U)
    feats.item_text[30] = feats.item_text[11] * 2.0  # item 30 reads like item 11, the last one seen
    feats.item_text[31] = feats.item_text[3]  # like the oldest item: weighs decay^4 as much
    b = batch()
    cand = torch.tensor([[30, 31, 32, 33]]).expand(2, -1)
    def model(**retriever):
        torch.manual_seed(0)
        cfg = JointConfig.model_validate({"sasrec": {"hidden": 16, "num_blocks": 1, "max_len": L, "dropout": 0.0},
                                          "retriever": {"hidden": 16, "dropout": 0.0, "item_bias": False, **retriever}})
        return build_model(cfg, N, features=feats).eval()

    off, on = model(), model(content_prior=100.0, content_decay=0.5)
    assert off.retriever.content_scale is None and on.retriever.content_scale is not None
    prior = on.retriever.score(b["history"][:1], b["user_idx"][:1], cand[:1]) - \
        off.retriever.score(b["history"][:1], b["user_idx"][:1], cand[:1])
    unit = torch.nn.functional.normalize(feats.item_text, dim=-1)
    ages = {11: 0, 9: 1, 7: 2, 5: 3, 3: 4}
    want = [100.0 * sum(0.5 ** a * float(unit[c] @ unit[h]) for h, a in ages.items()) for c in (30, 31, 32, 33)]
    torch.testing.assert_close(prior[0], torch.tensor(want), rtol=1e-4, atol=1e-3)
    assert int(prior[0].argmax()) == 0
    from rayrec.models.retriever import _visible

    h, pos = b["history"][:1], torch.tensor([[L - 1]])
    rec = (pos[:, :, None] - torch.arange(L)).clamp(0, L - 1)
    every = torch.arange(1, N + 1)[None, None]  # many candidates: one product with the whole table
    torch.testing.assert_close(on.retriever.content_similarity(h, every, _visible(h, pos), rec)[..., 29:33],
                               on.retriever.content_similarity(h, every[..., 29:33], _visible(h, pos), rec))


def test_with_the_content_prior_the_candidates_add_its_own_top_n():
    """Full ranking fuses SASRec's top_n unseen items and, with the content prior, the prior's top_n
    among the rest and the history's own items: an item SASRec ranks last but whose text is the last
    item's becomes a candidate, and so does a seen item (ranking keeps a repeat target)."""
    feats = JointFeatures.random(N, U)
    feats.item_text[30] = feats.item_text[11]
    cfgs = {prior: JointConfig.model_validate({
        "sasrec": {"hidden": 16, "num_blocks": 1, "max_len": L, "dropout": 0.0}, "fusion": {"top_n": 5},
        "retriever": {"hidden": 16, "dropout": 0.0, "content_prior": prior}}) for prior in (0.0, 1.0)}
    history = batch()["history"][:1]
    sas = torch.arange(N + 1, dtype=torch.float).flip(0)[None]  # SASRec prefers low ids; item 30 is near last
    without = build_model(cfgs[0.0], N, features=feats).candidate_stage(sas, history)
    with_prior = build_model(cfgs[1.0], N, features=feats).candidate_stage(sas, history)
    assert without.shape == (1, 5) and 30 not in without.tolist()[0]
    got = with_prior.tolist()[0]
    assert with_prior.shape == (1, 10 + L) and 30 in got[:10] and len(set(got[:10])) == 10
    assert not set(got[:10]) & set(history[0].tolist())  # the two top_n lists hold unseen items only
    assert set(history[0].tolist()) - {0} <= set(got[10:]) and 0 not in got  # + the history (a repeat target)


def test_missing_features_use_the_learned_fallback():
    feats = JointFeatures.random(N, U)
    feats.item_image_ok[3] = False
    feats.item_image[3] = 1e6  # must never be read
    m = build_model(JointConfig(), N, features=feats)
    vec = m.retriever.image(torch.tensor([3, 4]))
    torch.testing.assert_close(vec[0], m.retriever.image.missing.detach())
    assert vec[1].abs().max() < 1e3


def test_each_expert_ablation_changes_scores_and_router_weights_sum_to_one():
    m = joint()
    b = batch()
    cand = torch.arange(1, 11).expand(2, -1)
    base = m.retriever.score(b["history"], b["user_idx"], cand)
    w = m.retriever.last_router_weights
    assert w.shape[-1] == 3 and torch.allclose(w.sum(-1), torch.ones(()))
    for expert in ("user_pref", "item_text", "item_image"):
        m.retriever.ablate = {expert}
        assert not torch.allclose(base, m.retriever.score(b["history"], b["user_idx"], cand)), expert
    m.retriever.ablate = set()
    torch.testing.assert_close(base, m.retriever.score(b["history"], b["user_idx"], cand))


def test_only_configured_experts_are_built():
    m = joint(retriever={"hidden": 16, "experts": ["item_text", "item_image"]})
    assert set(m.retriever.experts) == {"item_text", "item_image"}
    assert m.retriever.router[-1].out_features == 2


def test_weighted_fusion_normalises_scales():
    """The seed summed raw logits with cosines; after z-scoring, a 100x logit scale changes nothing."""
    sas = torch.tensor([[8.0, 2.0, -4.0, 0.5]])
    ret = torch.tensor([[0.1, 0.3, 0.2, 0.25]])
    cfg = FusionConfig(method="weighted", weight=0.5)
    torch.testing.assert_close(fuse(sas, ret, cfg), fuse(100 * sas, ret, cfg))
    z = zscore(sas)
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-6) and float(z.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert fuse(sas, ret, FusionConfig(weight=1.0)).argmax() == 0 and fuse(sas, ret, FusionConfig(weight=0.0)).argmax() == 1


def test_rank_and_cascade_fusion():
    sas = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    ret = torch.tensor([[0.0, 1.0, 3.0, 2.0]])
    assert ranks(sas).tolist() == [[1.0, 2.0, 3.0, 4.0]] and ranks(ret).tolist() == [[4.0, 3.0, 1.0, 2.0]]
    rrf = fuse(sas, ret, FusionConfig(method="rank", weight=0.5, rank_k=1.0))
    expect = [0.5 / (1 + a) + 0.5 / (1 + b) for a, b in ((1, 4), (2, 3), (3, 1), (4, 2))]
    torch.testing.assert_close(rrf, torch.tensor([expect]))
    cas = fuse(sas, ret, FusionConfig(method="cascade", top_n=3))
    order = cas.argsort(descending=True)[0].tolist()
    assert order == [2, 1, 0, 3]  # the retriever re-orders SASRec's top 3; item 3 stays last


def test_full_ranking_puts_the_retrievers_candidates_on_top():
    m = joint(fusion={"top_n": 6})
    b = batch()
    with torch.no_grad():
        scores = m.score(b["history"], b["user_idx"])  # [B, N+1]
        sas = m.sasrec.score(b["history"])
    assert scores.shape == (2, N + 1) and torch.isinf(scores[:, 0]).all()
    cand = m.candidate_stage(sas, b["history"])
    assert cand.shape == (2, 6)
    for row in range(2):
        assert not set(cand[row].tolist()) & set(b["history"][row].tolist())  # history never a candidate
        top = set(scores[row].topk(6).indices.tolist())
        assert top == set(cand[row].tolist())
        rest = torch.ones(N + 1, dtype=torch.bool)
        rest[0], rest[cand[row]] = False, False
        assert scores[row, rest].max() < -BELOW / 2
        # outside the candidates, SASRec's order is kept
        assert torch.equal(scores[row, rest].argsort(), sas[row, rest].argsort())


def test_sampled_candidates_and_scorers():
    m = joint()
    b = batch()
    cand = torch.tensor([[5, 1, 2, 3], [16, 1, 2, 3]])
    with torch.no_grad():
        m.scorer = "sasrec"
        torch.testing.assert_close(m.score(b["history"], b["user_idx"], cand), m.sasrec.score(b["history"]).gather(1, cand))
        m.scorer = "retriever"
        torch.testing.assert_close(m.score(b["history"], b["user_idx"], cand),
                                   m.retriever.score(b["history"], b["user_idx"], cand))
        m.scorer = "joint"
        assert m.score_batch(b, cand).shape == (2, 4)
    with pytest.raises(ValueError, match="needs user_idx"):
        m.score(b["history"])


def test_outputs_losses_and_gradients_reach_only_what_they_use():
    m = joint().train()
    b = batch()
    out = m.outputs(b, ("retriever",))
    assert set(out.losses) == {"retriever"} and out.sas_cand is None
    out.losses["retriever"].backward()
    assert all(p.grad is None for p in m.sasrec.parameters())
    assert any(p.grad is not None for p in m.retriever.parameters())
    m.zero_grad(set_to_none=True)
    out = m.outputs(b, ("sasrec", "retriever", "fused"), frozenset({"cand_scores", "reps"}))
    # row 0 has 5 targets, row 1 has 8: the last 3 positions of each -> M = 6, C = 1 + 5
    assert out.ret_cand.shape == out.sas_cand.shape == (6, 6) and out.item_vec.shape == (6, 16)
    assert out.target_ids.tolist() == [9, 11, 13, 12, 14, 16]
    pos, valid = last_positions(b["targets"], 6)
    assert valid.tolist() == [[False, True, True, True, True, True], [True] * 6]


def test_item_bias_adds_a_per_item_popularity_term():
    m = joint()
    b = batch()
    cand = torch.tensor([[1, 2, 3], [1, 2, 3]])
    with torch.no_grad():
        before = m.retriever.score(b["history"], b["user_idx"], cand)
        m.retriever.item_bias.weight[2] = 5.0
        after = m.retriever.score(b["history"], b["user_idx"], cand)
    torch.testing.assert_close(after - before, torch.tensor([[0.0, 5.0, 0.0]] * 2))
    assert joint(retriever={"hidden": 16, "item_bias": False}).retriever.item_bias is None


def test_compose_reuses_components_for_any_fusion_weight():
    m = joint(fusion={"top_n": 6})
    b = batch()
    with torch.no_grad():
        parts = m.components(b["history"], b["user_idx"])
        for w in (0.2, 0.8):
            m.fusion_weight.fill_(w)
            torch.testing.assert_close(m.compose(parts, w), m.score(b["history"], b["user_idx"]))


def test_preference_expert_asks_with_the_whole_item_text_and_image():
    """A preference can name a look as well as a genre, so the candidate's image is part of the query
    of the user_pref expert: changing one candidate's image changes that expert's output for it only."""
    m = joint()
    seen = []
    m.retriever.experts["user_pref"].register_forward_hook(lambda mod, args, out: seen.append(out))
    b = batch()
    cand = torch.tensor([[[5, 6, 7]], [[5, 6, 7]]])
    pos = torch.tensor([[7], [7]])
    m.retriever(b["input_ids"], b["user_idx"], cand, pos)
    m.retriever.image.table[6] += 3.0  # item 6's image only
    m.retriever(b["input_ids"], b["user_idx"], cand, pos)
    changed = ~torch.isclose(seen[0], seen[1]).all(-1)  # [B*P, C]
    assert changed[:, 1].all() and not changed[:, [0, 2]].any()
