"""Schema of the disentangled multi-interest recommender (``model.name: multi_interest``, seed 003).

SASRec blocks encode the history; K attention queries read K interest vectors from it; a VAE
models the interests; orthogonality and diversity losses keep them apart; a causal branch
removes popularity's effect; a complex-valued encoder adds interference-style scores. Every
module has a switch; the loss names (``rec``, ``kl``, ``recon``, ``orthogonality``,
``diversity``, ``causal``) are the ones ``train.phases[*].loss_weights`` weigh, and the module
names (``encoder``, ``interests``, ``vae``, ``causal``, ``complex``) start the parameter names
that ``train.optim.groups`` and a phase's ``freeze`` match.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rayrec.config.base import EncoderConfig, Strict

#: every loss the model can return (a switched-off module's loss is absent)
MULTI_INTEREST_LOSSES = ("rec", "kl", "recon", "orthogonality", "diversity", "causal")


class VAEConfig(Strict):
    """A VAE over each interest vector: mean/log-variance, a reparameterised sample, a reconstruction."""

    enabled: bool = Field(True, description="model each interest with the VAE (adds the kl and recon losses)")
    latent: int = Field(32, ge=2, description="latent width per interest")
    shape_interests: bool = Field(
        True, description="the recon and kl gradients reach the interests (they are pulled towards what the "
        "latent code expresses); false: the VAE models detached interests and never changes the ranking")


class CausalConfig(Strict):
    """Popularity deconfounding (the ``causal`` loss)."""

    enabled: bool = Field(True, description="the causal branch and its causal loss")
    method: Literal["pop_head", "ips"] = Field(
        "pop_head", description="pop_head: a learned per-item popularity logit is added to the training logits (the "
        "confounded path) and trained alone on the causal loss; at ranking it is removed (kept with "
        "inference_weight), so the user-item part ranks without the popularity bias. ips: the causal loss is the "
        "recommendation loss weighted by inverse propensity (see ips_power, ips_clip) over the targets counted in "
        "training so far (a buffer, so checkpoints carry it); it has no parameters: do not freeze causal with it")
    inference_weight: float = Field(0.0, ge=0.0, le=1.0, description="pop_head: share of the popularity logit kept at ranking")
    ips_power: float = Field(0.5, ge=0.0, le=1.0, description="ips: a target's weight is (count(target) + 1) ** "
                             "-ips_power, normalised to mean 1 over the batch")
    ips_clip: float = Field(10.0, gt=1.0, description="ips: largest weight after normalising")


class ComplexConfig(Strict):
    """Quantum-inspired encoder: items as amplitude x phase, the history as their decaying superposition,
    scores from the interference term Re<psi_user, phi_item> of unit-normalised states."""

    enabled: bool = Field(True, description="add the complex encoder's interference scores to the ranking")
    dim: int = Field(32, ge=2, description="complex dimensions (amplitude and phase embeddings each)")
    decay: float = Field(0.8, gt=0.0, le=1.0, description="weight of an item s steps back: decay ** s")


class MultiInterestConfig(EncoderConfig):
    """Disentangled multi-interest model (its encoder's fields from ``EncoderConfig``); see the module docstring."""

    name: Literal["multi_interest"] = Field("multi_interest", description="model variant (the tag of the job's "
                                           "`model` section)")
    num_interests: int = Field(4, ge=1, description="K interest vectors per user (1 = single-interest)")
    label_power: float = Field(2.0, gt=0.0, description="training: interest weights softmax(p * <interest, target>) "
                               "(MIND's label-aware attention; larger = harder)")
    scoring: Literal["max", "attention"] = Field("max", description="ranking: max over interests, or their "
                                                 "softmax(score)-weighted mean per item")
    train_positions: int = Field(50, ge=1, description="last positions per sequence that train the model "
                                 "(max_len or more: every position, as SASRec)")
    orthogonality: bool = Field(True, description="the orthogonality loss between interests (K > 1)")
    diversity: bool = Field(True, description="the diversity loss: interests used evenly over a batch (K > 1)")
    vae: VAEConfig = Field(VAEConfig(), description="the VAE over each interest vector")
    causal: CausalConfig = Field(CausalConfig(), description="popularity deconfounding")
    complex: ComplexConfig = Field(ComplexConfig(), description="the quantum-inspired complex-valued encoder")
