"""The disentangled multi-interest recommender of seed 003 (``model.name: multi_interest``).

Modules (each switchable; names start the parameter names the progressive toolkit matches):

- ``encoder``: SASRec blocks over the history (its ``item_emb`` is also the output embedding);
- ``interests``: K learned queries attend causally over the encoder's states, giving K
  interest vectors at every trained position;
- ``vae``: per interest a mean and log-variance, a reparameterised sample and its
  reconstruction; losses ``recon`` (MSE to the interest, whose gradient also reaches the
  interest: it is pulled towards what the latent code can express) and ``kl`` (to N(0, I),
  summed over the latent, averaged); ``vae.shape_interests: false`` detaches its input, so it
  models the interests without changing them. Ranking reads the interests themselves (a sampled
  reconstruction would add noise at ranking; in a first version it did, and NDCG fell ~10x);
- orthogonality (mean squared cosine between distinct interests) and diversity (1 - the
  normalised entropy of how often each interest is the one used over a batch), K > 1;
- ``causal``: popularity deconfounding (``pop_head`` or ``ips``, see ``CausalConfig``);
- ``complex``: amplitude and phase embeddings; the history's decaying superposition against
  each item's state, scored by the interference term; all norms are ``sqrt(x + eps)``, so
  zero amplitudes give finite gradients.

Training (MIND's label-aware attention): the target's embedding weighs the K interests,
``softmax(label_power * <interest_k, target>)``; their mix scores every item (full softmax)
for the ``rec`` loss. Ranking: max over interests (or an attention mix per item).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rayrec.config.multi_interest import MULTI_INTEREST_LOSSES, MultiInterestConfig
from rayrec.models.joint import last_positions
from rayrec.models.sasrec import SASRec, _init_weights

EPS = 1e-6
LOGVAR_RANGE = (-10.0, 10.0)


class InterestExtractor(nn.Module):
    """K queries attend over states s <= t (non-padding) at each asked position t; each interest is the
    state at t plus its own projected read-out, so K = 1 with a zero read-out is SASRec's state."""

    def __init__(self, hidden: int, k: int) -> None:
        super().__init__()
        self.key = nn.Linear(hidden, hidden)
        self.queries = nn.Parameter(torch.randn(k, hidden))
        self.out = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, input_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """h [B, L, H], input_ids [B, L], pos [B, P] -> interests [B, P, K, H]."""
        logits = torch.einsum("blh,kh->bkl", self.key(h), self.queries) / math.sqrt(h.shape[-1])  # [B, K, L]
        steps = torch.arange(h.shape[1], device=h.device)
        allowed = (steps[None, None, :] <= pos[:, :, None]) & (input_ids != 0)[:, None, :]  # [B, P, L]
        allowed = allowed | (steps[None, None, :] == pos[:, :, None])  # never an empty row
        scores = logits[:, None].masked_fill(~allowed[:, :, None], float("-inf"))  # [B, P, K, L]
        read = self.out(torch.einsum("bpkl,blh->bpkh", scores.softmax(-1), h))  # [B, P, K, H]
        last = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))  # [B, P, H]
        return last[:, :, None] + read


class InterestVAE(nn.Module):
    def __init__(self, hidden: int, latent: int) -> None:
        super().__init__()
        self.enc = nn.Linear(hidden, 2 * latent)
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., H] -> (reconstruction [..., H], mu, logvar [..., Z]); the mean is decoded in eval mode."""
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.dec(z), mu, logvar


class PopularityHead(nn.Module):
    """pop_head: a per-item popularity logit; ips: running target counts (a buffer)."""

    def __init__(self, num_items: int, method: str) -> None:
        super().__init__()
        self.method = method
        if method == "pop_head":
            self.bias = nn.Parameter(torch.zeros(num_items))
        self.register_buffer("counts", torch.zeros(num_items))

    def observe(self, targets: torch.Tensor) -> None:
        """Count training targets (1-based item ids) for the propensities, over all workers (each adds
        the same all-reduced counts, so DDP's buffer broadcast from rank 0 loses nothing)."""
        import torch.distributed as dist

        with torch.no_grad():
            delta = torch.bincount(targets - 1, minlength=self.counts.numel()).to(self.counts.dtype)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                nccl = dist.get_backend() == "nccl"  # NCCL takes GPU tensors only
                shared = delta.to(torch.device("cuda", torch.cuda.current_device()) if nccl else delta.device)
                dist.all_reduce(shared)
                delta = shared.to(self.counts.device)
            self.counts += delta


class ComplexEncoder(nn.Module):
    """Items as amplitude x e^{i phase}; a history as the decaying sum of its items' states."""

    def __init__(self, num_items: int, dim: int, max_len: int, decay: float) -> None:
        super().__init__()
        self.amplitude = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.phase = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.pos_phase = nn.Parameter(torch.zeros(max_len, dim))
        self.scale = nn.Parameter(torch.tensor(1.0))
        nn.init.normal_(self.amplitude.weight, 0.0, 0.5)
        nn.init.uniform_(self.phase.weight, -math.pi, math.pi)
        with torch.no_grad():
            self.amplitude.weight[0].zero_()
            self.phase.weight[0].zero_()
        steps = torch.arange(max_len, dtype=torch.float32)
        gap = steps[:, None] - steps[None, :]  # t - s
        self.register_buffer("weights", torch.where(gap >= 0, decay ** gap.clamp(min=0), torch.zeros(())))

    def states(self, ids: torch.Tensor, phase_shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(re, im) of items ``ids`` [...] -> [..., D] each."""
        amp = F.softplus(self.amplitude(ids))
        theta = self.phase(ids) if phase_shift is None else self.phase(ids) + phase_shift
        return amp * torch.cos(theta), amp * torch.sin(theta)

    def user(self, input_ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit superposition at positions ``pos`` [B, P] of the left-padded history [B, L] -> (re, im) [B, P, D]."""
        length = input_ids.shape[1]
        shift = self.pos_phase[-length:]  # right-aligned positions, as SASRec's
        re, im = self.states(input_ids, shift)
        keep = (input_ids != 0)[..., None].to(re.dtype)
        w = self.weights[-length:, -length:][pos]  # [B, P, L]
        re, im = torch.einsum("bpl,bld->bpd", w, re * keep), torch.einsum("bpl,bld->bpd", w, im * keep)
        return _unit(re, im)

    def item_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit states of every item [N + 1, D] each."""
        ids = torch.arange(self.amplitude.num_embeddings, device=self.amplitude.weight.device)
        return _unit(*self.states(ids))

    def scores(self, user: tuple[torch.Tensor, torch.Tensor], items: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Interference term Re<psi, phi> x scale: user [..., D] x items [N, D] -> [..., N]."""
        return self.scale * (user[0] @ items[0].T + user[1] @ items[1].T)


def _unit(re: torch.Tensor, im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.sqrt((re * re + im * im).sum(-1, keepdim=True) + EPS)
    return re / norm, im / norm


class MultiInterest(nn.Module):
    """See the module docstring; ``losses(batch)`` for training, ``score(history)`` for ranking."""

    all_loss_names = MULTI_INTEREST_LOSSES

    def __init__(self, num_items: int, cfg: MultiInterestConfig) -> None:
        super().__init__()
        self.num_items, self.cfg = num_items, cfg
        self.encoder = SASRec(num_items, cfg.encoder())
        self.interests = InterestExtractor(cfg.hidden, cfg.num_interests)
        self.interests.key.apply(_init_weights)
        self.interests.out.apply(_init_weights)
        self.vae = InterestVAE(cfg.hidden, cfg.vae.latent) if cfg.vae.enabled else None
        self.causal = PopularityHead(num_items, cfg.causal.method) if cfg.causal.enabled else None
        self.complex = (ComplexEncoder(num_items, cfg.complex.dim, cfg.max_len, cfg.complex.decay)
                        if cfg.complex.enabled else None)
        k = cfg.num_interests
        self.loss_names = tuple(n for n, on in (
            ("rec", True), ("kl", self.vae is not None), ("recon", self.vae is not None),
            ("orthogonality", cfg.orthogonality and k > 1), ("diversity", cfg.diversity and k > 1),
            ("causal", self.causal is not None)) if on)
        #: modules switched off in config, or without parameters (causal ips): patterns naming them
        #: match nothing, by design
        self.disabled_modules = frozenset(n for n, m in (("vae", self.vae), ("causal", self.causal),
                                                         ("complex", self.complex))
                                          if m is None or not any(True for _ in m.parameters()))

    # ------------------------------------------------------------------ shared

    def _interests(self, input_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Interests at ``pos`` [B, P, K, H]."""
        return self.interests(self.encoder(input_ids), input_ids, pos)

    def _item_logits(self, users: torch.Tensor) -> torch.Tensor:
        """users [..., H] -> dot products with items 1..N [..., N]."""
        return users @ self.encoder.item_emb.weight[1:].T

    # ------------------------------------------------------------------ training

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, targets = batch["input_ids"], batch["targets"]
        pos, valid = last_positions(targets, self.cfg.train_positions)  # [B, P]
        tgt = targets.gather(1, pos)[valid]  # [M]
        inter = self._interests(input_ids, pos)[valid]  # [M, K, H]: trained positions only (no padding)
        out: dict[str, torch.Tensor] = {}
        if tgt.numel() == 0:  # no targets: zeros that still reach every weight (DDP)
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return dict.fromkeys(self.loss_names, zero)
        e_t = self.encoder.item_emb(tgt)  # [M, H]
        routing = torch.softmax(self.cfg.label_power * torch.einsum("mkh,mh->mk", inter, e_t), dim=-1)  # [M, K]
        logits = self._item_logits(torch.einsum("mk,mkh->mh", routing, inter))  # [M, N]
        if self.complex is not None:
            user = self.complex.user(input_ids, pos)
            logits = logits + self.complex.scores((user[0][valid], user[1][valid]), _drop_pad(self.complex.item_table()))
        labels = tgt - 1
        if self.causal is not None and self.causal.method == "pop_head":
            bias = self.causal.bias
            out["rec"] = F.cross_entropy((logits + bias).float(), labels)
            out["causal"] = F.cross_entropy(bias.float().expand(len(labels), -1), labels)
        else:
            per_row = F.cross_entropy(logits.float(), labels, reduction="none")
            out["rec"] = per_row.mean()
            if self.causal is not None:  # ips
                if self.training:
                    self.causal.observe(tgt)
                w = (self.causal.counts[labels] + 1.0) ** -self.cfg.causal.ips_power
                w = (w / w.mean()).clamp(max=self.cfg.causal.ips_clip)
                out["causal"] = (w * per_row).mean()
        if self.vae is not None:
            seen = inter if self.cfg.vae.shape_interests else inter.detach()
            recon, mu, logvar = self.vae(seen)
            out["recon"] = F.mse_loss(recon, seen)
            out["kl"] = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean()
        if "orthogonality" in self.loss_names:
            unit = F.normalize(inter, dim=-1, eps=EPS)
            gram = unit @ unit.transpose(1, 2)  # [M, K, K]
            off = ~torch.eye(gram.shape[-1], dtype=torch.bool, device=gram.device)
            out["orthogonality"] = gram[:, off].pow(2).mean()
        if "diversity" in self.loss_names:
            usage = routing.mean(0)  # [K]
            entropy = -(usage * torch.log(usage + EPS)).sum()
            out["diversity"] = 1.0 - entropy / math.log(routing.shape[-1])
        return out

    # ------------------------------------------------------------------ ranking

    def score(self, history: torch.Tensor) -> torch.Tensor:
        """Scores of all items after each history  # [B, L] -> [B, N+1], column 0 = -inf."""
        history = history[:, -self.cfg.max_len :]
        pos = torch.full((history.shape[0], 1), history.shape[1] - 1, device=history.device)
        interests = self._interests(history, pos)[:, 0]  # [B, K, H]
        per = interests @ self.encoder.item_emb.weight.T  # [B, K, N+1]
        if self.cfg.scoring == "max":
            scores = per.max(dim=1).values
        else:
            scores = (per.softmax(dim=1) * per).sum(1)
        if self.complex is not None:
            user = self.complex.user(history, pos)
            scores = scores + self.complex.scores((user[0][:, 0], user[1][:, 0]), self.complex.item_table())
        if self.causal is not None and self.causal.method == "pop_head" and self.cfg.causal.inference_weight:
            scores[:, 1:] = scores[:, 1:] + self.cfg.causal.inference_weight * self.causal.bias
        scores[:, 0] = float("-inf")
        return scores


def _drop_pad(states: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return states[0][1:], states[1][1:]


def build_multi_interest(num_items: int, cfg: MultiInterestConfig) -> MultiInterest:
    return MultiInterest(num_items, cfg)
