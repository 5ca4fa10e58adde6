"""The kinds of job a sweep can tune, and the one rule that tells them apart.

* ``sequential``: a sequential-model job (``JobConfig``, run by ``rayrec train``: the
  ``sequential`` or ``joint`` recipe, by model); each trial is a Ray Train run of the
  training loop, which reports ``val/...`` every epoch and ends with a ``test/...`` report
  of the best weights.
* ``genrec``: a generative-recommendation job (``GenRecJobConfig``, run by ``rayrec sft``:
  the ``sft`` recipe); each trial is a LoRA SFT run whose validation ranking reports
  ``val/hr@K`` and ``val/ndcg@K`` (K in ``eval.ks``, on ``train.val_rows`` valid rows) every epoch.

* ``grpo``: a GRPO job (``GRPOJobConfig``, run by ``rayrec grpo``); each trial continues the
  same SFT adapter and reports the validation ranking at each checkpoint (``train.save_steps``),
  which is also ASHA's clock (reports, not epochs).

The rule: a job file with a ``grpo`` section is a GRPO job; else it is generative when its
top level has a ``sids`` or ``prompts`` section (sections only the generative schemas have);
any other job file is sequential and is validated as a ``JobConfig``. Everything else a sweep does per kind is listed here:
the schema, the command that runs a job file, the paths a sweep may not search, and
which validation metrics a trial reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from rayrec.config.genrec import GenRecJobConfig, GRPOJobConfig
from rayrec.config.loader import load_model, read_yaml
from rayrec.config.schema import JobConfig
from rayrec.errors import ConfigError

#: Top-level sections that make a job file generative (only ``GenRecJobConfig`` has them).
GENREC_SECTIONS = ("sids", "prompts")

#: Paths no sweep may search, with the reason (a prefix covers everything below it).
COMMON_FIXED = {
    "scaling": "trial resources are set in the space's `trial` section",
    "tracking": "all trials log into the base job's tracking experiment",
    "run": "run names and storage are set per trial by the sweep",
    "data": "the dataset is prepared once and shared by all trials",
    "model.features": "the joint model's features are computed once and shared by all trials",
    "model.prefs": "user preferences are generated once and shared by all trials",
}
GENREC_FIXED = {
    **COMMON_FIXED,
    "sids": "the semantic-ID index is built once and shared by all trials",
    "eval": "the validation ranking (eval.ks, eval.num_beams) must be the same for every trial to compare them",
    "train.val_rows": "every trial must be scored on the same validation rows",
}


GRPO_FIXED = {
    **GENREC_FIXED,
    "train.lora": "the LoRA config is the SFT adapter's: GRPO continues training that adapter (grpo.adapter)",
    "grpo.adapter": "every trial continues the same SFT adapter",
    "train.max_steps": "with train.save_steps it sets the trial's report count, ASHA's clock (set both in the job)",
    "train.save_steps": "with train.max_steps it sets the trial's report count, ASHA's clock (set both in the job)",
}
#: GRPO params that must satisfy a rule together: whole groups of G per worker and step
GRPO_TOGETHER = ("train.batch_size", "train.grad_accum", "grpo.num_generations")


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per kind
class JobKind:
    """What a sweep needs to know about one kind of base job."""

    name: str
    schema: type[BaseModel]
    command: str  # the CLI command that runs a job file of this kind (and the sweep's best.yaml)
    fixed: dict[str, str]  # path prefix -> why a sweep may not search it
    test_report: bool  # a trial's run ends with a test/ report of its best weights (else: its last epoch's)
    recipe: str | None = None  # the recipe that runs it (``rayrec.recipes``); None: named by the model's spec
    together: tuple[str, ...] = ()  # params the schema checks jointly: searched ones are probed in every combination

    def fixed_reason(self, path: str) -> str | None:
        """Why ``path`` may not be searched, or None when it may."""
        return next((why for prefix, why in self.fixed.items() if path == prefix or path.startswith(prefix + ".")),
                    None)


SEQUENTIAL = JobKind("sequential", JobConfig, "rayrec train", COMMON_FIXED, test_report=True)
GENREC = JobKind("genrec", GenRecJobConfig, "rayrec sft", GENREC_FIXED, test_report=False, recipe="sft")
GRPO = JobKind("grpo", GRPOJobConfig, "rayrec grpo", GRPO_FIXED, test_report=False, recipe="grpo",
               together=GRPO_TOGETHER)
KINDS = {k.name: k for k in (SEQUENTIAL, GENREC, GRPO)}

#: Top-level sections of any kind of job (overrides of these go to the base job, not the space).
JOB_SECTIONS = frozenset(JobConfig.model_fields) | frozenset(GRPOJobConfig.model_fields)


def kind_of_file(raw: dict[str, Any]) -> JobKind:
    """The kind of a job file from its parsed top level (the rule in the module docstring)."""
    if "grpo" in raw:
        return GRPO
    return GENREC if any(section in raw for section in GENREC_SECTIONS) else SEQUENTIAL


def load_job_file(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                  expect: tuple[JobKind, ...] = ()) -> BaseModel:
    """A job file validated with its kind's schema: what every command that reads a job calls.

    ``expect``: the kinds the calling command runs; a file of another kind is an error that names
    the command for it (rather than a list of keys the command's schema does not know)."""
    kind = kind_of_file(read_yaml(Path(path))[0])
    if expect and kind not in expect:
        runs = " or ".join(f"a {k.name} job" for k in expect)
        raise ConfigError(f"{path}: a {kind.name} job (this command runs {runs}); run it with `{kind.command} {path}`")
    return load_model(kind.schema, path, overrides)


def kind_of(job: BaseModel) -> JobKind:
    """The kind of a validated job."""
    if isinstance(job, GRPOJobConfig):
        return GRPO
    return GENREC if isinstance(job, GenRecJobConfig) else SEQUENTIAL


def kind_named(name: str) -> JobKind:
    return KINDS[name]


def metric_problem(job: BaseModel, metric: str) -> str | None:
    """Why a trial of ``job`` would never report ``metric`` (a ``val/`` ranking metric), or None."""
    base, _, k = metric.removeprefix("val/").partition("@")
    if isinstance(job, GenRecJobConfig):
        return _genrec_metric_problem(job, metric, base, k)
    if k and (not k.isdigit() or int(k) not in job.train.eval.ks):
        return (f"metric {metric} needs k={k} in the job's train.eval.ks (has {job.train.eval.ks}); "
                f"add it with the override train.eval.ks=[..., {k}]")
    return None


def _genrec_metric_problem(job: GenRecJobConfig, metric: str, base: str, k: str) -> str | None:
    """A generative trial reports val/hr@K and val/ndcg@K (K in eval.ks) when it decodes validation rows."""
    ks = job.eval.ks
    if base not in ("hr", "ndcg") or not k:
        return (f"a generative job reports val/hr@K and val/ndcg@K (K in eval.ks: {ks}) each epoch, not {metric}; "
                f"use e.g. val/ndcg@{10 if 10 in ks else ks[-1]}")
    if job.train.val_rows == 0:
        return (f"metric {metric}: the job decodes no validation rows (train.val_rows=0), so it reports only "
                "val/loss; set train.val_rows (e.g. the override train.val_rows=128)")
    if not k.isdigit() or int(k) not in ks:
        return (f"metric {metric} needs k={k} in the job's eval.ks (has {ks}); add it with the override "
                f"eval.ks=[..., {k}] (and eval.num_beams >= {k})")
    return None
