"""Typed schema of a job file. Defaults live here and nowhere else.

Every model forbids unknown keys, so a typo is an error, never a silent default.
Derived values (global batch size, ...) are properties computed in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from rayrec.config.base import BatchArithmetic, Ks, LossConfig, SASRecConfig, Strict  # noqa: F401  (every section is found here)
from rayrec.config.joint import JointConfig
from rayrec.config.multi_interest import MultiInterestConfig
from rayrec.config.progressive import GroupRule, ProgressiveMixin
from rayrec.storage import storage_value

SplitProtocol = Literal["leave_one_out", "temporal", "user_prefix"]
SourceName = Literal[
    "synthetic",
    "movielens-100k",
    "movielens-1m",
    "movielens-multimodal",
    "recbole",
    "minionerec",
    "amazon",
    "csv",
]


class SynthConfig(Strict):
    """Size and seed of the embedded synthetic dataset (source ``synthetic``)."""

    users: int = Field(943, ge=10, description="number of users")
    items: int = Field(1682, ge=10, description="number of items")
    topics: int = Field(12, ge=1, description="latent topics that drive the Markov chains")
    mean_len: int = Field(60, ge=3, description="mean sequence length")
    seed: int = Field(0, description="generator seed")
    images: bool = Field(True, description="write a small PNG per item")
    styles: int = Field(0, ge=0, description="0 = off; else topics split into genre (text) x look (image), "
                        "so text and image each tell half of the topic; must divide topics")
    new_items: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of items released at the end of the "
                             "log: reachable only in a walk's last new_window steps (cold-start items)")
    new_window: int = Field(3, ge=1, description="steps at the end of each walk in which new items appear")


class FilterConfig(Strict):
    """Filters applied in order: rating threshold, k-core, sequence length bounds."""

    min_rating: float | None = Field(None, description="keep events with rating >= this")
    user_core: int = Field(0, ge=0, description="users need at least this many events (k-core)")
    item_core: int = Field(0, ge=0, description="items need at least this many events (k-core)")
    min_seq_len: int = Field(3, ge=1, description="drop users with fewer events after k-core")
    max_seq_len: int | None = Field(None, ge=1, description="keep only the last N events per user")
    drop_duplicates: bool = Field(False, description="drop repeated (user, item, timestamp) events, keeping the "
                                  "first; the manifest counts them either way")


class DataConfig(Strict):
    """Where the prepared dataset lives, and how to build it when absent."""

    path: Path = Field(Path("data/quickstart"), description="prepared dataset directory; a relative path "
                       "is under $RAYREC_STORAGE_ROOT when set (a cluster's shared storage)")
    source: SourceName = Field("synthetic", description="raw source used when path is absent")
    input: Path | None = Field(None, description="raw input (file or folder) of the source")
    prepare_if_missing: bool = Field(True, description="prepare `path` from the source when absent")
    split: SplitProtocol = Field(
        "leave_one_out", description="how events split into train/valid/test: leave_one_out = each user's last event "
        "is test, the one before valid; temporal = global time cuts at the 80th/90th percentile of event times; "
        "user_prefix = each sequence cut at 80 % and 90 %")
    filters: FilterConfig = Field(FilterConfig(), description="filters applied when the dataset is prepared")
    synth: SynthConfig = Field(SynthConfig(), description="the synthetic dataset (source synthetic)")
    on_bad_line: Literal["skip", "error"] = Field("error", description="a malformed raw line: skip it (counted) or "
                                                  "fail the preparation")
    source_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="extra keyword options of the source reader"
    )
    ingest: Literal["auto", "memory", "stream"] = Field(
        "auto", description="how Ray workers read the rows: 'memory' = transformed once per run into numpy "
        "tables in the object store (no per-epoch data work); 'stream' = Ray Data reads and transforms every "
        "epoch (data larger than the object store); 'auto' = memory when the tables take at most "
        "memory_fraction of the cluster's object store. The run's log says which path it took")
    memory_fraction: float = Field(0.3, gt=0.0, le=1.0, description="ingest auto: share of the object store "
                                   "the in-memory tables may take")


class PopularityConfig(Strict):
    """Most-popular baseline: scores every item by its training frequency."""

    name: Literal["popularity"] = Field("popularity", description="model variant (the tag of the job's `model` section)")
    max_len: int = Field(50, ge=1, description="history length (only used to mask seen items)")



#: A local folder (``Path``) or an object-store URI (``str``: ``s3://bucket/prefix``), see ``rayrec.storage``.
StoragePath = Annotated[Path | str, BeforeValidator(storage_value)]

ModelConfig = Annotated[SASRecConfig | PopularityConfig | JointConfig | MultiInterestConfig, Field(discriminator="name")]


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0.0, description="base learning rate (AdamW) after warmup")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay (on weights only, see decay_all)")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW's (beta1, beta2) moment decay rates")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps before cosine decay")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning rate after warmup: cosine decay "
                                                    "to 0 over the run's optimizer steps, or constant")
    grad_clip: float | None = Field(1.0, gt=0.0, description="max global grad norm; null = off")
    groups: list[GroupRule] = Field(
        default_factory=list, description="per-module multipliers: [{pattern: 'item_emb*', lr_mult: 2.0}, ...]; "
        "`rayrec train JOB --print-groups` shows the groups each parameter lands in")
    decay_all: bool = Field(False, description="weight decay on biases, norms and embeddings too (default: not)")


class EarlyStopConfig(Strict):
    metric: str = Field("val/ndcg@10", description="validation metric that picks the best epoch")
    mode: Literal["max", "min"] = Field("max", description="whether a larger (max) or smaller (min) metric is better")
    patience: int = Field(5, ge=1, description="epochs without improvement before stopping")

    @field_validator("metric")
    @classmethod
    def _validation_only(cls, v: str) -> str:
        if not v.startswith("val/"):
            raise ValueError(
                f"'{v}' is not a validation metric; early stopping and model selection "
                "must use a val/ metric (e.g. val/ndcg@10) so the test split stays unseen"
            )
        return v


class EvalConfig(Strict):
    ks: Ks = Field(default_factory=lambda: [5, 10, 20], description="cut-offs K of the reported hr@K and ndcg@K")
    mode: str = Field("full", description="'full' ranking or 'sampled:N' negatives")
    mask_seen: bool = Field(True, description="exclude items already in the history")
    batch_size: int = Field(1024, ge=1, description="rows per evaluation batch (scores are [batch, items])")

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v == "full":
            return v
        head, _, n = v.partition(":")
        if head != "sampled" or not n.isdigit() or int(n) < 1:
            raise ValueError(f"'{v}' is not 'full' or 'sampled:N' with N >= 1 (e.g. sampled:100)")
        return v


class TrainConfig(ProgressiveMixin):
    epochs: int = Field(20, ge=1, description="passes over the training rows (ur4rec: the sum of its stages' epochs)")
    batch_size: int = Field(128, ge=1, description="sequences per worker per step")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    optim: OptimConfig = Field(OptimConfig(), description="optimizer and learning-rate schedule")
    early_stopping: EarlyStopConfig = Field(EarlyStopConfig(), description="the metric that picks the best epoch, "
                                            "and when to stop")
    eval: EvalConfig = Field(EvalConfig(), description="validation and test ranking")
    amp: bool = Field(True, description="bf16/fp16 autocast when on GPU (ignored on CPU)")
    shuffle_buffer: int = Field(1024, ge=0, description="shuffle: each chunk of this many rows (file order) is "
                                "permuted per epoch, identically on every data path; 0 = off")
    windows: Literal["last", "sliding"] = Field(
        "sliding", description="training rows per user: 'sliding' = windows of model.max_len positions every "
        "window_stride positions back from the newest, so every training event is a target; 'last' = the newest "
        "window only (older events are never trained on)")
    window_stride: int | None = Field(None, ge=1, description="positions between sliding windows; null = "
                                      "model.max_len (no overlap: each event is a target once)")

    @model_validator(mode="after")
    def _stopping_metric(self) -> TrainConfig:
        """The early-stopping metric must be one the validation reports (else a whole epoch trains first)."""
        metric, ks = self.early_stopping.metric, self.eval.ks
        known = ["val/mrr", "val/mean_rank", *(f"val/{m}@{k}" for m in ("hr", "ndcg") for k in ks)]
        if metric in known:
            return self
        base, _, k = metric.removeprefix("val/").partition("@")
        if base in ("hr", "ndcg") and k.isdigit():
            hint = f"add {k} to train.eval.ks (now {ks}) or pick one of {', '.join(known)}"
        else:
            close = [m for m in known if m.replace("@", "").replace("_", "") == metric.replace("@", "").replace("_", "")]
            hint = f"did you mean {close[0]}?" if close else f"validation reports {', '.join(known)}"
            if base in ("recall", "hit", "hit_rate"):
                hint = f"rayrec calls it hr: val/hr@{k or 10}"
        raise ValueError(f"train.early_stopping.metric '{metric}' is not a metric the validation reports; {hint}")


class ScalingConfig(Strict):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel replicas)")
    use_gpu: bool = Field(False, description="give each worker a GPU (training runs on CPU otherwise)")
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="Ray resources each worker reserves; leave CPU for Ray Data on small hosts",
    )
    start_timeout_s: float = Field(
        300.0, gt=0,
        description="seconds one attempt waits for the worker group to be placed (Ray Train's "
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S); raise it where GPU nodes take minutes to boot",
    )
    poll_interval_s: float = Field(
        0.5, gt=0,
        description="seconds between the Ray Train controller's polls of its workers "
        "(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, Ray's default 2): starting the workers and noticing that "
        "they finished each wait for a poll, about 6 s of a short run at 2 s")
    start_attempts: int = Field(
        2, ge=1,
        description="attempts to place the worker group before the run fails (Ray would retry forever)",
    )


class TrackingConfig(Strict):
    enabled: bool = Field(True, description="log params, metrics and the resolved config to MLflow")
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (sqlite, http, ...)")
    experiment: str = Field("rayrec", description="MLflow experiment the runs are logged into")
    max_outage_s: float = Field(300.0, gt=0, description="a write the store refuses (server down, database "
                                "locked, disk full) is retried in the background for this long, then dropped and "
                                "counted (the run's summary says how many); training never waits on MLflow")


class CheckpointConfig(Strict):
    num_to_keep: int | None = Field(2, ge=1, description="checkpoints kept: the best N by train.early_stopping.metric, "
                                    "plus the newest (to resume from); null keeps all. Same locally and on Ray")
    every_n_steps: int | None = Field(
        None, ge=1,
        description="also checkpoint every N optimizer steps inside an epoch (long epochs); a resume "
        "then skips the batches of that epoch already trained; null = epoch ends only. Leave it off in "
        "sweeps: each such checkpoint is a Ray report (key mid_epoch_step) that Tune would also see",
    )


class ExportConfig(Strict):
    name: str | None = Field(None, pattern=r"^[^/@]+$", description="when set, the finished run (a sweep: its best "
                             "trial) is logged as an MLflow pyfunc model and registered under this name (`rayrec "
                             "export`)")
    alias: str | None = Field(None, description="alias the new model version gets (e.g. champion)")


class RunConfig(Strict):
    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9_.\-]+$", max_length=100,
                      description="run name (folder under storage_path, MLflow run name; at most 100 characters, not "
                      "'.' or '..')")
    storage_path: StoragePath = Field(Path("runs"), description="where Ray Train writes checkpoints: a folder (a "
                                      "relative one is under $RAYREC_STORAGE_ROOT when set, a cluster's shared "
                                      "storage) or object storage, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX "
                                      "(credentials from the environment only)")
    seed: int = Field(0, description="seed of the run: initialisation, shuffling, negative sampling, index building")
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), description="which checkpoints are written and kept")
    max_failures: int = Field(0, ge=-1, description="worker failures tolerated (-1 = unlimited)")

    @field_validator("name")
    @classmethod
    def _a_folder_of_its_own(cls, name: str) -> str:
        """``.``/``..`` would make the storage folder (or its parent) the run folder."""
        if set(name) == {"."}:
            raise ValueError(f"run.name {name!r} is not a folder of its own under run.storage_path; pick a name "
                             "such as 'sasrec_ml1m'")
        return name


class JobConfig(BatchArithmetic):
    """One runnable job: what `rayrec train JOB.yaml` reads."""

    data: DataConfig = Field(DataConfig(), description="the prepared dataset, and how to build it")
    model: ModelConfig = Field(SASRecConfig(), description="the model; `name` picks the variant (sasrec, popularity, "
                               "ur4rec, multi_interest)")
    train: TrainConfig = Field(TrainConfig(), description="the training loop")
    scaling: ScalingConfig = Field(ScalingConfig(), description="Ray Train workers and their resources")
    tracking: TrackingConfig = Field(TrackingConfig(), description="MLflow tracking")
    run: RunConfig = Field(RunConfig(), description="run name, storage, seed, checkpoints and fault tolerance")
    export: ExportConfig = Field(ExportConfig(), description="register the trained model in MLflow at the end")

    @model_validator(mode="after")
    def _joint_epochs(self) -> JobConfig:
        """ur4rec's stages set its epochs: train.epochs becomes their sum (a different explicit value is an error)."""
        if not isinstance(self.model, JointConfig) or self.train.epochs == self.model.total_epochs:
            return self
        if "epochs" in self.train.model_fields_set:
            raise ValueError(f"train.epochs ({self.train.epochs}) != the sum of model.stages[*].epochs "
                             f"({self.model.total_epochs}); for ur4rec set epochs per stage and drop train.epochs")
        self.train.epochs = self.model.total_epochs
        return self

    @model_validator(mode="after")
    def _staged_checkpoints(self) -> JobConfig:
        """The joint model's stages change optimizers and schedules at epoch ends, and its loop resumes
        from epoch ends only: a mid-epoch checkpoint would be one it cannot honour."""
        if isinstance(self.model, JointConfig) and self.run.checkpoint.every_n_steps:
            raise ValueError("run.checkpoint.every_n_steps: ur4rec's staged training checkpoints (and resumes) at "
                             "the end of every epoch only; drop run.checkpoint.every_n_steps (shorter stages "
                             "checkpoint more often)")
        return self

    @model_validator(mode="after")
    def _window_stride(self) -> JobConfig:
        stride = self.train.window_stride
        if stride is not None and stride > self.model.max_len:
            raise ValueError(f"train.window_stride ({stride}) > model.max_len ({self.model.max_len}): the "
                             "positions between windows would never be trained on; use at most max_len")
        return self

    @model_validator(mode="after")
    def _phases_fit(self) -> JobConfig:
        phases = self.train.phases
        if not phases:
            return self
        if isinstance(self.model, JointConfig):
            raise ValueError("train.phases: ur4rec trains in model.stages (its phases); drop train.phases")
        epochs = self.train.epochs
        for i, p in enumerate(phases):
            if p.until_epoch is not None and p.until_epoch > epochs:
                raise ValueError(f"train.phases[{i}] ({p.name}).until_epoch is {p.until_epoch}, past train.epochs ({epochs})")
        last = phases[-1]
        if last.until_epoch is not None and last.until_epoch < epochs:
            raise ValueError(f"the last phase ({last.name}) ends at epoch {last.until_epoch} but train.epochs is {epochs}; "
                             "end it at train.epochs or leave its until_epoch null")
        if last.until_epoch is None and len(phases) > 1 and phases[-2].until_epoch >= epochs:
            raise ValueError(f"the last phase ({last.name}) would have no epochs: phases[{len(phases) - 2}] "
                             f"({phases[-2].name}) already ends at train.epochs ({epochs})")
        return self

