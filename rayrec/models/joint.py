"""UR4Rec-style joint model: SASRec and the multimodal retriever, and how their scores fuse.

Training (``outputs``): SASRec's own loss over every position; the retriever's sampled
softmax over [target, uniform negatives] at the last ``train_positions`` positions of each
sequence; in ``end_to_end`` also a loss on the fused scores of those candidates. Auxiliary
strategies read the candidate scores of both modules (distillation) and SASRec's user
state with the retriever's item vector (memory bank).

Ranking (``score``): ``scorer`` picks what ranks -- ``sasrec`` alone, the ``retriever``
alone, or the ``joint`` fusion. Full ranking scores every item with SASRec; the retriever
then scores SASRec's top ``fusion.top_n`` unseen items (all items when top_n is 0), and
the fused scores of those candidates are placed above every other item, which keep
SASRec's order. Sampled evaluation passes the candidates directly.

Fusion normalises the two score sets per row over the candidates before combining them
(the seed added raw SASRec logits to retriever cosines, so one scale swamped the other).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rayrec.config.joint import MODULES, FusionConfig, JointConfig
from rayrec.models.retriever import JointFeatures, Retriever
from rayrec.models.sasrec import SASRec, uniform_negatives

#: Offset that puts non-candidates below every fused candidate score in full ranking.
BELOW = 1.0e4
SCORERS = ("sasrec", "retriever", "joint")


@dataclass
class ScoreParts:
    """What ranking needs before fusion: SASRec's scores of all items, the retriever's candidates
    and their retriever scores (None for scorer=sasrec); ``given``: the caller chose the candidates."""

    sas: torch.Tensor  # [B, N+1]
    cand: torch.Tensor | None  # [B, K]
    ret: torch.Tensor | None  # [B, K]
    given: bool


@dataclass
class JointOutputs:
    """What one training step computed; M = query positions kept, C = 1 + negatives (target first)."""

    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # sasrec, retriever, fused
    sas_cand: torch.Tensor | None = None  # [M, C] SASRec logits of the candidates
    ret_cand: torch.Tensor | None = None  # [M, C] retriever scores of the candidates
    user_state: torch.Tensor | None = None  # [M, H] SASRec hidden state at the query positions
    item_vec: torch.Tensor | None = None  # [M, d] retriever content vector of each target
    target_ids: torch.Tensor | None = None  # [M]


class UR4Rec(nn.Module):
    """SASRec + Retriever with staged training and score fusion."""

    def __init__(self, num_items: int, cfg: JointConfig, features: JointFeatures) -> None:
        super().__init__()
        self.num_items, self.cfg = num_items, cfg
        self.sasrec = SASRec(num_items, cfg.sasrec)
        self.retriever = Retriever(num_items, cfg.retriever, features, max_len=cfg.sasrec.max_len)
        # SASRec's share in fusion: a buffer, so a weight calibrated on validation travels with the weights
        self.register_buffer("fusion_weight", torch.tensor(float(cfg.fusion.weight)))
        # True when the final selection chose a SASRec-only epoch (model.select): the joint scorer then ranks with
        # SASRec alone; a buffer, so the choice travels with the weights (older checkpoints lack it: False)
        self.register_buffer("sasrec_alone", torch.tensor(False))
        self.register_load_state_dict_pre_hook(_default_sasrec_alone)
        self.scorer = "joint"

    @property
    def ranking_scorer(self) -> str:
        """What ranks: ``scorer``, except that a joint model selected at a SASRec-only epoch ranks with SASRec."""
        return "sasrec" if self.scorer == "joint" and bool(self.sasrec_alone) else self.scorer

    def parts(self) -> dict[str, nn.Module]:
        """The trainable modules by name (``MODULES`` order)."""
        return {name: getattr(self, name) for name in MODULES}

    # ------------------------------------------------------------------ training

    def outputs(self, batch: dict[str, torch.Tensor], losses: tuple[str, ...], needs: frozenset[str] = frozenset()) -> JointOutputs:
        """Compute the main ``losses`` asked for and the extras in ``needs`` ("cand_scores", "reps").

        batch: input_ids, targets [B, L] (left-padded, 0 = no target), user_idx [B].
        """
        out = JointOutputs()
        need_ret = bool({"retriever", "fused"} & set(losses)) or bool(needs)
        hidden = None
        if "sasrec" in losses or "fused" in losses or needs:
            hidden = self.sasrec(batch["input_ids"])  # [B, L, H]
        if "sasrec" in losses:
            out.losses["sasrec"] = self.sasrec.loss_from_hidden(hidden, batch)
        if need_ret:
            self._retriever_outputs(batch, hidden, losses, needs, out)
        return out

    def _retriever_outputs(self, batch, hidden, losses, needs, out: JointOutputs) -> None:
        input_ids, targets = batch["input_ids"], batch["targets"]
        pos, valid = last_positions(targets, self.cfg.retriever.train_positions)  # [B, P]
        tgt = targets.gather(1, pos)  # [B, P]
        neg = uniform_negatives(tgt.clamp(min=1).flatten(), self.cfg.retriever.num_negatives, self.num_items)
        cand = torch.cat([tgt[..., None], neg.view(*tgt.shape, -1)], dim=-1)  # [B, P, C]
        ret = self.retriever(input_ids, batch["user_idx"], cand, pos)[valid]  # [M, C]
        out.ret_cand, out.target_ids = ret, tgt[valid]
        zero = torch.zeros(len(ret), dtype=torch.long, device=ret.device)
        if "retriever" in losses:
            out.losses["retriever"] = _ce_or_zero(ret, zero)
        if hidden is not None:
            h = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))[valid]  # [M, H]
            out.sas_cand = torch.einsum("mh,mch->mc", h, self.sasrec.item_emb(cand[valid]))  # [M, C]
            out.user_state = h
        if "fused" in losses:
            fused = fuse(out.sas_cand, ret, self.cfg.fusion, differentiable=True, weight=float(self.fusion_weight))
            out.losses["fused"] = _ce_or_zero(fused, zero)
        if "reps" in needs:
            out.item_vec = self.retriever.item_vectors(out.target_ids)  # [M, d]

    # ------------------------------------------------------------------ ranking

    def score_batch(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor | None = None) -> torch.Tensor:
        """``score`` from an evaluation batch (history [B, L], user_idx [B])."""
        return self.score(batch["history"], batch["user_idx"], candidates)

    def score(self, history: torch.Tensor, user_idx: torch.Tensor | None = None,
              candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Scores by ``self.scorer``  # history [B, L] -> [B, N+1] (column 0 = -inf), or [B, C] for candidates."""
        return self.compose(self.components(history, user_idx, candidates), float(self.fusion_weight))

    def components(self, history: torch.Tensor, user_idx: torch.Tensor | None = None,
                   candidates: torch.Tensor | None = None) -> ScoreParts:
        """The expensive part of ``score``, computed once (so fusion weights compare cheaply)."""
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        history = history[:, -self.cfg.sasrec.max_len :]
        sas = self.sasrec.score(history)  # [B, N+1]
        if self.ranking_scorer == "sasrec":
            return ScoreParts(sas, candidates, None, candidates is not None)
        if user_idx is None:
            raise ValueError("the ur4rec retriever needs user_idx to score (its preference expert reads it)")
        cand = candidates if candidates is not None else self.candidate_stage(sas, history)
        return ScoreParts(sas, cand, self.retriever.score(history, user_idx, cand), candidates is not None)

    def compose(self, parts: ScoreParts, weight: float) -> torch.Tensor:
        """Final scores: [B, C] for given candidates; else [B, N+1] with the retriever's candidates
        above every other item (which keep SASRec's order)."""
        if self.ranking_scorer == "sasrec":
            return parts.sas.gather(1, parts.cand) if parts.given else parts.sas
        sas_c, ret = parts.sas.gather(1, parts.cand).float(), parts.ret.float()
        top = ret if self.scorer == "retriever" else fuse(sas_c, ret, self.cfg.fusion, weight=weight)
        if parts.given:
            return top
        out = zscore(parts.sas[:, 1:]) - BELOW
        out = torch.cat([out.new_full((len(out), 1), float("-inf")), out], dim=1)  # [B, N+1]
        return out.scatter(1, parts.cand, top.to(out.dtype))

    def candidate_stage(self, sas: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """SASRec's top ``fusion.top_n`` items not in the history (all items when top_n is 0 or >= N);
        with the retriever's content prior, also the prior's top ``top_n`` among the rest, so items
        SASRec barely knows (new or rare in training) can reach the fused ranking, and the history's own
        items (a repeat target is ranked, not left below every candidate)  # -> [B, top or 2 top + L]."""
        n, top = self.num_items, self.cfg.fusion.top_n
        if top == 0 or top >= n:
            return torch.arange(1, n + 1, device=sas.device).expand(len(sas), -1)
        seen = history[history > 0] - 1
        rows = torch.arange(len(history), device=sas.device)[:, None].expand_as(history)[history > 0]
        masked = sas[:, 1:].clone()
        masked[rows, seen] = torch.finfo(masked.dtype).min
        cand = masked.topk(top, dim=1).indices  # [B, top], 0-based
        if self.scorer == "sasrec" or not self.retriever.has_content_prior or 2 * top > n:
            return cand + 1
        prior = self.retriever.content_at_last(history)[:, 1:].float()  # [B, N]
        low = torch.finfo(prior.dtype).min
        prior[rows, seen] = low
        prior.scatter_(1, cand, low)  # not twice
        # + the history itself: ranking masks seen items but never the target, so a repeat target must be
        # a candidate to be ranked at all; padding becomes a copy of SASRec's first candidate (same score)
        own = torch.where(history > 0, history, cand[:, :1] + 1)
        return torch.cat([cand + 1, prior.topk(top, dim=1).indices + 1, own], dim=1)  # [B, 2 top + L]


# ----------------------------------------------------------------------------- fusion


def zscore(s: torch.Tensor) -> torch.Tensor:
    """Standardise each row  # [B, C] -> [B, C], mean 0 and std 1 over the candidates."""
    return (s - s.mean(-1, keepdim=True)) / (s.std(-1, keepdim=True, unbiased=False) + 1e-6)


def ranks(s: torch.Tensor) -> torch.Tensor:
    """1-based rank of each candidate within its row (1 = highest score)  # [B, C] -> [B, C] float."""
    order = s.argsort(dim=-1, descending=True)
    return order.argsort(dim=-1).to(s.dtype) + 1


def fuse(sas: torch.Tensor, ret: torch.Tensor, cfg: FusionConfig, *, differentiable: bool = False,
         weight: float | None = None) -> torch.Tensor:
    """Fused scores of the same candidates  # sas, ret [B, C] -> [B, C].

    ``weight`` (default cfg.weight) is SASRec's share w. weighted: w z(sas) + (1 - w) z(ret); rank: w / (k + r_sas) + (1 - w) / (k + r_ret);
    cascade: the retriever orders SASRec's top ``top_n`` candidates, the rest follow in SASRec's
    order. Training (``differentiable``) always uses the weighted form: ranks have no gradient.
    """
    w = cfg.weight if weight is None else weight
    if cfg.method == "weighted" or differentiable:
        return w * zscore(sas) + (1 - w) * zscore(ret)
    if cfg.method == "rank":
        return w / (cfg.rank_k + ranks(sas)) + (1 - w) / (cfg.rank_k + ranks(ret))
    keep = ranks(sas) <= cfg.top_n if cfg.top_n else torch.ones_like(sas, dtype=torch.bool)
    return torch.where(keep, zscore(ret), zscore(sas) - BELOW)


def last_positions(targets: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``p`` columns and which of them hold a target  # targets [B, L] -> pos [B, P], valid [B, P].

    Sequences are left-padded, so a row's targets are its last n columns.
    """
    b, length = targets.shape
    p = min(p, length)
    pos = torch.arange(length - p, length, device=targets.device).expand(b, -1)
    return pos, targets.gather(1, pos) != 0


def _ce_or_zero(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, or a zero still attached to the graph when no row has a target."""
    return F.cross_entropy(logits.float(), labels) if len(logits) else logits.sum() * 0.0


def _default_sasrec_alone(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before ``sasrec_alone`` existed load as fused (their only meaning then)."""
    state_dict.setdefault(prefix + "sasrec_alone", torch.tensor(False))


def build_ur4rec(num_items: int, cfg: JointConfig, features: JointFeatures) -> UR4Rec:
    """The joint model over items 1..num_items with frozen ``features``."""
    return UR4Rec(num_items, cfg, features)
