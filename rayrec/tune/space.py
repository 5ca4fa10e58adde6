"""Search-space files: schema, validation against the job schema, and conversion for Optuna.

A space file names a base job, the validation metric to optimise, and the knobs to
search, keyed by dotted job paths::

    job: ../jobs/quickstart.yaml          # relative to this file
    metric: val/ndcg@10                   # a validation metric; mode comes from the metric
    params:
      train.optim.lr: {dist: loguniform, low: 1.0e-4, high: 1.0e-2}
      model.hidden:   {dist: choice, values: [32, 64, 128]}
      model.loss.name: {dist: choice, values: [ce, gbce]}
      model.loss.gbce_t: {dist: uniform, low: 0.2, high: 0.9, when: {model.loss.name: gbce}}
      model.stages.joint_finetune.strategies.adaptive_alternating.threshold:   # list items by name
        {dist: loguniform, low: 1.0e-3, high: 1.0e-1}
    num_samples: 8

The base job is a sequential-model job (``JobConfig``) or a generative one
(``GenRecJobConfig``); ``rayrec.config.kinds`` says which (one rule) and what differs.
Everything here is checked before Ray starts, against the base job's own schema: every
path must exist (a typo names the nearest valid path), each range's ends must be
accepted, conditions must refer to a searched ``choice`` or to the base job, and the
metric must be one that the job's trials report each epoch.

The searched values are drawn by Optuna through a define-by-run function
(``OptunaSpace``): it handles conditional params (suggested only when their condition
holds) for both the TPE and the random sampler, and quantised log scales.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from rayrec.config.base import Strict
from rayrec.config.kinds import (
    GENREC,
    GENREC_SECTIONS,
    JOB_SECTIONS,
    SEQUENTIAL,
    JobKind,
    kind_of,
    kind_of_file,
    metric_problem,
)
from rayrec.config.loader import apply_overrides, config_paths, load_model, read_yaml, validate
from rayrec.config.schema import StoragePath
from rayrec.errors import ConfigError
from rayrec.eval.metrics import metric_mode
from rayrec.tune.paths import PathError, get_path, schema_path, set_paths

log = logging.getLogger(__name__)

Scalar = str | int | float | bool


class _Param(Strict):
    """Common to every distribution: an optional condition ``{path: value or [values]}``."""

    when: dict[str, Scalar | list[Scalar]] | None = Field(
        None, description="search this param only when every path has the given value (or one of a list)"
    )


class Uniform(_Param):
    dist: Literal["uniform"] = Field(description="the distribution: floats evenly between low and high")
    low: float = Field(description="lower bound of the range")
    high: float = Field(description="upper bound of the range")

    @model_validator(mode="after")
    def _range(self) -> Uniform:
        _check_range(self.low, self.high, "uniform")
        return self


class LogUniform(_Param):
    dist: Literal["loguniform"] = Field(description="the distribution: floats on a log scale between low and high")
    low: float = Field(description="lower bound of the range")
    high: float = Field(description="upper bound of the range")

    @model_validator(mode="after")
    def _range(self) -> LogUniform:
        _check_log_range(self.low, self.high, "loguniform")
        return self


class QUniform(_Param):
    dist: Literal["quniform"] = Field(description="the distribution: floats evenly between low and high")
    low: float = Field(description="lower bound of the range")
    high: float = Field(description="upper bound of the range")
    q: float = Field(gt=0, description="values are multiples of q from low")

    @model_validator(mode="after")
    def _range(self) -> QUniform:
        _check_range(self.low, self.high, "quniform")
        steps = (self.high - self.low) / self.q
        if abs(steps - round(steps)) > 1e-9:
            raise ValueError(f"quniform needs (high - low) to be a multiple of q; got low={self.low}, "
                             f"high={self.high}, q={self.q}; e.g. set high={self.low + math.floor(steps) * self.q:g}")
        return self


class QLogUniform(_Param):
    dist: Literal["qloguniform"] = Field(description="the distribution: floats on a log scale between low and high")
    low: float = Field(description="lower bound of the range")
    high: float = Field(description="upper bound of the range")
    q: float = Field(gt=0, description="values are rounded to multiples of q")

    @model_validator(mode="after")
    def _range(self) -> QLogUniform:
        _check_log_range(self.low, self.high, "qloguniform")
        if self.q > self.high:
            raise ValueError(f"qloguniform: q={self.q} is larger than high={self.high}; every value would round to 0")
        return self


class IntParam(_Param):
    dist: Literal["int"] = Field(description="the distribution: integers from low to high (both included)")
    low: int = Field(description="smallest value")
    high: int = Field(description="largest value")
    step: int = Field(1, ge=1, description="values are low, low + step, ... (high - low must be a multiple)")
    log: bool = Field(False, description="draw on a log scale (needs low >= 1 and step 1)")

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        _check_range(self.low, self.high, "int")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError(f"int with log: true needs low >= 1 and step 1; got low={self.low}, step={self.step}")
        if (self.high - self.low) % self.step:
            raise ValueError(f"int needs (high - low) to be a multiple of step; got low={self.low}, high={self.high}, "
                             f"step={self.step}; e.g. set high={self.low + (self.high - self.low) // self.step * self.step}")
        return self


class Choice(_Param):
    dist: Literal["choice"] = Field(description="the distribution: one of a list of values")
    values: list[Scalar] = Field(description="the distinct values to choose from")

    @field_validator("values")
    @classmethod
    def _non_empty(cls, v: list[Scalar]) -> list[Scalar]:
        if not v:
            raise ValueError("choice needs at least one value in `values`, e.g. values: [32, 64]")
        if len({repr(x) for x in v}) != len(v):
            raise ValueError(f"choice values must be distinct, got {v}")
        return v


ParamSpec = Annotated[Uniform | LogUniform | QUniform | QLogUniform | IntParam | Choice, Field(discriminator="dist")]
DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "qloguniform", "int", "choice")


def _check_range(low: float, high: float, dist: str) -> None:
    if not low < high:
        raise ValueError(f"{dist} needs low < high, got low={low}, high={high} (for a fixed value, set it in the job)")


def _check_log_range(low: float, high: float, dist: str) -> None:
    if low <= 0 or high <= 0:
        raise ValueError(f"{dist} needs positive bounds (a log scale has no zero or negatives), got low={low}, "
                         f"high={high}; use uniform, or set low to a small positive value such as 1e-5")
    _check_range(low, high, dist)


class TrialResources(Strict):
    """Resources of one trial: its Ray Train workers plus the trial's own driver process."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers per trial")
    use_gpu: bool = Field(False, description="each trial worker takes a GPU")
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 0.25},
        description="fractional CPUs let several trials share a small machine",
    )
    driver_cpu: float = Field(0.25, ge=0.0, description="CPU reserved by the trial's driver (runs the TorchTrainer)")
    driver_resources: dict[str, float] = Field(
        default_factory=dict, description="more resources of the trial's driver, e.g. {trial_slot: 1} with a "
        "custom resource of that name on some nodes: trials' drivers only there, one per slot")
    max_failures: int = Field(1, ge=-1, description="times a trial is started again after its driver died (its "
                              "node lost, the process killed): it resumes its run from the newest checkpoint and "
                              "the same MLflow child run; -1 = no limit. A trial that fails again is recorded failed")


class SearcherConfig(Strict):
    name: Literal["optuna", "random"] = Field("optuna", description="optuna = TPE; random = uniform random draws")
    seed: int | None = Field(0, description="sampler seed (null = not reproducible)")
    points_to_evaluate: list[dict[str, Scalar]] = Field(
        default_factory=list, description="configs tried first ({param path: value}), e.g. a known good one"
    )


class SchedulerConfig(Strict):
    name: Literal["asha", "none"] = Field("asha", description="asha = stop weak trials early at rungs; none = run all")
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0, description="keep the top 1/reduction_factor at each rung")
    max_epochs: int | None = Field(None, ge=1, description="epochs of a full trial (default: the job's train.epochs)")


class SearchSpace(Strict):
    """One tuning sweep: what `rayrec tune SPACE.yaml` reads."""

    job: Path = Field(description="base job YAML (relative to this file)")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides of the base job")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$", description="sweep name (default: file name)")
    metric: str = Field("val/ndcg@10", description="validation metric trials are ranked and stopped by")
    mode: Literal["max", "min"] | None = Field(None, description="default: the metric's own mode")
    params: dict[str, ParamSpec] = Field(description="dotted job path -> its distribution (`dist`)")
    num_samples: int = Field(description="trials to run")
    max_concurrent_trials: int = Field(2, ge=1, description="trials running at once (also capped by resources)")
    trial: TrialResources = Field(TrialResources(), description="resources of each trial")
    searcher: SearcherConfig = Field(SearcherConfig(), description="what proposes the trials' values")
    scheduler: SchedulerConfig = Field(SchedulerConfig(), description="what stops weak trials early")
    time_budget_s: float | None = Field(None, gt=0, description="stop starting/running trials after this long")
    epoch_budget: int | None = Field(None, ge=1, description="stop the sweep once its trials have trained this many "
                                     "epochs in all (trial-epochs): the same budget gives models the same search effort")
    storage_path: StoragePath = Field(Path("runs/tune"), description="sweep folder parent (relative to the working "
                                      "dir), or object storage: s3://BUCKET/PREFIX, gs://BUCKET/PREFIX")

    @field_validator("num_samples", mode="before")
    @classmethod
    def _samples(cls, v: Any) -> Any:
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and v < 1):
            raise ValueError("num_samples must be a positive number of trials, e.g. num_samples: 8")
        return v

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, v: str) -> str:
        if v.startswith("test/"):
            raise ValueError(f"'{v}' is a test metric; a sweep must select on a validation metric "
                             f"(val/{v[5:]}) so the test split stays unseen until the final report")
        if not v.startswith("val/"):
            raise ValueError(f"'{v}' is not a validation metric; use val/<name>, e.g. val/ndcg@10")
        try:
            metric_mode(v)
        except ValueError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("params")
    @classmethod
    def _some_params(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("params is empty; name at least one dotted job path to search")
        return v

    @model_validator(mode="after")
    def _mode_matches(self) -> SearchSpace:
        natural = metric_mode(self.metric)
        if self.mode is not None and self.mode != natural:
            raise ValueError(f"mode '{self.mode}' would search for the worst model: {self.metric} is better when "
                             f"{'larger' if natural == 'max' else 'smaller'} (mode {natural}); drop `mode`")
        return self

    @property
    def resolved_mode(self) -> str:
        return self.mode or metric_mode(self.metric)


@dataclass
class Sweep:
    """A validated space file plus its base job (with overrides applied)."""

    space: SearchSpace
    job: BaseModel  # JobConfig or GenRecJobConfig (see ``kind``)
    source: Path  # the space file
    job_source: Path  # the base job file
    order: list[str]  # params in evaluation order (condition parents first)

    @property
    def name(self) -> str:
        return self.space.name or self.source.stem

    @property
    def kind(self) -> JobKind:
        return kind_of(self.job)

    @property
    def max_epochs(self) -> int:
        return self.space.scheduler.max_epochs or job_epochs(self.job)


# --- loading and validation ------------------------------------------------------------------


def load_space(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read a space file, apply overrides (space keys or job keys), validate everything."""
    path = Path(path)
    raw, lines = read_yaml(path)
    space_over = [o for o in overrides if _section(o) not in JOB_SECTIONS]
    job_over = [o for o in overrides if _section(o) in JOB_SECTIONS]
    applied = apply_overrides(raw, space_over, SearchSpace)
    space = validate(SearchSpace, raw, source=str(path), lines=lines, overridden=applied)
    searched = [o.partition("=")[0].strip() for o in job_over if o.partition("=")[0].strip() in space.params]
    if searched:
        raise ConfigError(f"{path}: {', '.join(searched)} {'is' if len(searched) == 1 else 'are'} searched by this space "
                          f"(params.{searched[0]}), so an override would be ignored by every trial; drop the override, "
                          f"or narrow the search (e.g. params.{searched[0]}.values=[...])")
    job_path = _job_path(space.job, path, lines)
    job = load_base_job(job_path, [*space.overrides, *job_over])
    order = check_against_job(space, job, str(path), lines)
    return Sweep(space, job, path, job_path, order)


def load_base_job(path: Path, overrides: list[str]) -> BaseModel:
    """The base job, validated against the schema of its kind (decided by the file, before overrides)."""
    kind = kind_of_file(read_yaml(path)[0])
    try:
        return load_model(kind.schema, path, overrides)
    except ConfigError as e:
        if kind is not SEQUENTIAL or not _valid_as(GENREC, path, overrides):
            raise
        raise ConfigError(f"{e}\n{path}: this reads as a generative job, but a job file is taken as generative only "
                          f"when its top level has a {' or '.join(f'`{s}`' for s in GENREC_SECTIONS)} section; "
                          "add one (`sids: {}` keeps the defaults)") from None


def _valid_as(kind: JobKind, path: Path, overrides: list[str]) -> bool:
    try:
        load_model(kind.schema, path, overrides)
    except ConfigError:
        return False
    return True


def _section(override: str) -> str:
    return override.partition("=")[0].strip().split(".")[0]


def _job_path(job: Path, space_file: Path, lines: dict[str, int]) -> Path:
    """The base job, relative to the space file (or, failing that, to the working dir)."""
    candidates = [job] if job.is_absolute() else [space_file.parent / job, Path.cwd() / job]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"{space_file}:{lines.get('job', 1)}: job '{job}' not found (tried {tried}); "
                      "give the job file relative to the space file")


def check_against_job(space: SearchSpace, job: BaseModel, source: str, lines: dict[str, int]) -> list[str]:
    """Validate every path, range end, condition and warm-start point against the base job
    (with the schema of its kind).

    Returns the params in an order where condition parents come first.
    """
    kind = kind_of(job)
    base = trial_base(job)
    for path in space.params:
        _check_path(kind, base, path, source, lines, f"params.{path}")
    _resolve_fixed_conditions(kind, space, base, source, lines)
    order = _condition_order(space, source, lines)
    for path, p in space.params.items():
        for value in _probe_values(p):
            _probe(kind, base, {**_condition_values(space, path), path: value}, source, lines, f"params.{path}")
    _probe_together(kind, space, base, source, lines)
    _check_metric(space, job, source, lines)
    _check_scheduler(space, job, source, lines)
    for i, point in enumerate(space.searcher.points_to_evaluate):
        unknown = sorted(set(point) - set(space.params))
        if unknown:
            raise ConfigError(f"{source}:{lines.get('searcher.points_to_evaluate', 1)}: points_to_evaluate[{i}] sets "
                              f"{', '.join(unknown)}, which are not searched params ({', '.join(space.params)})")
        _probe(kind, base, point, source, lines, f"searcher.points_to_evaluate[{i}]")
    return order


@functools.cache
def _leaf_paths(kind: JobKind) -> tuple[str, ...]:
    """The value paths of the kind's schema (sections dropped)."""
    paths = config_paths(kind.schema)
    return tuple(p for p in paths if not any(q.startswith(p + ".") for q in paths))


def _check_path(kind: JobKind, base: dict[str, Any], path: str, source: str, lines: dict[str, int],
                key: str) -> None:
    """``path`` must lead to a value of the base job (not a section) outside the per-sweep sections."""
    where = f"{source}:{lines.get(key, lines.get('params', 1))}"
    why = kind.fixed_reason(path)
    if why:
        raise ConfigError(f"{where}: '{path}' cannot be searched: {why}")
    try:
        value = get_path(base, path)
        known = schema_path(base, path) in _leaf_paths(kind)
    except PathError as e:
        raise ConfigError(f"{where}: {e}{_nearest(kind, path)}") from None
    if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)):
        below = ", ".join(f"{path}.{k}" for k in (value if isinstance(value, dict) else range(len(value))))
        raise ConfigError(f"{where}: '{path}' is a section, not a value; search one of its keys: {below}")
    if value is None and not known:
        raise ConfigError(f"{where}: '{path}' is not a job config path{_nearest(kind, path)}")


def _nearest(kind: JobKind, path: str) -> str:
    """'; did you mean a.b.c?' from close spellings or the same leaf name among the paths a sweep
    may search in this kind of job, else the section's keys."""
    leaves = [p for p in _leaf_paths(kind) if kind.fixed_reason(p) is None]
    plain = ".".join(p for p in path.split(".") if not p.isdigit())
    leaf = path.rsplit(".", 1)[-1]
    near = difflib.get_close_matches(plain, leaves, n=2, cutoff=0.75)
    near += [p for p in leaves if p.rsplit(".", 1)[-1] == leaf and p not in near]
    if near:
        return f"; did you mean {' or '.join(near[:3])}?"
    section = path.split(".")[0]
    keys = [p for p in leaves if p.startswith(section + ".")]
    return f" (paths in {section}: {', '.join(keys)})" if keys else f" (sections: {', '.join(kind.schema.model_fields)})"


def _resolve_fixed_conditions(kind: JobKind, space: SearchSpace, base: dict[str, Any], source: str,
                              lines: dict[str, int]) -> None:
    """Conditions on paths that are not searched are decided now, against the base job."""
    for path, p in space.params.items():
        key = f"params.{path}.when"
        for cond_path, want in list((p.when or {}).items()):
            if cond_path in space.params:
                continue
            _check_path(kind, base, cond_path, source, lines, key)
            have = get_path(base, cond_path)
            if not _matches(have, want):
                raise ConfigError(f"{source}:{lines.get(key, 1)}: params.{path} is searched only when {cond_path} is "
                                  f"{want!r}, but the base job has {have!r}, so it would never be used; "
                                  f"set {cond_path} in the job, search it too, or drop this param")
            del p.when[cond_path]  # always true for this job


def _condition_order(space: SearchSpace, source: str, lines: dict[str, int]) -> list[str]:
    """Params sorted so each condition's parent is drawn first; parents must be ``choice``."""
    for path, p in space.params.items():
        for parent, want in (p.when or {}).items():
            where = f"{source}:{lines.get(f'params.{path}.when', 1)}"
            spec = space.params[parent]
            if not isinstance(spec, Choice):
                raise ConfigError(f"{where}: params.{path} depends on {parent}, which is searched as {spec.dist}; "
                                  "a condition may only test a `choice` param")
            missing = [w for w in (want if isinstance(want, list) else [want]) if w not in spec.values]
            if missing:
                raise ConfigError(f"{where}: params.{path} tests {parent} for {missing}, which are not among its "
                                  f"values {spec.values}")
    order: list[str] = []
    pending = list(space.params)
    while pending:
        ready = [p for p in pending if all(c in order for c in (space.params[p].when or {}))]
        if not ready:
            raise ConfigError(f"{source}: conditions form a cycle among {', '.join(pending)}")
        order.extend(ready)
        pending = [p for p in pending if p not in ready]
    return order


def _condition_values(space: SearchSpace, path: str) -> dict[str, Any]:
    """Values of the condition parents that make ``path`` active (first allowed value each)."""
    out: dict[str, Any] = {}
    for parent, want in (space.params[path].when or {}).items():
        out.update(_condition_values(space, parent))
        out[parent] = want[0] if isinstance(want, list) else want
    return out


def _probe_together(kind: JobKind, space: SearchSpace, base: dict[str, Any], source: str,
                    lines: dict[str, int]) -> None:
    """Params the schema checks jointly (``kind.together``; GRPO: batch, accumulation, G): when several
    are searched, each must be a ``choice`` and every combination must pass."""
    searched = [p for p in kind.together if p in space.params]
    if len(searched) < 2:
        return
    for path in searched:
        if not isinstance(space.params[path], Choice):
            raise ConfigError(f"{source}:{lines.get(f'params.{path}', lines.get('params', 1))}: '{path}' is searched "
                              f"with {', '.join(searched)}, which must fit together ({kind.name} jobs); search it "
                              "with dist: choice over values that do")
    for combo in itertools.product(*(space.params[p].values for p in searched)):
        _probe(kind, base, dict(zip(searched, combo)), source, lines, f"params.{searched[0]}")


def _probe_values(p: Any) -> list[Any]:
    return list(p.values) if isinstance(p, Choice) else [p.low, p.high]


def _probe(kind: JobKind, base: dict[str, Any], values: dict[str, Any], source: str, lines: dict[str, int],
           key: str) -> None:
    """The job schema must accept ``values`` set into the base job (e.g. a range end)."""
    try:
        kind.schema.model_validate(set_paths(base, values))
    except ValidationError as e:
        first = e.errors()[0]
        where = f"{source}:{lines.get(key, lines.get('params', 1))}"
        at = ".".join(str(x) for x in first["loc"])
        if first["type"] == "extra_forbidden":
            path = next(iter(values)) if len(values) == 1 else at
            raise ConfigError(f"{where}: '{path}' is not a job config path{_nearest(kind, path)}") from None
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: {key}: the job schema rejects {shown}: {at}: {msg}; "
                          "keep the range inside what the job accepts") from None


def _check_metric(space: SearchSpace, job: BaseModel, source: str, lines: dict[str, int]) -> None:
    """The metric must be one the trials report each epoch (which depends on the kind of job)."""
    problem = metric_problem(job, space.metric)
    if problem:
        raise ConfigError(f"{source}:{lines.get('metric', 1)}: {problem}")


def trial_base(job: BaseModel) -> dict[str, Any]:
    """The base job as the dict every trial's values are set into. A staged model's train.epochs
    is the sum of its stages' (derived, not chosen), so it is left out and derived again: a trial
    may search a stage's length."""
    base = job.model_dump(mode="json")
    if hasattr(job.model, "total_epochs"):
        base["train"].pop("epochs", None)
    return base


def job_epochs(job: BaseModel) -> int:
    """Epochs of one full run of ``job`` (a staged model sums its stages; a GRPO job counts its
    reports, one per checkpoint)."""
    if reports_clock(job):
        return job.reports_per_run
    return int(getattr(job.model, "total_epochs", job.train.epochs))


def reports_clock(job: BaseModel) -> bool:
    """Whether a trial's clock is its count of reports (GRPO: one per ``train.save_steps``), not epochs."""
    return hasattr(type(job), "reports_per_run")


def _check_scheduler(space: SearchSpace, job: BaseModel, source: str, lines: dict[str, int]) -> None:
    sch = space.scheduler
    line = lines.get("scheduler.max_epochs", lines.get("scheduler", 1))
    if "train.epochs" in space.params:
        raise ConfigError(f"{source}:{lines.get('params.train.epochs', 1)}: train.epochs cannot be searched; "
                          "set scheduler.max_epochs (ASHA decides how many epochs each trial gets)")
    if reports_clock(job):
        if job.reports_per_run is None:
            raise ConfigError(f"{source}:{line}: a GRPO trial reports at each checkpoint (train.save_steps), so "
                              "its length must be known: set train.max_steps in the base job or an override")
        if sch.max_epochs and sch.max_epochs != job_epochs(job):
            raise ConfigError(f"{source}:{line}: scheduler.max_epochs ({sch.max_epochs}) differs from the GRPO "
                              f"trial's reports ({job_epochs(job)} = train.max_steps / train.save_steps); drop "
                              "max_epochs or change those")
    elif not sch.max_epochs and not float(job.train.epochs).is_integer():
        raise ConfigError(f"{source}:{line}: the base job's train.epochs ({job.train.epochs:g}) is not a whole "
                          "number; trials report once per epoch (ASHA's clock), so set scheduler.max_epochs "
                          "or train.epochs to a whole number")
    if sch.max_epochs and hasattr(job.model, "total_epochs") and sch.max_epochs != job_epochs(job):
        raise ConfigError(f"{source}:{line}: scheduler.max_epochs ({sch.max_epochs}) differs from the staged model's "
                          f"epochs ({job_epochs(job)}); set the stages' epochs in the job and drop max_epochs")
    max_epochs = sch.max_epochs or job_epochs(job)
    if sch.name == "asha" and sch.grace_period >= max_epochs:
        raise ConfigError(f"{source}:{lines.get('scheduler.grace_period', line)}: scheduler.grace_period "
                          f"({sch.grace_period}) must be below the trial's epochs ({max_epochs}) or ASHA can never "
                          "stop a trial early; lower it or raise scheduler.max_epochs")


def _matches(value: Any, want: Any) -> bool:
    return value in want if isinstance(want, list) else value == want


# --- conversion -------------------------------------------------------------------------------


def to_optuna(p: Any):
    """The Optuna distribution of one param (quantised log scales are rounded after drawing)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(p, Uniform):
        return FloatDistribution(p.low, p.high)
    if isinstance(p, LogUniform | QLogUniform):
        return FloatDistribution(p.low, p.high, log=True)
    if isinstance(p, QUniform):
        return FloatDistribution(p.low, p.high, step=p.q)
    if isinstance(p, IntParam):
        return IntDistribution(p.low, p.high, log=p.log, step=p.step)
    if isinstance(p, Choice):
        return CategoricalDistribution(p.values)
    raise TypeError(f"unknown param type {type(p).__name__}")


def active(p: Any, drawn: dict[str, Any]) -> bool:
    """Whether a param's condition holds for the values drawn so far."""
    return all(_matches(drawn.get(parent), want) for parent, want in (p.when or {}).items())


class OptunaSpace:
    """Define-by-run space for ``OptunaSearch``: conditional params are drawn only when active.

    A class (not a closure) so that Tune can pickle the searcher when it saves the sweep.
    """

    def __init__(self, params: dict[str, Any], order: list[str]) -> None:
        self.params, self.order = params, order

    def __call__(self, trial) -> dict[str, Any]:
        drawn: dict[str, Any] = {}
        for name in self.order:
            p = self.params[name]
            if active(p, drawn):
                drawn[name] = _suggest(trial, name, p)
        return drawn


def _suggest(trial, name: str, p: Any) -> Any:
    d = to_optuna(p)
    if isinstance(p, Choice):
        return trial.suggest_categorical(name, p.values)
    if isinstance(p, IntParam):
        return trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
    value = trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
    if isinstance(p, QLogUniform):  # Optuna has no step on a log scale: round, stay in range
        value = min(max(round(value / p.q), math.ceil(p.low / p.q)), math.floor(p.high / p.q)) * p.q
        value = float(f"{value:.12g}")  # 3 * 0.1 -> 0.3, not 0.30000000000000004
    return value

