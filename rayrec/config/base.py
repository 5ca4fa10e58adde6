"""The base of every config section, and the SASRec section that the joint model nests.

Kept apart from ``rayrec.config.schema`` so that ``rayrec.config.joint`` (a ``model`` variant of
the job schema) can build on them while the schema imports the joint variant: no import cycle.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_ks(ks: list[int]) -> list[int]:
    """Cut-offs K of the ranking metrics (hr@K, ndcg@K): a non-empty list of positive integers, returned
    sorted without repeats."""
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
    return sorted(set(ks))


#: The type of every ``eval.ks`` field: validated (and sorted) by ``check_ks``.
Ks = Annotated[list[int], AfterValidator(check_ks)]


class BatchArithmetic(Strict):
    """Derived batch sizes of a job with ``train.batch_size``, ``train.grad_accum`` and
    ``scaling.num_workers`` (computed here, for every kind of job)."""

    @property
    def step_batch_size(self) -> int:
        """Sequences per micro-step over all workers (``train.batch_size`` x ``scaling.num_workers``)."""
        return self.train.batch_size * self.scaling.num_workers

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step over all workers (``step_batch_size`` x ``train.grad_accum``)."""
        return self.step_batch_size * self.train.grad_accum


class LossConfig(Strict):
    """Training objective of a sequential model."""

    name: Literal["ce", "bce", "gbce"] = Field(
        "ce", description="ce: full softmax cross-entropy over all items (default, strongest); bce: sampled binary "
        "cross-entropy with num_negatives uniform negatives; gbce: generalised BCE (Petrov & Macdonald 2023) with "
        "calibration gbce_t")
    num_negatives: int = Field(1, ge=1, description="negatives per positive for bce/gbce")
    gbce_t: float = Field(0.75, ge=0.0, le=1.0, description="gBCE calibration t in [0, 1]")


class EncoderConfig(Strict):
    """SASRec-style self-attention blocks over a history: what every model built on SASRec's encoder sets."""

    hidden: int = Field(64, ge=4, description="width of the item embeddings and of every block (a multiple of num_heads)")
    num_blocks: int = Field(2, ge=1, description="self-attention blocks stacked")
    num_heads: int = Field(1, ge=1, description="attention heads per block")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout probability of embeddings, attention and "
                           "feed-forward layers, in [0, 1)")
    max_len: int = Field(50, ge=2, le=10_000, description="history length fed to the model (at most 10000: "
                         "attention is quadratic in it)")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> EncoderConfig:
        if self.hidden % self.num_heads:
            raise ValueError(
                f"hidden ({self.hidden}) must be divisible by num_heads ({self.num_heads})"
            )
        return self

    def encoder(self) -> SASRecConfig:
        """These fields as a SASRec config (the encoder of a model built on it)."""
        return SASRecConfig(**{k: getattr(self, k) for k in EncoderConfig.model_fields})


class SASRecConfig(EncoderConfig):
    """SASRec (Kang & McAuley 2018) with pre-LN blocks and tied output embedding."""

    name: Literal["sasrec"] = Field("sasrec", description="model variant (the tag of the job's `model` section)")
    loss: LossConfig = Field(LossConfig(), description="training objective")
