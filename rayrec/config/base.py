"""The base of every config section, and the SASRec section that the joint model nests.

Kept apart from ``rayrec.config.schema`` so that ``rayrec.config.joint`` (a ``model`` variant of
the job schema) can build on them while the schema imports the joint variant: no import cycle.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LossConfig(Strict):
    """Training objective of a sequential model.

    ce: full softmax cross-entropy over all items (default, strongest).
    bce: sampled binary cross-entropy with ``num_negatives`` uniform negatives.
    gbce: generalised BCE (Petrov & Macdonald 2023) with calibration ``gbce_t``.
    """

    name: Literal["ce", "bce", "gbce"] = "ce"
    num_negatives: int = Field(1, ge=1, description="negatives per positive for bce/gbce")
    gbce_t: float = Field(0.75, ge=0.0, le=1.0, description="gBCE calibration t in [0, 1]")


class EncoderConfig(Strict):
    """SASRec-style self-attention blocks over a history: what every model built on SASRec's encoder sets."""

    hidden: int = Field(64, ge=4)
    num_blocks: int = Field(2, ge=1)
    num_heads: int = Field(1, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    max_len: int = Field(50, ge=2, description="history length fed to the model")

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

    name: Literal["sasrec"] = "sasrec"
    loss: LossConfig = LossConfig()
