"""Ranking metrics against hand-computed values."""

import math

import pytest
import torch

from rayrec.config.schema import EvalConfig
from rayrec.eval.metrics import (
    METRIC_MODE,
    MetricSums,
    full_ranks,
    metric_key,
    metric_mode,
    parse_eval_mode,
    sample_negatives,
    sampled_ranks,
)

NEG_INF = float("-inf")


def test_full_ranks_hand_computed():
    scores = torch.tensor(
        [
            [0.0, 0.9, 0.3, 0.5, 0.1],  # target 3 (0.5): only item 1 (0.9) is above -> rank 2
            [9.0, 0.2, 0.8, 0.4, 0.6],  # target 1 (0.2): items 2, 3, 4 above -> rank 4;
        ]  # column 0 (9.0) is padding and never counted
    )
    assert full_ranks(scores, torch.tensor([3, 1])).tolist() == [2, 4]


def test_full_ranks_ties_are_pessimistic():
    scores = torch.tensor(
        [
            [0.0, 0.5, 0.5, 0.5, 0.1],  # target 2 ties with items 1 and 3 -> rank 1 + 2 = 3
            [0.0, 0.7, 0.7, 0.7, 0.7],  # all equal: target 4 is ranked last -> 1 + 3 = 4
        ]
    )
    assert full_ranks(scores, torch.tensor([2, 4])).tolist() == [3, 4]


def test_full_ranks_masks_seen_but_keeps_target_and_ignores_padding():
    row = [5.0, 0.9, 0.8, 0.7, 0.6, 0.5]  # items 0..5; column 0 (5.0) is padding
    scores = torch.tensor([row, row, row])
    targets = torch.tensor([3, 3, 3])  # target 3 (0.7); items 1, 2 above -> rank 3 unmasked
    seen = torch.tensor(
        [
            [1, 3, 0],  # item 1 masked, target 3 kept although seen, 0 is padding -> 1 + 1 = 2
            [0, 0, 0],  # nothing masked -> rank 3
            [2, 1, 5],  # both items above are masked; item 5 is below anyway -> rank 1
        ]
    )
    assert full_ranks(scores, targets).tolist() == [3, 3, 3]
    assert full_ranks(scores, targets, seen).tolist() == [2, 3, 1]


def test_full_ranks_nan_scores_rank_worst():
    scores = torch.tensor([[0.0, float("nan"), 0.1, 0.2], [0.0, 0.3, float("nan"), 0.2]])
    # row 0: the target's own score is NaN -> both other items count -> rank 3
    # row 1: target 1 (0.3) beats 0.2, but the NaN item counts as above -> rank 2
    assert full_ranks(scores, torch.tensor([1, 1])).tolist() == [3, 2]


def test_sampled_ranks_hand_computed():
    target = torch.tensor([0.5, 0.2, 0.7])
    negatives = torch.tensor(
        [
            [0.1, 0.6, 0.5],  # 0.6 above, 0.5 ties -> rank 1 + 2 = 3
            [0.1, 0.0, 0.3],  # 0.3 above -> rank 2
            [0.7, 0.7, 0.7],  # all tie -> rank 4
        ]
    )
    assert sampled_ranks(target, negatives).tolist() == [3, 2, 4]


def test_sampled_ranks_over_all_other_items_equals_full_ranks():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (6, 11), generator=g).float()  # many ties on purpose
    targets = torch.tensor([1, 3, 5, 7, 9, 10])
    others = torch.stack([torch.tensor([i for i in range(1, 11) if i != t]) for t in targets])
    sampled = sampled_ranks(scores.gather(1, targets[:, None])[:, 0], scores.gather(1, others))
    assert torch.equal(sampled, full_ranks(scores, targets))


def test_sample_negatives_avoid_target_and_seen_and_are_deterministic():
    targets = torch.tensor([1, 5, 20, 7])
    seen = torch.tensor([[2, 3, 4, 0], [5, 6, 0, 0], [0, 0, 0, 0], [1, 2, 3, 8]])
    negs = sample_negatives(targets, seen, 20, 50, torch.Generator().manual_seed(3))
    assert negs.shape == (4, 50) and negs.dtype == torch.long
    assert int(negs.min()) >= 1 and int(negs.max()) <= 20
    assert not (negs == targets[:, None]).any()
    assert not (negs[:, :, None] == seen[:, None, :]).any()
    again = sample_negatives(targets, seen, 20, 50, torch.Generator().manual_seed(3))
    other = sample_negatives(targets, seen, 20, 50, torch.Generator().manual_seed(4))
    assert torch.equal(negs, again) and not torch.equal(negs, other)
    no_seen = sample_negatives(targets, None, 20, 50, torch.Generator().manual_seed(3))
    assert not (no_seen == targets[:, None]).any()


def test_sample_negatives_are_uniform_over_allowed_items():
    # 10 items, target 1 and seen {2, 3, 4}: 6 allowed items, ~833 draws each out of 5000
    negs = sample_negatives(
        torch.tensor([1]), torch.tensor([[2, 3, 4]]), 10, 5000, torch.Generator().manual_seed(0)
    )
    counts = torch.bincount(negs[0], minlength=11)
    assert counts[:5].sum() == 0
    assert int(counts[5:].min()) > 700 and int(counts[5:].max()) < 970


def test_sample_negatives_fails_when_nothing_is_allowed():
    with pytest.raises(ValueError, match="cover all 3 items"):
        sample_negatives(torch.tensor([1]), torch.tensor([[2, 3, 3, 0]]), 3, 4, torch.Generator())


def test_metric_sums_hand_computed():
    sums = MetricSums(ks=[10, 1]).update(torch.tensor([1, 2, 11]))
    means = sums.means("val")
    expected = {
        "val/hr@1": 1 / 3,  # only rank 1 is within 1
        "val/hr@10": 2 / 3,  # ranks 1 and 2 are within 10
        "val/ndcg@1": 1 / 3,  # 1/log2(1+1) = 1 for rank 1, then / 3
        "val/ndcg@10": (1 + 1 / math.log2(3)) / 3,  # (1 + 0.63093) / 3 = 0.54364
        "val/mrr": (1 + 1 / 2 + 1 / 11) / 3,  # 1.59091 / 3 = 0.53030
        "val/mean_rank": (1 + 2 + 11) / 3,  # 14 / 3 = 4.6667
    }
    assert means.keys() == expected.keys()
    for key, value in expected.items():
        assert means[key] == pytest.approx(value, abs=1e-12), key
    assert sums.count == 3
    assert sums.means("val/") == means  # a trailing slash on the split is accepted


def test_metric_sums_merge_equals_one_pass():
    ranks = torch.randint(1, 50, (37,), generator=torch.Generator().manual_seed(1))
    whole = MetricSums([5, 10, 20]).update(ranks)
    a = MetricSums([5, 10, 20]).update(ranks[:20])
    b = MetricSums([5, 10, 20]).update(ranks[20:])
    # all_reduce(SUM) of the flat tensors is what workers do
    reduced = MetricSums.from_tensor(a.to_tensor() + b.to_tensor(), [5, 10, 20])
    merged = a.merge(b)
    assert torch.allclose(merged.to_tensor(), whole.to_tensor(), rtol=0, atol=1e-12)
    assert torch.allclose(reduced.to_tensor(), whole.to_tensor(), rtol=0, atol=1e-12)
    assert merged.means("test") == pytest.approx(whole.means("test"))
    assert whole.to_tensor().dtype == torch.float64 and whole.to_tensor().dim() == 1


def test_metric_sums_rejects_mismatches():
    with pytest.raises(ValueError):
        MetricSums([5]).merge(MetricSums([10]))
    with pytest.raises(ValueError):
        MetricSums.from_tensor(torch.zeros(4), [5, 10])
    with pytest.raises(ValueError, match="empty"):
        MetricSums([5]).means("val")


def test_metric_names_and_modes():
    assert metric_key("val", "ndcg", 10) == "val/ndcg@10"
    assert metric_key("test", "mrr") == "test/mrr"
    assert METRIC_MODE["mean_rank"] == "min" and METRIC_MODE["hr"] == "max"
    assert metric_mode("val/ndcg@10") == "max" and metric_mode("val/mean_rank") == "min"
    with pytest.raises(ValueError):
        metric_key("val", "ndcg")  # needs k
    with pytest.raises(ValueError):
        metric_mode("val/loss")


def test_parse_eval_mode_agrees_with_config():
    assert parse_eval_mode("full") is None
    assert parse_eval_mode(EvalConfig(mode="sampled:100").mode) == 100
    for bad in ["sampled", "sampled:0", "sampled:x", "popular:10"]:
        with pytest.raises(ValueError):
            parse_eval_mode(bad)
