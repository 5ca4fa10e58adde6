"""Ranking metrics for next-item prediction, batched in torch.

Items are indexed 1..N and column 0 of every score matrix is padding, never ranked.
Ranks are 1-based and pessimistic on ties: an item that scores the same as the target
is counted as ranked above it, so a model that outputs a constant scores worst, not best.
A NaN score counts as above the target for the same reason (a diverged model must not
report a perfect hit rate).

Per-batch code only accumulates *sums* (`MetricSums`), so workers can `all_reduce` one
flat tensor and every worker ends with the same means, whatever the shard sizes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

HR = "hr"
NDCG = "ndcg"
MRR = "mrr"
MEAN_RANK = "mean_rank"

# Whether a larger value is better ("max") or worse ("min"), per base metric name.
METRIC_MODE: dict[str, str] = {HR: "max", NDCG: "max", MRR: "max", MEAN_RANK: "min"}

# Base names that take a cutoff k (`hr@10`); the others stand alone (`mrr`).
AT_K = (HR, NDCG)


def metric_key(split: str, name: str, k: int | None = None) -> str:
    """Full metric name as logged and reported: metric_key("val", "ndcg", 10) -> "val/ndcg@10"."""
    if name not in METRIC_MODE:
        raise ValueError(f"unknown metric '{name}'; known: {sorted(METRIC_MODE)}")
    if (k is not None) != (name in AT_K):
        raise ValueError(f"metric '{name}' {'needs' if name in AT_K else 'takes no'} cutoff k")
    return f"{split}/{name}" if k is None else f"{split}/{name}@{k}"


def metric_mode(key: str) -> str:
    """Mode ("max"/"min") of a full key such as "val/ndcg@10" or "test/mean_rank"."""
    base = key.rpartition("/")[2].partition("@")[0]
    if base not in METRIC_MODE:
        raise ValueError(f"'{key}' is not a ranking metric; known bases: {sorted(METRIC_MODE)}")
    return METRIC_MODE[base]


def parse_eval_mode(mode: str) -> int | None:
    """Negatives per target of an eval mode: "full" -> None (all items), "sampled:100" -> 100."""
    if mode == "full":
        return None
    head, _, n = mode.partition(":")
    if head != "sampled" or not n.isdigit() or int(n) < 1:
        raise ValueError(f"'{mode}' is not 'full' or 'sampled:N' with N >= 1 (e.g. sampled:100)")
    return int(n)


def full_ranks(scores: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of each target among all items 1..N.

    scores  # [B, N+1] (column 0 = padding, ignored)
    targets # [B] item indices in 1..N
    seen    # [B, H] item indices to exclude (0 = padding); the target itself always stays
    returns # [B] long: 1 + number of other ranked items scoring >= the target
    """
    target_scores = scores.gather(1, targets[:, None])  # [B, 1]
    above = (scores >= target_scores) | scores.isnan() | target_scores.isnan()  # [B, N+1]
    above[:, 0] = False
    if seen is not None:
        above.scatter_(1, seen.long(), False)  # seen 0s hit column 0, already excluded
    above.scatter_(1, targets[:, None], False)  # the target does not outrank itself
    return above.sum(1) + 1


def sampled_ranks(target_scores: torch.Tensor, negative_scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target among its sampled negatives (pessimistic on ties).

    target_scores   # [B]
    negative_scores # [B, n]
    returns         # [B] long
    """
    t = target_scores[:, None]  # [B, 1]
    above = (negative_scores >= t) | negative_scores.isnan() | t.isnan()  # [B, n]
    return above.sum(1) + 1


def sample_negatives(
    targets: torch.Tensor,
    seen: torch.Tensor | None,
    num_items: int,
    n: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Uniform negatives from 1..num_items that are neither the target nor a seen item.

    Drawn with replacement (as SASRec's reference evaluation), so a row may repeat a
    negative. Forbidden draws are redrawn until none is left; only those positions consume
    new random numbers, so the result is a pure function of the generator's state.
    Numbers are drawn on the generator's device and moved to the targets' device.

    targets # [B] item indices in 1..num_items
    seen    # [B, H] item indices (0 = padding) or None
    returns # [B, n] long
    """
    forbidden = targets[:, None].long()  # [B, 1]
    if seen is not None:
        forbidden = torch.cat([seen.long(), forbidden], 1)  # [B, H+1]
    forbidden = forbidden.sort(1).values
    _check_allowed(forbidden, num_items)

    def draw(count: int) -> torch.Tensor:
        out = torch.randint(1, num_items + 1, (count,), generator=generator, device=generator.device)
        return out.to(targets.device)

    negatives = draw(targets.shape[0] * n).view(-1, n)  # [B, n]
    while True:
        # A draw is forbidden iff it equals the first forbidden item >= it.
        pos = torch.searchsorted(forbidden, negatives).clamp_(max=forbidden.shape[1] - 1)
        bad = forbidden.gather(1, pos) == negatives  # [B, n]
        num_bad = int(bad.sum())
        if num_bad == 0:
            return negatives
        negatives[bad] = draw(num_bad)


def _check_allowed(forbidden: torch.Tensor, num_items: int) -> None:
    """Fail, instead of looping forever, when a row forbids every item (forbidden is sorted)."""
    distinct = (forbidden >= 1) & (forbidden <= num_items)  # [B, H+1]
    distinct[:, 1:] &= forbidden[:, 1:] != forbidden[:, :-1]
    if bool((distinct.sum(1) >= num_items).any()):
        raise ValueError(
            f"cannot sample negatives: a row's target and seen items cover all {num_items} "
            "items; use full ranking or set mask_seen=false"
        )


class MetricSums:
    """Sums of hr@k, ndcg@k, mrr and rank over targets, plus their count.

    Sums, not means, so shards merge exactly: `merge` or an `all_reduce` of `to_tensor()`
    over workers equals one pass over all targets. Kept on the CPU in float64.
    Layout of the flat tensor: [count, mrr, mean_rank, hr@k..., ndcg@k...] (ks sorted).
    """

    def __init__(self, ks: Iterable[int]):
        self.ks = tuple(sorted({int(k) for k in ks}))
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
        self._sums = torch.zeros(3 + 2 * len(self.ks), dtype=torch.float64)

    @property
    def count(self) -> int:
        return int(self._sums[0])

    def update(self, ranks: torch.Tensor) -> MetricSums:
        """Add the metrics of a batch of 1-based ranks  # [B]."""
        r = ranks.detach().to("cpu", torch.float64).reshape(-1)  # [B]
        ks = torch.tensor(self.ks, dtype=torch.float64)  # [K]
        hit = (r[:, None] <= ks).double()  # [B, K]
        gain = 1.0 / torch.log2(r + 1.0)  # [B]
        head = torch.stack([r.new_tensor(float(r.numel())), (1.0 / r).sum(), r.sum()])
        self._sums += torch.cat([head, hit.sum(0), (hit * gain[:, None]).sum(0)])
        return self

    def to_tensor(self) -> torch.Tensor:
        """A copy of the flat float64 sums, e.g. to `all_reduce` (SUM) across workers."""
        return self._sums.clone()

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, ks: Iterable[int]) -> MetricSums:
        """Inverse of `to_tensor` (after an all_reduce, say); ks as given to the original."""
        sums = cls(ks)
        flat = tensor.detach().to("cpu", torch.float64).reshape(-1)
        if flat.numel() != sums._sums.numel():
            raise ValueError(f"expected {sums._sums.numel()} sums for ks={sums.ks}, got {flat.numel()}")
        sums._sums = flat.clone()
        return sums

    def merge(self, other: MetricSums) -> MetricSums:
        """Add another accumulator's sums into this one (same ks); returns self."""
        if other.ks != self.ks:
            raise ValueError(f"cannot merge sums over ks={other.ks} into ks={self.ks}")
        self._sums += other._sums
        return self

    def means(self, prefix: str) -> dict[str, float]:
        """Means keyed by full metric name: {"val/hr@10": ..., "val/mrr": ..., ...}.

        prefix is the split, "val" or "val/" alike.
        """
        split = prefix.rstrip("/")
        n = self.count
        if n == 0:
            raise ValueError("no ranks accumulated; the evaluation split is empty")
        values = (self._sums / n).tolist()
        out = {metric_key(split, MRR): values[1], metric_key(split, MEAN_RANK): values[2]}
        num_k = len(self.ks)
        for i, k in enumerate(self.ks):
            out[metric_key(split, HR, k)] = values[3 + i]
            out[metric_key(split, NDCG, k)] = values[3 + num_k + i]
        return out
