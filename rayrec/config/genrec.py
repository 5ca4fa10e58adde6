"""Typed job config of the generative track: what `rayrec genrec sids|sft|eval-genrec JOB.yaml` read.

It reuses the platform sections (``data``, ``scaling``, ``tracking``, ``run``) of
``rayrec.config.schema`` and adds ``sids``, ``prompts``, ``model``, ``train`` and ``eval``.
Defaults live here only; derived values (global batch) are computed in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from rayrec.config.base import BatchArithmetic, Ks
from rayrec.config.schema import DataConfig, ExportConfig, RunConfig, ScalingConfig, Strict, TrackingConfig

TaskName = Literal["sid_seq", "title_seq", "sid_to_title", "title_to_sid", "sid_seq_to_title", "title_seq_to_title"]
#: Tasks that ask for the next item after a history (the rest align one item's SID and title).
HistoryTask = Literal["sid_seq", "title_seq", "sid_seq_to_title", "title_seq_to_title"]


class EmbeddingConfig(Strict):
    """Item-text encoder used before quantisation."""

    model: str = Field("minilm", description="'minilm' (bundled offline all-MiniLM-L6-v2) or a local model folder")
    fields: list[Literal["title", "text"]] = Field(default_factory=lambda: ["title", "text"],
                                                   description="item columns joined into the embedded text")
    batch_size: int = Field(64, ge=1, description="item texts per encoder call")


class RQVAEConfig(Strict):
    """RQ-VAE (method rq_vae): encoder MLP widths, latent size, training schedule."""

    hidden: list[int] = Field(default_factory=lambda: [256, 128], description="encoder widths (decoder mirrors)")
    latent_dim: int = Field(32, ge=2, description="width of the latent vector that the codebooks quantise")
    epochs: int = Field(200, ge=1, description="training passes over the item embeddings")
    batch_size: int = Field(256, ge=1, description="items per training step")
    lr: float = Field(1e-3, gt=0.0, description="learning rate (Adam)")
    beta: float = Field(0.25, ge=0.0, description="commitment loss weight")
    kmeans_init: bool = Field(True, description="initialise codebooks by k-means on the initial latents")


class SidConfig(Strict):
    """Where the semantic-ID index lives and how `rayrec genrec sids` builds it."""

    method: Literal["rq_kmeans", "rq_vae", "file", "data"] = Field(
        "rq_kmeans", description="rq_kmeans | rq_vae: build from the item text; file: read an existing MiniOneRec "
        "index/NAME.index.json under dir; data: the sid column of items.parquet")
    dir: Path = Field(Path("data/sids"), description="folder with index/NAME.index.json and info/NAME.txt")
    name: str = Field("items", pattern=r"^[A-Za-z0-9_.\-]+$", description="NAME of NAME.index.json")
    build_if_missing: bool = Field(True, description="`rayrec sft` builds the index first when dir lacks it")
    levels: int = Field(3, ge=1, le=8, description="code levels L before collision resolution")
    codebook_size: int = Field(256, ge=2, description="codes per level K")
    balanced: bool = Field(False, description="balanced k-means (Sinkhorn assignment) for even code usage")
    kmeans_iters: int = Field(50, ge=1, description="k-means iterations per level (rq_kmeans, and rq_vae's init)")
    reassign_last_level: bool = Field(True, description="resolve collisions at the last level before adding one")
    shared: Literal["disambiguate", "share"] = Field(
        "disambiguate", description="a read index (file, data) whose SID names several items: disambiguate = "
        "append one level token to those items only (written to sids.dir/disambiguated/, the file is never "
        "changed); share = keep it, and a decoded SID counts as a hit when it is the target's")
    embedding: EmbeddingConfig = Field(EmbeddingConfig(), description="the item-text encoder (rq_kmeans, rq_vae)")
    rqvae: RQVAEConfig = Field(RQVAEConfig(), description="the RQ-VAE (method rq_vae)")


class PromptConfig(Strict):
    """Prompt tasks and their mixture weights."""

    tasks: dict[TaskName, float] = Field(
        default_factory=lambda: {"sid_seq": 1.0, "title_seq": 0.5, "sid_to_title": 0.5, "title_to_sid": 0.5},
        description="weight per task = expected copies of each of its examples (0 = off): sid_seq: SID history -> "
        "next SID; title_seq: title history -> next SID; sid_to_title and title_to_sid: one item's SID <-> title; "
        "sid_seq_to_title: SID history -> next item's title; title_seq_to_title: title history -> next item's title")
    max_history: int = Field(10, ge=1, description="most recent history items shown in a prompt")
    paraphrase: bool = Field(True, description="draw the instruction among paraphrases (train only)")
    max_examples: int | None = Field(None, ge=1, description="cap on the training mixture (random subset)")

    @field_validator("tasks")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in v.values()) or not any(w > 0 for w in v.values()):
            raise ValueError(f"task weights must be >= 0 with at least one > 0, got {v}")
        return v


class TinyLMConfig(Strict):
    """Size of the random Qwen2-shaped model used when ``model.base`` is ``tiny``."""

    hidden: int = Field(64, ge=8, description="hidden width")
    layers: int = Field(2, ge=1, description="decoder layers")
    heads: int = Field(4, ge=1, description="attention (query) heads")
    kv_heads: int = Field(2, ge=1, description="key/value heads (grouped-query attention; divides heads)")
    tie_embeddings: bool = Field(False, description="share the input embedding and the output head")


class LMConfig(Strict):
    """The causal LM: a local folder or hub id (cluster), or ``tiny`` (built locally)."""

    base: str = Field("tiny", description="'tiny', a local model folder, or a hub id on a cluster with access")
    tiny: TinyLMConfig = Field(TinyLMConfig(), description="size of the tiny model (base: tiny)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    max_length: int = Field(512, ge=16, description="prompt + response + EOS tokens; a longer example loses its "
                            "oldest history items (the instruction, recent history and whole answer stay), "
                            "or is dropped when it has none to lose; both are counted")


class LoraSettings(Strict):
    r: int = Field(16, ge=1, description="LoRA rank of each adapted projection")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (updates are scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout probability on the LoRA path, in [0, 1)")
    target_modules: Literal["all", "qkv"] | list[str] = Field(
        "all", description="'all' = every attention and MLP projection, 'qkv', or explicit module names")


class SFTTrainConfig(Strict):
    epochs: float = Field(3.0, gt=0.0, description="passes over the training prompts (may be fractional)")
    batch_size: int = Field(8, ge=1, description="sequences per worker per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    global_batch_size: int | None = Field(None, ge=1, description="optional check: batch x workers x accum")
    lr: float = Field(3e-4, gt=0.0, description="peak learning rate (AdamW) of the trained parameters")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="share of the optimizer steps spent warming up")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after warmup (Hugging Face's lr_scheduler_type)")
    max_grad_norm: float = Field(1.0, gt=0.0, description="max global gradient norm (clipping)")
    deepspeed: str | None = Field(None, description="zero2 | zero3 (cluster/deepspeed/NAME.json) or a JSON path")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less "
                                         "memory, slower)")
    logging_steps: int = Field(10, ge=1, description="optimizer steps between training-loss logs")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept (the best is always kept)")
    val_rows: int = Field(256, ge=0, description="first valid rows used each epoch: val/loss over them, and "
                          "decoded (constrained) for val/hr@K, val/ndcg@K (eval.num_beams, eval.ks); "
                          "0 = val/loss only, over every valid row")
    lora: LoraSettings = Field(LoraSettings(), description="the LoRA adapter")


class GenEvalConfig(Strict):
    """Constrained beam-search evaluation."""

    split: Literal["valid", "test"] = Field("test", description="rows evaluated")
    task: HistoryTask = Field("sid_seq", description="prompt task decoded: sid_seq/title_seq rank items by SID; "
                              "sid_seq_to_title/title_seq_to_title by exact title (constrained to real titles)")
    num_beams: int = Field(20, ge=1, description="beams = items returned per row")
    ks: Ks = Field(default_factory=lambda: [1, 3, 5, 10, 20], description="cut-offs K of the reported hr@K and "
                   "ndcg@K (at most num_beams)")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")
    max_rows: int | None = Field(None, ge=1, description="evaluate the first N rows only")

    @model_validator(mode="after")
    def _ks_within_beams(self) -> GenEvalConfig:
        if self.ks[-1] > self.num_beams:
            raise ValueError(f"ks contains {self.ks[-1]} > num_beams {self.num_beams}: beam search returns only "
                             f"num_beams items; set eval.num_beams={self.ks[-1]} or drop the larger K")
        return self


class GenRecJobConfig(BatchArithmetic):
    """One generative-recommendation job (semantic IDs -> prompts -> LoRA SFT -> evaluation)."""

    data: DataConfig = Field(DataConfig(), description="the prepared dataset, and how to build it")
    sids: SidConfig = Field(SidConfig(), description="the semantic-ID index")
    prompts: PromptConfig = Field(PromptConfig(), description="the prompt tasks of the training mixture")
    model: LMConfig = Field(LMConfig(), description="the causal language model")
    train: SFTTrainConfig = Field(SFTTrainConfig(), description="LoRA supervised fine-tuning")
    eval: GenEvalConfig = Field(GenEvalConfig(), description="constrained beam-search evaluation")
    scaling: ScalingConfig = Field(ScalingConfig(), description="Ray Train workers and their resources")
    tracking: TrackingConfig = Field(TrackingConfig(experiment="genrec"), description="MLflow tracking")
    run: RunConfig = Field(RunConfig(name="genrec"), description="run name, storage, seed, checkpoints and fault "
                           "tolerance")
    export: ExportConfig = Field(ExportConfig(), description="register the trained adapter in MLflow at the end")

    @property
    def selection_metric(self) -> tuple[str, str]:
        """(metric, mode) that picks the best checkpoint (and that a sweep optimises)."""
        if self.train.val_rows == 0:
            return "val/loss", "min"
        k = 10 if 10 in self.eval.ks else self.eval.ks[-1]
        return f"val/ndcg@{k}", "max"

    @model_validator(mode="after")
    def _global_batch(self) -> GenRecJobConfig:
        want = self.train.global_batch_size
        if want is not None and want != self.global_batch_size:
            per_step = self.step_batch_size
            fix = f"train.grad_accum={want // per_step}" if want % per_step == 0 else "train.batch_size/grad_accum"
            raise ValueError(f"train.global_batch_size={want} but batch_size {self.train.batch_size} x workers "
                             f"{self.scaling.num_workers} x grad_accum {self.train.grad_accum} = "
                             f"{self.global_batch_size}; set {fix}")
        return self


# ----------------------------------------------------------------------------- GRPO

#: Prompt tasks whose answer is an item (a SID), so item rewards can score it.
ITEM_TASKS = ("sid_seq", "title_seq", "title_to_sid")


class RewardWeights(Strict):
    """Reward functions (``rayrec.genrec.rewards``) and their weights in the total reward; 0 = off."""

    rule: float = Field(0.0, ge=0.0, description="weight of the rule reward: 1 for the target item, else 0")
    ranking: float = Field(1.0, ge=0.0, description="weight of the ranking reward: rule plus an NDCG-shaped penalty "
                           "for each wrong item of a group that holds the target")
    semantic: float = Field(0.0, ge=0.0, description="weight of the semantic reward: cosine of the items' text "
                            "embeddings")
    collaborative: float = Field(0.0, ge=0.0, description="weight of the collaborative reward: a SASRec "
                                 "checkpoint's probability of the item after the history")

    @model_validator(mode="after")
    def _some(self) -> RewardWeights:
        if not any(w > 0 for w in self.weights().values()):
            raise ValueError("grpo.rewards: give at least one reward a weight > 0 (rule, ranking, semantic, "
                             "collaborative)")
        return self

    def weights(self) -> dict[str, float]:
        """name -> weight of the rewards that are on, in a fixed order."""
        return {k: float(getattr(self, k)) for k in ("rule", "ranking", "semantic", "collaborative")
                if getattr(self, k) > 0}


class GRPOSettings(Strict):
    """Group generation, rewards and the KL-regularised objective (TRL ``GRPOTrainer``)."""

    adapter: Path | None = Field(None, description="SFT run folder (its best adapter) or checkpoint folder to start from")
    num_generations: int = Field(8, ge=2, description="G: completions per prompt (one group)")
    rollout: Literal["beam", "sample"] = Field(
        "beam", description="beam: constrained beam search, G distinct items in score order; sample: sampling")
    constrained: bool = Field(True, description="decode through the SID trie (off: invalid outputs get the "
                              "minimum reward and are counted)")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature (rollout: sample)")
    dynamic_sampling: bool = Field(False, description="sample 1.5 G, fill the group round-robin over the distinct "
                                   "items drawn (the target first, then the most frequent)")
    add_gt: bool = Field(False, description="put the target into every group that misses it (off-policy)")
    beta: float = Field(1e-3, ge=0.0, description="KL weight to the SFT policy; 0 = no reference at all")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "grpo", description="grpo: per-sequence mean (MiniOneRec); dapo: token mean; see TRL")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="token only: each generation is used for one pass, so the importance ratio is 1 and "
        "GSPO's sequence-level ratio (sequence) would change nothing")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="advantage = (r - mean) / std of one reward (or of the weighted sum with "
        "reward_mixing: sum_then_normalize)")
    rewards: RewardWeights = Field(RewardWeights(), description="reward functions and their weights")
    reward_mixing: Literal["normalize_then_sum", "sum_then_normalize"] = Field(
        "normalize_then_sum", description="several rewards: normalize_then_sum standardises each within its group "
        "before the weights apply, so a weight is the reward's share of the advantage whatever its scale; "
        "sum_then_normalize (TRL's default) sums the raw weighted rewards, where a reward of a larger spread "
        "dominates whatever the weights")
    collaborative_checkpoint: Path | None = Field(
        None, description="folder of a `rayrec train` SASRec checkpoint (state.pt) on the same prepared data")


class GRPOTrainConfig(SFTTrainConfig):
    """GRPO optimisation. ``batch_size`` counts completions (prompts x G) per worker per micro-step."""

    epochs: float = Field(1.0, gt=0.0, description="passes over the training prompts (unless max_steps)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (overrides epochs)")
    batch_size: int = Field(16, ge=1, description="completions per worker per micro-step (a multiple of G over "
                            "grad_accum micro-steps)")
    lr: float = Field(1e-5, gt=0.0, description="peak learning rate (AdamW) of the trained parameters")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="share of the optimizer steps spent warming up")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "constant", description="learning-rate schedule after warmup (Hugging Face's lr_scheduler_type)")
    save_steps: int = Field(50, ge=1, description="checkpoint and validate (train.val_rows) every N steps")
    lora: LoraSettings | None = Field(None, description="must equal the SFT adapter's (default: read from it)")


class GRPOJobConfig(GenRecJobConfig):
    """GRPO after SFT: the SFT job's sections plus ``grpo``; ``train`` is GRPO's."""

    prompts: PromptConfig = Field(PromptConfig(tasks={"sid_seq": 1.0}), description="the prompt tasks; GRPO takes "
                                  "only tasks whose answer is an item (sid_seq, title_seq, title_to_sid)")
    train: GRPOTrainConfig = Field(GRPOTrainConfig(), description="GRPO optimisation")
    grpo: GRPOSettings = Field(GRPOSettings(), description="group generation, rewards and the objective")
    run: RunConfig = Field(RunConfig(name="grpo"), description="run name, storage, seed, checkpoints and fault "
                           "tolerance")

    @property
    def reports_per_run(self) -> int | None:
        """Reports (checkpoint + validation, every ``train.save_steps``) of a full run: a sweep's clock.
        Known only with ``train.max_steps`` (otherwise it depends on the prompt count)."""
        if self.train.max_steps is None:
            return None
        return -(-self.train.max_steps // self.train.save_steps)

    @property
    def selection_metric(self) -> tuple[str, str]:
        """val/ndcg@K of the validation ranking at each checkpoint; without it, the training reward."""
        if self.train.val_rows == 0:
            return "train/reward", "max"
        return super().selection_metric

    @model_validator(mode="after")
    def _grpo(self) -> GRPOJobConfig:
        other = sorted(t for t, w in self.prompts.tasks.items() if w > 0 and t not in ITEM_TASKS)
        if other:
            raise ValueError(f"prompts.tasks: {other} answer with a title, which item rewards cannot score; "
                             f"set their weight to 0 (GRPO tasks: {', '.join(ITEM_TASKS)})")
        g, per_worker = self.grpo.num_generations, self.train.batch_size * self.train.grad_accum
        if per_worker % g:
            raise ValueError(
                f"train.batch_size x train.grad_accum = {per_worker} completions per worker and optimizer step is "
                f"not a multiple of grpo.num_generations={g}: each worker generates whole groups of G completions "
                f"of one prompt (TRL's rule: the generation batch must divide into groups); set train.batch_size "
                f"to a multiple of {g}")
        if self.grpo.dynamic_sampling and self.grpo.rollout != "sample":
            raise ValueError("grpo.dynamic_sampling draws 1.5 G samples, so it needs grpo.rollout=sample")
        if self.grpo.importance_sampling_level != "token":
            raise ValueError("grpo.importance_sampling_level=sequence (GSPO) changes nothing here: each generation is "
                             "used for one optimisation pass, so the policy that sampled is the policy being "
                             "updated and the importance ratio is 1 at every token; leave it at token")
        mixed = len(self.grpo.rewards.weights()) > 1 and self.grpo.reward_mixing == "normalize_then_sum"
        if mixed and self.grpo.scale_rewards != "group":
            raise ValueError(f"grpo.scale_rewards={self.grpo.scale_rewards} with several rewards and "
                             "reward_mixing=normalize_then_sum: each reward is standardised within its group and "
                             "the weighted sum over the batch, so scale_rewards does not apply; leave it at group, "
                             "or set grpo.reward_mixing=sum_then_normalize")
        return self
