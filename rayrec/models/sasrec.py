"""SASRec (Kang & McAuley 2018): causal self-attention over a user's item sequence.

Differences from the paper, all common in current implementations:
- pre-LN blocks with a final LayerNorm (stabler training than post-LN);
- GELU feed-forward of width 4 x hidden (as RecBole's default 64 -> 256);
- positions are counted from the right, so the most recent item always gets the
  last positional embedding and left padding never shifts a sequence's positions;
- three objectives (`LossConfig`): full softmax CE, sampled BCE, and gBCE (Petrov &
  Macdonald 2023, "gSASRec"), which corrects BCE's overconfidence from negative sampling.

Sequences are left-padded with item 0; the most recent item is in the last column.
Output scores are tied to the item embedding: score(i) = h . E[i].

Weights: every Linear and Embedding weight ~ Normal(0, 0.02), biases 0, LayerNorm
(1, 0), padding row 0 (the BERT/GPT-2 scheme, which keeps tied logits small at start).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rayrec.config.schema import SASRecConfig


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention that skips padded keys.

    Every position may also attend to itself, so a fully padded prefix (left padding)
    has one valid key and yields a finite output instead of NaN; those outputs are
    zeroed by the caller anyway.
    """

    def __init__(self, hidden: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # x: [B, L, H]; allowed: [B, 1, L, L] bool, True where query may attend to key
        b, n, h = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, h // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # each [B, heads, L, H/heads]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(b, n, h))  # [B, L, H]


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + ffn(LN(x))."""

    def __init__(self, hidden: int, num_heads: int, dropout: float):
        super().__init__()
        self.ln_attn = nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, num_heads, dropout)
        self.ln_ffn = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, 4 * hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(4 * hidden, hidden),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), allowed))
        return x + self.drop(self.ffn(self.ln_ffn(x)))  # [B, L, H]


class SASRec(nn.Module):
    """Item embedding + right-aligned positions -> causal blocks -> LayerNorm; tied scores."""

    def __init__(self, num_items: int, cfg: SASRecConfig):
        super().__init__()
        if num_items < 2:
            raise ValueError(f"SASRec needs at least 2 items, got num_items={num_items}")
        self.num_items = num_items
        self.cfg = cfg
        self.item_emb = nn.Embedding(num_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.hidden, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_blocks)
        )
        self.ln_final = nn.LayerNorm(cfg.hidden)
        self.apply(_init_weights)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden state per position  # [B, L] -> [B, L, H]; L <= max_len, left-padded."""
        seq_len = input_ids.shape[1]
        if seq_len > self.cfg.max_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_len={self.cfg.max_len}")
        keep = (input_ids != 0).unsqueeze(-1)  # [B, L, 1]
        positions = torch.arange(self.cfg.max_len - seq_len, self.cfg.max_len, device=input_ids.device)
        x = self.item_emb(input_ids) * math.sqrt(self.cfg.hidden) + self.pos_emb(positions)
        x = self.emb_drop(x) * keep  # [B, L, H]
        allowed = _attention_mask(input_ids)  # [B, 1, L, L]
        for block in self.blocks:
            x = block(x, allowed) * keep  # padded positions stay exactly 0
        return self.ln_final(x)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training loss (cfg.loss.name) averaged over positions whose target is not 0.

        batch: input_ids [B, L], targets [B, L] (next item, 0 = ignore),
        optional negatives [B, L, n] for bce/gbce (drawn uniformly when absent).
        """
        return self.loss_from_hidden(self(batch["input_ids"]), batch)

    def loss_from_hidden(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``loss`` given ``hidden = self(batch["input_ids"])`` [B, L, H] (the joint model reuses it)."""
        targets = batch["targets"]
        keep = targets != 0  # [B, L]
        if not bool(keep.any()):
            return hidden.sum() * 0.0  # no targets: a zero that still reaches every weight (DDP)
        h, pos = hidden[keep], targets[keep]  # [M, H], [M]
        emb = self.item_emb.weight  # [N+1, H]
        loss_cfg = self.cfg.loss
        if loss_cfg.name == "ce":
            logits = h @ emb[1:].T  # [M, N], the padding logit is left out
            return F.cross_entropy(logits.float(), pos - 1)
        negatives = batch.get("negatives")
        if negatives is None:
            negatives = uniform_negatives(pos, loss_cfg.num_negatives, self.num_items)
        else:
            negatives = negatives[keep]  # [M, n]
        pos_logits = (h * emb[pos]).sum(-1)  # [M]
        neg_logits = torch.einsum("mh,mnh->mn", h, emb[negatives])  # [M, n]
        beta = 1.0
        if loss_cfg.name == "gbce":
            beta = gbce_beta(negatives.shape[1], self.num_items, loss_cfg.gbce_t)
        return binary_loss(pos_logits, neg_logits, beta)

    def score(self, history: torch.Tensor) -> torch.Tensor:
        """Scores of all items after each history  # [B, L] -> [B, N+1], column 0 = -inf.

        Histories longer than max_len are cut to their most recent max_len items.
        Call under torch.no_grad()/inference_mode() with the model in eval mode.
        """
        h = self(history[:, -self.cfg.max_len :])[:, -1]  # [B, H]
        scores = h @ self.item_emb.weight.T  # [B, N+1]
        scores[:, 0] = float("-inf")
        return scores


def build_sasrec(num_items: int, cfg: SASRecConfig) -> SASRec:
    """SASRec over items 1..num_items as configured."""
    return SASRec(num_items, cfg)


def uniform_negatives(positives: torch.Tensor, n: int, num_items: int) -> torch.Tensor:
    """n uniform items from 1..num_items other than each positive  # [M] -> [M, n].

    Draws from 1..N-1 and shifts draws >= the positive up by one: exact, no rejection loop.
    """
    draws = torch.randint(1, num_items, (positives.shape[0], n), device=positives.device)
    return draws + (draws >= positives[:, None]).long()


def gbce_beta(num_negatives: int, num_items: int, t: float) -> float:
    """gSASRec's beta = alpha * (t * (1 - 1/alpha) + 1/alpha), alpha = n / (N - 1).

    Written as the equal 1 - t * (1 - alpha) so that t = 0 gives exactly 1 (plain BCE).
    """
    alpha = num_negatives / (num_items - 1)
    return 1.0 - t * (1.0 - alpha)


def binary_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """(g)BCE: -beta*log sigmoid(s+) - sum log(1 - sigmoid(s-)), over 1+n terms, mean.

    pos_logits # [M]; neg_logits # [M, n]. softplus(-s) = -log sigmoid(s) is stable for
    any s; the 1/(1+n) scaling matches the gSASRec reference (mean over all logits).
    beta = 1 is plain BCE.
    """
    pos_term = beta * F.softplus(-pos_logits.float())  # [M]
    neg_term = F.softplus(neg_logits.float()).sum(-1)  # [M]
    return ((pos_term + neg_term) / (1 + neg_logits.shape[1])).mean()


def _attention_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask that also hides padded keys; the diagonal stays open (no empty rows).

    input_ids # [B, L] -> [B, 1, L, L] bool, True = query may attend to key.
    """
    seq_len = input_ids.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=input_ids.device).tril()  # [L, L]
    eye = torch.eye(seq_len, dtype=torch.bool, device=input_ids.device)  # [L, L]
    key_valid = (input_ids != 0)[:, None, None, :]  # [B, 1, 1, L]
    return (causal & key_valid) | eye


def _init_weights(module: nn.Module) -> None:
    """Normal(0, 0.02) weights, zero biases, unit LayerNorm, zero padding row."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
