"""Multimodal mixture-of-experts retriever (the UR4Rec retriever, made explicit).

Three experts, each a cross-attention in which the *candidate item is the query*:

- ``user_pref``: the candidate's joint content vector (text + image) attends over the user's preference text,
  expanded into ``pref_tokens`` tokens (what the user says they like);
- ``item_text``: the candidate's text vector attends over the description vectors of the
  items in the history, each tagged with its recency (what the user read about);
- ``item_image``: the same over image vectors (what the user looked at).

A router MLP reads the three expert outputs and gives softmax weights per candidate; the
weighted sum is refined (residual feed-forward + LayerNorm) and scored against the
candidate's joint content vector. Features are frozen tables (precomputed sentence
embeddings and image descriptors) behind learned projections; a row whose text or image
is missing uses a learned fallback vector instead.

Shapes: B users, P query positions per user (training: the last P positions of a
sequence; ranking: 1), C candidates per query, L history length, d = ``hidden``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rayrec.config.joint import RetrieverConfig

#: Candidates scored per chunk at ranking time (bounds the attention tensor's memory).
SCORE_CHUNK = 256


@dataclass
class JointFeatures:
    """Frozen feature tables; row 0 of item tables is padding, user rows are indexed by user_idx."""

    item_text: torch.Tensor  # [N+1, Dt] float
    item_text_ok: torch.Tensor  # [N+1] bool, False where the item has no text
    item_image: torch.Tensor  # [N+1, Di] float
    item_image_ok: torch.Tensor  # [N+1] bool
    user_text: torch.Tensor  # [U+1, Dt] float
    user_text_ok: torch.Tensor  # [U+1] bool

    @classmethod
    def random(cls, num_items: int, num_users: int, text_dim: int = 16, image_dim: int = 12, seed: int = 0) -> JointFeatures:
        """Random features for tests that do not care about content."""
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(num_items + 1, text_dim, generator=g), torch.ones(num_items + 1, dtype=torch.bool),
                   torch.randn(num_items + 1, image_dim, generator=g), torch.ones(num_items + 1, dtype=torch.bool),
                   torch.randn(num_users + 1, text_dim, generator=g), torch.ones(num_users + 1, dtype=torch.bool))


class FeatureProjection(nn.Module):
    """A frozen feature table [R, D] -> learned projection to [R, d], learned fallback where missing."""

    def __init__(self, table: torch.Tensor, ok: torch.Tensor, hidden: int) -> None:
        super().__init__()
        self.register_buffer("table", table.float(), persistent=False)  # data, not weights
        self.register_buffer("ok", ok.bool(), persistent=False)
        self.proj = nn.Linear(table.shape[1], hidden)
        self.missing = nn.Parameter(torch.zeros(hidden))
        nn.init.normal_(self.missing, 0.0, 0.02)

    def forward(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Projected rows ``idx`` (any shape) -> [*idx.shape, d]; all rows when idx is None.

        When ``idx`` has more entries than the table has rows, projecting the whole table and
        gathering is cheaper than projecting the gathered rows (the same numbers either way).
        """
        if idx is None or idx.numel() >= self.table.shape[0]:
            full = torch.where(self.ok[:, None], self.proj(self.table), self.missing)  # [R, d]
            return full if idx is None else full[idx]
        return torch.where(self.ok[idx][..., None], self.proj(self.table[idx]), self.missing)


class CrossAttentionExpert(nn.Module):
    """Candidates (queries) attend over a set of tokens (keys/values), multi-head."""

    def __init__(self, hidden: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = num_heads
        self.drop = nn.Dropout(dropout)  # on the output: attention-weight dropout costs a mask per (query, key)
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, hidden)
        self.ln = nn.LayerNorm(hidden)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, allowed: torch.Tensor,
                offsets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Attention output per query group  # -> [B*P, C, d].

        query [B, P, C, d]; tokens [B, K, d], shared by the P query groups of a row; allowed
        [B, P, K] bool (>= 1 True per group); ``offsets`` = (table [R, d], index [B, P, K]) adds
        ``table[index]`` to each group's tokens (recency), done after the K/V projections so
        they run on B*K tokens, not B*P*K: W(x + r) = Wx + W r.
        """
        b, p, c, d = query.shape
        h, dh = self.heads, d // self.heads
        k, v = self.k(tokens)[:, None], self.v(tokens)[:, None]  # [B, 1, K, d]
        if offsets is not None:
            table, index = offsets
            k = k + F.linear(table, self.k.weight)[index]  # [B, P, K, d]
            v = v + F.linear(table, self.v.weight)[index]
        k, v = k.expand(b, p, -1, d), v.expand(b, p, -1, d)
        n = b * p
        q = self.q(query).reshape(n, c, h, dh).transpose(1, 2)  # [N, h, C, dh]
        k = k.reshape(n, -1, h, dh).transpose(1, 2)  # [N, h, K, dh]
        v = v.reshape(n, -1, h, dh).transpose(1, 2)
        allowed = allowed.reshape(n, -1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :])
        return self.ln(self.drop(self.out(y.transpose(1, 2).reshape(n, c, d))))  # [N, C, d]


class Retriever(nn.Module):
    """Scores candidates for a user from preference text, history texts and history images."""

    def __init__(self, num_items: int, cfg: RetrieverConfig, features: JointFeatures, max_len: int) -> None:
        super().__init__()
        d = cfg.hidden
        self.cfg, self.num_items, self.max_len = cfg, num_items, max_len
        self.experts_used = list(cfg.experts)
        self.ablate: set[str] = set()  # experts whose output is zeroed (ablation studies)
        self.text = FeatureProjection(features.item_text, features.item_text_ok, d)
        self.image = FeatureProjection(features.item_image, features.item_image_ok, d)
        self.user = FeatureProjection(features.user_text, features.user_text_ok, d)
        self.pref_expand = nn.Linear(d, cfg.pref_tokens * d)
        self.recency = nn.Embedding(max_len, d)
        self.experts = nn.ModuleDict({e: CrossAttentionExpert(d, cfg.num_heads, cfg.dropout) for e in cfg.experts})
        self.router = nn.Sequential(nn.Linear(len(cfg.experts) * d, d), nn.GELU(), nn.Linear(d, len(cfg.experts)))
        self.refine = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(2 * d, d))
        self.ln_refine = nn.LayerNorm(d)
        self.ln_item = nn.LayerNorm(d)
        self.item_head = nn.Linear(d, d)
        # popularity: content says which items fit, not how often they are chosen
        self.item_bias = nn.Embedding(num_items + 1, 1) if cfg.item_bias else None
        if self.item_bias is not None:
            nn.init.zeros_(self.item_bias.weight)
        self.last_router_weights: torch.Tensor | None = None  # [.., E] of the latest call, for stats
        # content prior: unit text vectors (zero where an item has no text) and a learned scale
        self.content_scale = nn.Parameter(torch.tensor(float(cfg.content_prior))) if cfg.content_prior > 0 else None
        unit = F.normalize(features.item_text.float(), dim=-1) * features.item_text_ok[:, None].float()
        self.register_buffer("text_unit", unit if self.content_scale is not None else unit[:0], persistent=False)

    @property
    def hidden(self) -> int:
        return self.cfg.hidden

    def item_vectors(self, items: torch.Tensor, text: torch.Tensor | None = None,
                     image: torch.Tensor | None = None) -> torch.Tensor:
        """Joint content vector of items (any shape) -> [*shape, d]: what candidates are scored against.

        ``text``/``image`` are the items' projected features when the caller has them already.
        """
        text = self.text(items) if text is None else text
        return self.ln_item(text + (self.image(items) if image is None else image))

    def forward(self, history: torch.Tensor, user_idx: torch.Tensor, candidates: torch.Tensor,
                query_pos: torch.Tensor, *, content: bool = True) -> torch.Tensor:
        """Scores  # history [B, L], user_idx [B], candidates [B, P, C], query_pos [B, P] -> [B, P, C].

        ``query_pos[b, p]`` is the last history column visible to query p (causal training);
        columns after it and padding are masked. ``content=False`` leaves out the content prior
        (``score`` adds it once for all candidates).
        """
        b, p, c = candidates.shape
        allowed = _visible(history, query_pos)  # [B, P, L]
        rec = (query_pos[:, :, None] - torch.arange(history.shape[1], device=history.device)).clamp(0, self.max_len - 1)
        cand = {"text": self.text(candidates), "image": self.image(candidates)}  # each [B, P, C, d], computed once
        cand["joint"] = self.item_vectors(candidates, cand["text"], cand["image"])
        outs = [self._expert(name, history, user_idx, cand, allowed, rec) for name in self.experts_used]
        fused = self._route(outs)  # [B*P, C, d]
        refined = self.ln_refine(fused + self.refine(fused))
        target = self.item_head(cand["joint"]).view(b * p, c, -1)
        scores = ((refined * target).sum(-1) / math.sqrt(self.hidden)).view(b, p, c)
        if content and self.has_content_prior:
            scores = scores + self.content_scale * self.content_similarity(history, candidates, allowed, rec)
        return scores + self.item_bias(candidates)[..., 0] if self.item_bias is not None else scores

    @property
    def has_content_prior(self) -> bool:
        return self.content_scale is not None and "content" not in self.ablate

    def content_similarity(self, history: torch.Tensor, candidates: torch.Tensor, allowed: torch.Tensor,
                           rec: torch.Tensor) -> torch.Tensor:
        """Cosine of each candidate's text with the visible history's, weighted ``content_decay ** age``
        # history [B, L], candidates [B, P, C], allowed/rec [B, P, L] -> [B, P, C].

        Few candidates (training: target + negatives) are gathered; many (ranking) take one product
        with the whole table, which never materialises a [B, P, C, Dt] tensor."""
        w = self.cfg.content_decay ** rec.float() * allowed  # [B, P, L]
        query = torch.einsum("bpl,bld->bpd", w, self.text_unit[history])  # [B, P, Dt]
        if candidates.shape[-1] * 8 >= self.text_unit.shape[0]:
            return (query @ self.text_unit.T).gather(-1, candidates)  # [B, P, N+1] -> [B, P, C]
        return torch.einsum("bpcd,bpd->bpc", self.text_unit[candidates], query)

    def _expert(self, name: str, history, user_idx, cand: dict[str, torch.Tensor], allowed, rec) -> torch.Tensor:
        """One expert's output for every (query, candidate)  # -> [B*P, C, d] (zeros if ablated).

        cand: the candidates' projected "text", "image" and "joint" [B, P, C, d]; allowed [B, P, L]; rec
        [B, P, L] recency of each history column relative to the query position.
        """
        b, p = allowed.shape[:2]
        if name == "user_pref":
            query = cand["joint"]  # the whole item asks: a preference can name a genre and a look
            tokens = self.pref_expand(self.user(user_idx)).view(b, -1, self.hidden)  # [B, T, d]
            mask = torch.ones(b, p, tokens.shape[1], dtype=torch.bool, device=tokens.device)
            out = self.experts[name](query, tokens, mask)
        else:
            kind = "text" if name == "item_text" else "image"
            tokens = getattr(self, kind)(history)  # [B, L, d]
            out = self.experts[name](cand[kind], tokens, allowed, offsets=(self.recency.weight, rec))
        return torch.zeros_like(out) if name in self.ablate else out

    def _route(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """Router softmax over experts per candidate, then the weighted sum  # -> [B*P, C, d]."""
        stacked = torch.stack(outs, dim=-2)  # [B*P, C, E, d]
        weights = F.softmax(self.router(stacked.flatten(-2)), dim=-1)  # [B*P, C, E]
        self.last_router_weights = weights.detach()
        return (weights[..., None] * stacked).sum(-2)

    def score(self, history: torch.Tensor, user_idx: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Ranking-time scores  # history [B, L], user_idx [B], candidates [B, C] -> [B, C], in chunks."""
        history = history[:, -self.max_len :]
        pos = torch.full((history.shape[0], 1), history.shape[1] - 1, device=history.device, dtype=torch.long)
        chunks = [self(history, user_idx, candidates[:, None, i : i + SCORE_CHUNK], pos, content=False)[:, 0]
                  for i in range(0, candidates.shape[1], SCORE_CHUNK)]
        scores = torch.cat(chunks, dim=1)
        if self.has_content_prior:  # once for all candidates, not per chunk
            scores = scores + self.content_scale * self.content_at_last(history, candidates)
        return scores

    def content_at_last(self, history: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """The content similarity after the whole history  # history [B, L], candidates [B, C] -> [B, C]
        (all items [B, N+1] when ``candidates`` is None)."""
        history = history[:, -self.max_len :]
        pos = torch.full((history.shape[0], 1), history.shape[1] - 1, device=history.device, dtype=torch.long)
        rec = (pos[:, :, None] - torch.arange(history.shape[1], device=history.device)).clamp(0, self.max_len - 1)
        every = torch.arange(self.num_items + 1, device=history.device).expand(len(history), -1)
        cand = every if candidates is None else candidates
        return self.content_similarity(history, cand[:, None], _visible(history, pos), rec)[:, 0]


def _visible(history: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """history [B, L], query_pos [B, P] -> [B, P, L] bool: column <= query_pos and not padding.

    The query's own column is always visible, so no row is empty (no NaN from softmax).
    """
    cols = torch.arange(history.shape[1], device=history.device)
    causal = cols[None, None, :] <= query_pos[:, :, None]
    own = cols[None, None, :] == query_pos[:, :, None]
    return (causal & (history != 0)[:, None, :]) | own


def build_retriever(num_items: int, cfg: RetrieverConfig, features: JointFeatures, max_len: int) -> Retriever:
    return Retriever(num_items, cfg, features, max_len)
