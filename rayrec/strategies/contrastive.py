"""MoCo-style memory-bank contrastive loss between the two modules.

The query is SASRec's user state at a training position (``out.user_state``, [M, H]), the
positive key the retriever's multimodal vector of the item that came next
(``out.item_vec``, [M, D]); negatives are keys of earlier batches kept in a FIFO queue
(He et al. 2020), so the loss sees thousands of negatives at the cost of one batch.

The positive is counted once: queue entries holding the same item as a row's positive
(the same item seen in an earlier batch) are masked out of that row's negatives, so the
positive never also appears in the denominator as a "negative".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rayrec.config.joint import MemoryBankConfig


class MemoryBank(nn.Module):
    """Projections of both sides, and a queue of past keys with their item ids (0 = empty)."""

    needs = frozenset({"reps"})

    def __init__(self, cfg: MemoryBankConfig, user_dim: int, item_dim: int) -> None:
        super().__init__()
        self.weight, self.temperature = cfg.weight, cfg.temperature
        self.proj_q = nn.Linear(user_dim, cfg.dim)
        self.proj_k = nn.Linear(item_dim, cfg.dim)
        self.register_buffer("queue", torch.zeros(cfg.queue_size, cfg.dim))  # [Q, dim], unit rows
        self.register_buffer("queue_ids", torch.zeros(cfg.queue_size, dtype=torch.long))  # [Q]
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def forward(self, out) -> torch.Tensor:
        """Weighted InfoNCE over [positive, queue] per row; then the batch's keys are enqueued."""
        q = F.normalize(self.proj_q(out.user_state), dim=-1)  # [M, dim]
        k = F.normalize(self.proj_k(out.item_vec), dim=-1)  # [M, dim]
        # clones: enqueue() overwrites the buffers in place, autograd still needs the old queue
        loss = info_nce(q, k, self.queue.clone(), self.queue_ids.clone(), out.target_ids, self.temperature)
        self.enqueue(k.detach(), out.target_ids)
        return self.weight * loss

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Write ``keys`` [M, dim] and ``ids`` [M] at the ring pointer (the newest Q if M > Q).

        Rows with NaN/Inf (a step the health check will skip) are left out: a poisoned key
        would stay in the queue and make every later loss NaN.
        """
        size = self.queue.shape[0]
        finite = torch.isfinite(keys).all(dim=1)
        keys, ids = keys[finite][-size:], ids[finite][-size:]
        slots = (self.ptr + torch.arange(len(ids), device=ids.device)) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ids[slots] = ids
        self.ptr.copy_((self.ptr + len(ids)) % size)

    def stats(self) -> dict[str, float]:
        return {"strategy/queue_fill": float((self.queue_ids > 0).float().mean())}


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, queue_ids: torch.Tensor,
             pos_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """-log( e^{q.k/t} / (e^{q.k/t} + sum_{j valid} e^{q.queue_j/t}) ), mean over rows.

    q, k  # [M, d] unit rows; queue # [Q, d]; queue_ids # [Q] (0 = empty); pos_ids # [M].
    A queue entry is valid for row m when it is filled and holds another item than pos_ids[m].
    """
    pos = (q * k).sum(-1, keepdim=True) / temperature  # [M, 1]
    neg = q @ queue.T / temperature  # [M, Q]
    invalid = (queue_ids[None, :] == 0) | (queue_ids[None, :] == pos_ids[:, None])  # [M, Q]
    neg = neg.masked_fill(invalid, float("-inf"))
    logits = torch.cat([pos, neg], dim=1).float()  # [M, 1 + Q]
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))

