"""Recommendation rewards for GRPO: pure functions of one batch of groups, testable alone.

Every reward takes the decoded items of the completions (``None`` for an output that is
not a real item), the per-row target and history (dataset columns, never looked up by
prompt text), the group size G, and a ``RewardContext`` with what some rewards read
(item embeddings, a collaborative scorer). Completions arrive in groups of G consecutive
rows of one prompt, each group in rank order (beam score, or the policy's own sequence
log-probability for samples), as the rollouts write them, with each completion's rank
among the group's distinct items (copies of one sampled item share its rank).

An invalid output (possible only with ``grpo.constrained: false``) gets the reward's
minimum: 0 for ``rule`` and ``collaborative``, the largest penalty for ``ranking``, -1
for ``semantic``.

* ``rule``: 1 for the target, else 0 (MiniOneRec's rule reward).
* ``ranking``: ``rule`` plus, in a group that holds the target, a penalty for each wrong
  item: -(1/log2(p+2)) / sum_j 1/log2(j+2) at rank p (0-based), so wrong items ranked
  high cost most and a group of distinct items has penalties summing to -1 (MiniOneRec's
  ``rule + ndcg_rule``). Copies of one item get the penalty of their shared rank.
  A group without the target gets no penalty (its rule rewards are all 0, no signal).
* ``semantic``: cosine of the predicted and target items' text embeddings (the MiniLM
  vectors the SID index is built from).
* ``collaborative``: the probability a SASRec checkpoint (``rayrec train``, same
  prepared data) gives the predicted item after the user's train history before the
  target (up to the SASRec's ``max_len``, not the prompt's shorter history; softmax over
  items). A row with no user history (``title_to_sid``) gets ``None``: not scored, so it
  adds nothing to the advantage, instead of SASRec's popularity prior.

Several rewards are mixed by the trainer (``grpo.SidGRPOTrainer`` with TRL's
``normalize_then_sum``): each is standardised within its group (``standardise_groups``) before
the weights apply, so a weight means the same thing whatever a reward's scale (a softmax
probability spreads ~1e-3 inside a group, the ranking reward ~0.3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Items = Sequence[int | None]
#: (histories, items) -> probability of each item after its history
Scorer = Callable[[Sequence[Sequence[int]], Sequence[int]], Sequence[float]]


@dataclass
class RewardContext:
    embeddings: np.ndarray | None = None  # [N + 1, D], L2-normalised, row = item_idx (row 0 unused)
    scorer: Scorer | None = None


def _groups(n: int, group_size: int) -> range:
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} completions do not form groups of {group_size}")
    return range(0, n, group_size)


def rule(items: Items, targets: Sequence[int], **_) -> list[float]:
    return [1.0 if item is not None and item == int(t) else 0.0 for item, t in zip(items, targets, strict=True)]


def rank_penalties(group_size: int) -> list[float]:
    """Penalty of a wrong item at rank p = 0..G-1; they sum to -1, the first is the largest."""
    discounts = [1.0 / math.log2(p + 2) for p in range(group_size)]
    total = sum(discounts)
    return [-d / total for d in discounts]


def distinct_ranks(items: Items) -> list[int]:
    """Rank of each completion of one group (in rank order) among the group's distinct items."""
    order: dict = {}
    return [order.setdefault(item, len(order)) if item is not None else i for i, item in enumerate(items)]


def ranking(items: Items, targets: Sequence[int], group_size: int, ranks: Sequence[int] | None = None,
            **_) -> list[float]:
    """``ranks``: each completion's rank within its group (default: its position)."""
    penalty = rank_penalties(group_size)
    hits = rule(items, targets)
    out = []
    for start in _groups(len(items), group_size):
        has_target = any(hits[start : start + group_size])
        for p in range(group_size):
            i = start + p
            rank = p if ranks is None else int(ranks[i])
            if items[i] is None:
                out.append(penalty[0])
            elif hits[i]:
                out.append(1.0)
            else:
                out.append(penalty[rank] if has_target else 0.0)
    return out


def semantic(items: Items, targets: Sequence[int], ctx: RewardContext, **_) -> list[float]:
    if ctx.embeddings is None:
        raise ValueError("the semantic reward needs item embeddings (RewardContext.embeddings)")
    emb = ctx.embeddings
    return [-1.0 if item is None else float(np.dot(emb[item], emb[int(t)]))
            for item, t in zip(items, targets, strict=True)]


def collaborative(items: Items, histories: Sequence[Sequence[int]], ctx: RewardContext,
                  **_) -> list[float | None]:
    """``histories``: each row's user history before the target (empty: no user, not scored)."""
    if ctx.scorer is None:
        raise ValueError("the collaborative reward needs a scorer (grpo.collaborative_checkpoint)")
    valid = [i for i, item in enumerate(items) if item is not None and len(histories[i])]
    out: list[float | None] = [0.0 if len(h) else None for h in histories]
    if valid:
        probs = ctx.scorer([histories[i] for i in valid], [items[i] for i in valid])
        for i, p in zip(valid, probs, strict=True):
            out[i] = float(p)
    return out


REWARDS: dict[str, Callable[..., list[float]]] = {
    "rule": rule, "ranking": ranking, "semantic": semantic, "collaborative": collaborative,
}


def score(name: str, items: Items, targets: Sequence[int], histories: Sequence[Sequence[int]], group_size: int,
          ctx: RewardContext, ranks: Sequence[int] | None = None) -> list[float | None]:
    """One reward over a batch of groups (the same call for every reward)."""
    return REWARDS[name](items=items, targets=targets, histories=histories, group_size=group_size, ctx=ctx,
                         ranks=ranks)


def standardise_groups(values: np.ndarray, group_size: int) -> np.ndarray:
    """(r - group mean) / group std (unbiased) per column of ``values`` [N, F]; NaN (not scored)
    stays NaN and is left out of its group's statistics; a group whose values are all equal
    (to float precision) gets 0: no signal, and no tiny spread blown up by an epsilon."""
    v = np.asarray(values, dtype=np.float64).reshape(-1, group_size, np.shape(values)[-1])
    out = np.full_like(v, np.nan)
    for g in range(v.shape[0]):
        for f in range(v.shape[2]):
            col = v[g, :, f]
            ok = ~np.isnan(col)
            if ok.sum() < 2:
                out[g, ok, f] = 0.0
                continue
            mean, sd = col[ok].mean(), col[ok].std(ddof=1)
            flat = sd <= 1e-6 * max(abs(mean), 1e-12) or sd == 0.0
            out[g, ok, f] = 0.0 if flat else (col[ok] - mean) / sd
    return out.reshape(np.shape(values))


def group_advantages(rewards: Sequence[float], group_size: int, scale: bool = True, eps: float = 1e-4) -> np.ndarray:
    """(r - group mean) / (group std + eps) per completion (std unbiased, as TRL); ``scale=False``: r - mean."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)
    adv = r - r.mean(1, keepdims=True)
    if scale:
        adv = adv / (r.std(1, ddof=1, keepdims=True) + eps)
    return adv.reshape(-1)


def sasrec_scorer(model, max_len: int) -> Scorer:
    """A ``Scorer`` from a SASRec model (eval mode): softmax over all items after each history."""
    import torch

    def scorer(histories, items):
        width = max_len  # left-padded to max_len, as in SASRec's own evaluation
        seq = torch.zeros(len(histories), width, dtype=torch.long)
        for r, h in enumerate(histories):
            h = [int(x) for x in h][-width:]
            if h:
                seq[r, width - len(h):] = torch.tensor(h)
        with torch.inference_mode():
            probs = torch.softmax(model.score(seq), dim=-1)
        return probs[torch.arange(len(items)), torch.tensor([int(i) for i in items])].tolist()

    return scorer
