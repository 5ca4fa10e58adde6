"""Most-popular baseline: every user gets items ranked by their training frequency.

It has no parameters and no loss; `fit` counts once, and the counts live in a buffer so
they are saved with the state dict like any model's weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from rayrec.config.schema import PopularityConfig

_CHUNK = 1 << 20  # items counted per np.bincount call, to bound memory on large logs


class Popularity(nn.Module):
    """Scores item i by count(i) plus a tiebreak < 1 that prefers the lower index."""

    def __init__(self, num_items: int, cfg: PopularityConfig):
        super().__init__()
        self.num_items = num_items
        self.cfg = cfg
        self.register_buffer("counts", torch.zeros(num_items + 1, dtype=torch.long))  # [N+1]

    def fit(self, sequences: Iterable[Iterable[int]]) -> Popularity:
        """Count item occurrences in training sequences (0 = padding, ignored); returns self.

        sequences: lists or arrays of item indices, e.g. the `seq` column of train.parquet.
        """
        counts = np.zeros(self.num_items + 1, dtype=np.int64)
        chunk: list[np.ndarray] = []
        size = 0
        for seq in sequences:
            chunk.append(np.asarray(seq, dtype=np.int64).reshape(-1))
            size += chunk[-1].size
            if size >= _CHUNK:
                counts += self._bincount(np.concatenate(chunk))
                chunk, size = [], 0
        if chunk:
            counts += self._bincount(np.concatenate(chunk))
        counts[0] = 0
        self.counts.copy_(torch.from_numpy(counts))
        return self

    def _bincount(self, items: np.ndarray) -> np.ndarray:
        if items.size and (items.min() < 0 or items.max() > self.num_items):
            raise ValueError(
                f"item indices must lie in 0..{self.num_items}, got {items.min()}..{items.max()}"
            )
        return np.bincount(items, minlength=self.num_items + 1)

    def score(self, history: torch.Tensor) -> torch.Tensor:
        """The same float64 scores for every row  # [B, L] -> [B, N+1], column 0 = -inf.

        float64 keeps count + tiebreak exact for counts far beyond float32's 2**24.
        """
        n = self.num_items
        idx = torch.arange(n + 1, device=self.counts.device, dtype=torch.float64)
        scores = self.counts.double() + (n + 1 - idx) / (n + 2)  # tiebreak in (0, 1)
        scores[0] = float("-inf")
        return scores.expand(history.shape[0], -1).contiguous()  # [B, N+1]


def build_popularity(num_items: int, cfg: PopularityConfig) -> Popularity:
    """Popularity baseline over items 1..num_items; call `.fit(train_sequences)` before use."""
    return Popularity(num_items, cfg)
