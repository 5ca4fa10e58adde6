"""Schema of the UR4Rec-style joint model (``model.name: ur4rec``): SASRec + multimodal retriever.

Sections: ``sasrec`` (the sequential model), ``retriever`` (three experts and a router),
``fusion`` (how the two score sets combine), ``features`` (text/image embeddings),
``prefs`` (LLM or template user preferences), ``stages`` (staged training, each with
its own epochs, learning rates, trainable modules and strategies).

It builds on ``rayrec.config.base`` (``Strict``, ``SASRecConfig``); ``rayrec.config.schema``
adds it to the job's ``model`` union.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from rayrec.config.base import SASRecConfig, Strict

#: The two trainable modules of the joint model, in their default training order.
MODULES = ("sasrec", "retriever")
ModuleName = Literal["sasrec", "retriever"]
ExpertName = Literal["user_pref", "item_text", "item_image"]
StageName = Literal["pretrain_sasrec", "pretrain_retriever", "joint_finetune", "end_to_end"]
#: Main loss keys a weighting strategy can weigh (``fused`` exists in end_to_end only).
LossKey = Literal["sasrec", "retriever", "fused"]

#: Which modules each stage trains unless ``trainable`` says otherwise.
STAGE_TRAINABLE: dict[str, dict[str, bool]] = {
    "pretrain_sasrec": {"sasrec": True, "retriever": False},
    "pretrain_retriever": {"sasrec": False, "retriever": True},
    "joint_finetune": {"sasrec": True, "retriever": True},
    "end_to_end": {"sasrec": True, "retriever": True},
}


class RetrieverConfig(Strict):
    """Multimodal mixture-of-experts retriever: one cross-attention expert per modality."""

    hidden: int = Field(64, ge=8, description="width of the experts, router and refinement")
    num_heads: int = Field(2, ge=1, description="attention heads per expert")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout probability inside the experts and router, in [0, 1)")
    pref_tokens: int = Field(4, ge=1, description="tokens the user-preference vector is expanded into")
    experts: list[ExpertName] = Field(
        default_factory=lambda: ["user_pref", "item_text", "item_image"], description="enabled experts"
    )
    num_negatives: int = Field(31, ge=1, description="uniform negatives per training position (sampled softmax)")
    train_positions: int = Field(8, ge=1, description="last positions per sequence that train the retriever")
    item_bias: bool = Field(True, description="a learned per-item score bias (popularity), the one non-content input")
    content_prior: float = Field(
        0.0, ge=0.0, description="initial scale of a content-similarity prior added to the retriever's score: the "
        "recency-weighted cosine between the candidate's text embedding and the history items' (the frozen features; "
        "the scale is learned). On sparse catalogues it carries what the experts learn too slowly; 0 = off")
    content_decay: float = Field(
        0.5, gt=0.0, le=1.0, description="weight of a history item in the content prior per step back (1 = all alike)")

    @model_validator(mode="after")
    def _check(self) -> RetrieverConfig:
        if self.hidden % self.num_heads:
            raise ValueError(f"retriever.hidden ({self.hidden}) must be divisible by num_heads ({self.num_heads})")
        if not self.experts or len(set(self.experts)) != len(self.experts):
            raise ValueError(f"retriever.experts must list distinct experts, got {self.experts}")
        return self


class FusionConfig(Strict):
    """How SASRec's and the retriever's scores combine at ranking time."""

    method: Literal["weighted", "rank", "cascade"] = Field(
        "weighted", description="weighted: both score sets z-scored over the candidates, then weight x SASRec + "
        "(1 - weight) x retriever (raw logits and cosines never mix unscaled); rank: reciprocal-rank fusion, "
        "weight / (rank_k + r_sas) + (1 - weight) / (rank_k + r_ret); cascade: the retriever re-ranks SASRec's top_n")
    weight: float = Field(0.5, ge=0.0, le=1.0, description="SASRec's share (weighted, rank)")
    top_n: int = Field(200, ge=0, description="SASRec candidates the retriever scores in full ranking; 0 = all items")
    rank_k: float = Field(60.0, gt=0.0, description="reciprocal-rank constant of method=rank")
    calibrate: list[float] = Field(
        default_factory=list,
        description="weights tried on the validation split after every fused epoch; the best replaces weight",
    )

    @field_validator("calibrate")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= w <= 1.0 for w in v):
            raise ValueError(f"fusion.calibrate weights must lie in [0, 1], got {v}")
        return sorted(set(v))


class FeaturesConfig(Strict):
    """Item/user text and image embeddings (``rayrec data features JOB.yaml``)."""

    dir: Path | None = Field(None, description="feature folder; default <data.path>/features")
    text_model: str = Field(
        "all-MiniLM-L6-v2",
        description="all-MiniLM-L6-v2 (offline package), a local sentence-transformers folder, or hash:DIM",
    )
    image_encoder: Literal["descriptor", "clip"] = Field(
        "descriptor", description="descriptor: colour histograms + edges + pixels, no weights; clip: image_model"
    )
    image_model: Path | None = Field(None, description="local sentence-transformers CLIP folder (image_encoder=clip)")
    image_size: int = Field(32, ge=8, le=512, description="images are resized to this square before encoding")
    cache_dir: Path = Field(Path(".cache/rayrec/features"), description="embedding cache (model name + content hash)")
    batch_size: int = Field(64, ge=1, description="texts/images per encoder call (Ray Data map_batches)")
    user_text: Literal["auto", "dataset", "prefs", "none"] = Field(
        "auto", description="auto: generated prefs if present, else users.parquet pref_text"
    )
    item_text: Literal["auto", "dataset", "prefs"] = Field(
        "auto", description="auto: generated item descriptions if present, else items.parquet text"
    )

    @model_validator(mode="after")
    def _clip_needs_path(self) -> FeaturesConfig:
        if self.image_encoder == "clip" and self.image_model is None:
            raise ValueError("image_encoder=clip needs features.image_model=/path/to/local/clip (a sentence-transformers folder)")
        return self


class PrefsConfig(Strict):
    """LLM-written user preferences and item descriptions (``rayrec prefs generate JOB.yaml``).

    The API key is read from the environment variable ``api_key_env`` and never stored,
    logged or cached.
    """

    backend: Literal["template", "openai"] = Field("template", description="template: offline summaries from the "
                                                   "genres and words of the items, no model; openai: an "
                                                   "OpenAI-compatible chat endpoint (base_url)")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible API root (ends in /v1)")
    model: str = Field("qwen2.5-7b-instruct", description="chat model name at base_url")
    api_key_env: str = Field("OPENAI_API_KEY", description="the NAME of the env var holding the key (never the key)")
    out_dir: Path | None = Field(None, description="default <data.path>/prefs")
    max_concurrency: int = Field(4, ge=1, le=256, description="requests in flight")
    max_retries: int = Field(5, ge=0, description="retries on 429/5xx/timeouts (exponential backoff)")
    backoff_s: float = Field(1.0, ge=0.0, description="first backoff; doubles per retry (Retry-After wins)")
    timeout_s: float = Field(60.0, gt=0.0, description="seconds one request may take before it is retried")
    temperature: float = Field(0.3, ge=0.0, le=2.0, description="sampling temperature of the chat model")

    @field_validator("api_key_env")
    @classmethod
    def _a_variable_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("must name the environment variable that holds the key (e.g. OPENAI_API_KEY), not "
                             "hold the key itself: export the key and put the variable's name here")
        return v
    max_tokens: int = Field(160, ge=16, description="most tokens the model may write per answer")
    history_items: int = Field(20, ge=1, description="most recent training items shown per user")
    price_per_1k_prompt: float = Field(0.0, ge=0.0, description="for the cost summary")
    price_per_1k_completion: float = Field(0.0, ge=0.0, description="price per 1000 completion tokens, for the cost "
                                           "summary")


# ----------------------------------------------------------------------------- strategies


class FixedAlternatingConfig(Strict):
    """Train one module at a time, switching every ``every`` steps."""

    name: Literal["fixed_alternating"] = Field("fixed_alternating", description="strategy (the tag of a list item)")
    every: int = Field(50, ge=1, description="optimizer steps per turn of a module")
    order: list[ModuleName] = Field(default_factory=lambda: list(MODULES), description="modules in the order they "
                                    "take turns")


class AdaptiveAlternatingConfig(Strict):
    """Train one module at a time; switch when its smoothed loss plateaus.

    Plateau: after ``min_steps`` of the current turn, the mean loss of the last ``window``
    steps improved on the ``window`` before by less than ``threshold`` (relative). A turn
    never exceeds ``max_steps``, so no module starves.
    """

    name: Literal["adaptive_alternating"] = Field("adaptive_alternating", description="strategy (the tag of a "
                                                  "list item)")
    window: int = Field(10, ge=1, description="steps per smoothing window of the plateau test")
    threshold: float = Field(0.01, ge=0.0, description="relative improvement below which the loss has plateaued")
    min_steps: int = Field(20, ge=1, description="steps of a turn before its plateau is tested")
    max_steps: int = Field(200, ge=1, description="longest turn in steps (>= min_steps)")
    order: list[ModuleName] = Field(default_factory=lambda: list(MODULES), description="modules in the order they "
                                    "take turns")

    @model_validator(mode="after")
    def _bounds(self) -> AdaptiveAlternatingConfig:
        if self.max_steps < self.min_steps:
            raise ValueError(f"max_steps ({self.max_steps}) must be >= min_steps ({self.min_steps})")
        return self


class UncertaintyConfig(Strict):
    """Kendall et al. 2018: exp(-s_k) L_k + s_k / 2 with learnable log-variances s_k."""

    name: Literal["uncertainty"] = Field("uncertainty", description="strategy (the tag of a list item)")
    init_log_var: float = Field(0.0, description="initial log-variance s_k of every loss (0: weight 1)")
    lr: float | None = Field(None, gt=0.0, description="log-variance learning rate; default train.optim.lr")


class DWAConfig(Strict):
    """Dynamic weight averaging (Liu et al. 2019) from epoch-averaged loss ratios."""

    name: Literal["dwa"] = Field("dwa", description="strategy (the tag of a list item)")
    temperature: float = Field(2.0, gt=0.0, description="T of w_k = K softmax_k(r_k / T), r_k the ratio of a loss's "
                               "last two epoch means; larger = more even weights")


class CurriculumPhase(Strict):
    until_epoch: int = Field(ge=1, description="last epoch (within the stage) of this phase")
    weights: dict[LossKey, float] = Field(description="weight per main loss (sasrec, retriever, fused) in this phase")


class CurriculumConfig(Strict):
    """Loss weights per phase of epochs (the last phase holds after its end)."""

    name: Literal["curriculum"] = Field("curriculum", description="strategy (the tag of a list item)")
    phases: list[CurriculumPhase] = Field(min_length=1, description="phases with strictly increasing until_epoch")

    @field_validator("phases")
    @classmethod
    def _increasing(cls, v: list[CurriculumPhase]) -> list[CurriculumPhase]:
        ends = [p.until_epoch for p in v]
        if ends != sorted(set(ends)):
            raise ValueError(f"phases must have strictly increasing until_epoch, got {ends}")
        return v


class MemoryBankConfig(Strict):
    """MoCo-style contrastive loss between SASRec's user state and the retriever's item vector."""

    name: Literal["memory_bank"] = Field("memory_bank", description="strategy (the tag of a list item)")
    weight: float = Field(0.1, ge=0.0, description="weight of the contrastive loss added to the step's loss")
    queue_size: int = Field(4096, ge=1, le=65536, description="past keys kept as negatives (FIFO queue)")
    temperature: float = Field(0.07, gt=0.0, description="softmax temperature of the contrastive (InfoNCE) loss")
    dim: int = Field(64, ge=4, description="projection width of both sides")


class DistillationConfig(Strict):
    """Two-way knowledge distillation between the two modules' candidate score distributions."""

    name: Literal["distillation"] = Field("distillation", description="strategy (the tag of a list item)")
    weight: float = Field(0.5, ge=0.0, description="weight of the distillation loss added to the step's loss")
    temperature: float = Field(2.0, gt=0.0, description="T that softens both score distributions (the loss is "
                               "scaled by T^2)")
    direction: Literal["both", "to_retriever", "to_sasrec"] = Field(
        "both", description="which module learns from the other: both, to_retriever (SASRec teaches) or to_sasrec")


StrategyConfig = Annotated[
    FixedAlternatingConfig | AdaptiveAlternatingConfig | UncertaintyConfig | DWAConfig | CurriculumConfig
    | MemoryBankConfig | DistillationConfig,
    Field(discriminator="name"),
]
SCHEDULES = ("fixed_alternating", "adaptive_alternating")
WEIGHTINGS = ("uncertainty", "dwa", "curriculum")


class StageConfig(Strict):
    """One training stage: epochs, per-module learning rates, trainable flags, strategies."""

    name: StageName = Field(description="stage: pretrain_sasrec, pretrain_retriever, joint_finetune or end_to_end "
                            "(sets the default trainable modules)")
    epochs: int = Field(ge=1, description="epochs of this stage")
    lr: dict[ModuleName, float] = Field(default_factory=dict, description="per module; default train.optim.lr")
    trainable: dict[ModuleName, bool] = Field(default_factory=dict, description="overrides the stage's defaults")
    strategies: list[StrategyConfig] = Field(default_factory=list, description="training strategies, each picked "
                                             "by name: at most one schedule (alternation) and one weighting")
    warmup_steps: int | None = Field(
        None, ge=0, description="this stage's own warmup (per module); null = the run's warmup continues where it is")
    patience: int | None = Field(
        None, ge=1, description="this stage ends after this many epochs without a better validation metric "
        "(its scorer's); null = train.early_stopping.patience")

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        names = [s.name for s in self.strategies]
        if self.name == "end_to_end" and any(n in SCHEDULES for n in names):
            raise ValueError("stage end_to_end: alternation trains one module a step, but end_to_end's fused loss "
                             "needs both modules every step (it would be dropped on every step); alternate in "
                             "joint_finetune, train end_to_end without a schedule")
        for role, members in (("schedule", SCHEDULES), ("weighting", WEIGHTINGS)):
            chosen = [n for n in names if n in members]
            if len(chosen) > 1:
                raise ValueError(f"stage {self.name}: at most one {role} strategy, got {chosen}")
        if len(set(names)) != len(names):
            raise ValueError(f"stage {self.name}: a strategy is listed twice: {names}")
        flags = self.trainable_flags
        if not any(flags.values()):
            raise ValueError(f"stage {self.name}: trains no module; set trainable.sasrec or trainable.retriever true")
        if any(n in SCHEDULES for n in names) and not all(flags.values()):
            raise ValueError(f"stage {self.name}: alternation needs both modules trainable (trainable: {flags})")
        if any(v <= 0 for v in self.lr.values()):
            raise ValueError(f"stage {self.name}: learning rates must be > 0, got {self.lr}")
        return self

    @property
    def trainable_flags(self) -> dict[str, bool]:
        """Every module's trainable flag in this stage (defaults by stage name, then overrides)."""
        return {**STAGE_TRAINABLE[self.name], **self.trainable}


def _default_stages() -> list[StageConfig]:
    return [
        StageConfig(name="pretrain_sasrec", epochs=3),
        StageConfig(name="pretrain_retriever", epochs=2),
        StageConfig(name="joint_finetune", epochs=3, strategies=[AdaptiveAlternatingConfig()]),
    ]


class JointConfig(Strict):
    """UR4Rec-style joint model: SASRec plus a multimodal MoE retriever, trained in stages."""

    name: Literal["ur4rec"] = Field("ur4rec", description="model variant (the tag of the job's `model` section)")
    sasrec: SASRecConfig = Field(SASRecConfig(), description="the sequential model")
    retriever: RetrieverConfig = Field(RetrieverConfig(), description="the multimodal mixture-of-experts retriever")
    fusion: FusionConfig = Field(FusionConfig(), description="how the two score sets combine at ranking")
    features: FeaturesConfig = Field(FeaturesConfig(), description="text and image embeddings of items and users")
    prefs: PrefsConfig = Field(PrefsConfig(), description="generated user preferences and item descriptions")
    stages: list[StageConfig] = Field(default_factory=_default_stages, min_length=1, description="training stages, "
                                      "in order; their epochs sum to train.epochs")
    select: Literal["fused", "fused_or_sasrec"] = Field(
        "fused_or_sasrec", description="which epochs the final test may use, chosen on validation: fused = the best "
        "fused epoch; fused_or_sasrec = also the best epoch of the SASRec-only stage (SASRec alone ranks then), so "
        "the model never ends below its own pretrained SASRec on validation")

    @property
    def max_len(self) -> int:
        """History length fed to both modules (the data path reads ``model.max_len``)."""
        return self.sasrec.max_len

    @property
    def loss(self):
        """SASRec's objective (the data path draws negatives for bce/gbce from it)."""
        return self.sasrec.loss

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)
