"""Job config loading: overrides are typed by the schema; every error names file, key, value, fix."""

from pathlib import Path

import pytest

from rayrec.config import config_paths, dump_job, flatten, load_job
from rayrec.config.schema import JobConfig
from rayrec.errors import ConfigError

JOB = """\
data:
  path: data/x
model:
  name: sasrec
  hidden: 32
train:
  epochs: 3
  optim:
    lr: 0.001
"""


@pytest.fixture
def job(tmp_path: Path) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(JOB)
    return p


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_job(path, overrides)
    return str(e.value)


def test_defaults_and_values_from_file(job):
    cfg = load_job(job)
    assert cfg.model.hidden == 32 and cfg.train.epochs == 3
    assert cfg.model.num_blocks == JobConfig().model.num_blocks  # default from the schema
    assert cfg.global_batch_size == cfg.train.batch_size * cfg.scaling.num_workers * cfg.train.grad_accum


def test_overrides_are_typed_by_schema(job):
    cfg = load_job(job, ["train.optim.lr=3e-4", "scaling.num_workers=4", "scaling.use_gpu=true",
                         "train.eval.ks=[20, 5]", "train.early_stopping.metric=val/ndcg@5", "model.loss.name=gbce", "data.filters.max_seq_len=null"])
    assert cfg.train.optim.lr == pytest.approx(3e-4)
    assert cfg.scaling.num_workers == 4 and cfg.scaling.use_gpu is True
    assert cfg.train.eval.ks == [5, 20]
    assert cfg.model.loss.name == "gbce"
    assert cfg.data.filters.max_seq_len is None


def test_model_variant_is_chosen_by_name(job):
    p = job.parent / "pop.yaml"
    p.write_text("model:\n  name: popularity\n")
    assert load_job(p).model.name == "popularity"
    # a key of another variant is an error, not silently dropped
    assert "unknown key 'model.hidden'" in error_of(job, ["model.name=popularity"])


def test_typo_names_file_line_key_and_suggestion(job):
    job.write_text(JOB.replace("  epochs: 3", "  epochz: 3"))
    msg = error_of(job)
    assert f"{job}:7" in msg
    assert "unknown key 'train.epochz'" in msg
    assert "train.epochs" in msg  # nearest valid key


def test_misplaced_key_suggests_its_real_path(job):
    msg = error_of(job, ["train.lr=3e-4"])
    assert "override 'train.lr=3e-4'" in msg
    assert "did you mean train.optim.lr" in msg


def test_wrong_type_names_key_and_given_value(job):
    msg = error_of(job, ["train.optim.lr=fast"])
    assert "train.optim.lr" in msg and "'fast'" in msg and "valid number" in msg


def test_out_of_range_value(job):
    job.write_text(JOB.replace("hidden: 32", "hidden: 32\n  dropout: 1.5"))
    msg = error_of(job)
    assert f"{job}:6" in msg and "model.dropout" in msg and "less than 1" in msg and "1.5" in msg


def test_cross_field_rule_explains_fix(job):
    msg = error_of(job, ["model.num_heads=3"])
    assert "divisible by num_heads (3)" in msg


def test_mid_epoch_checkpoints_are_refused_for_the_joint_model_at_load(tmp_path):
    """The staged joint loop resumes from epoch ends only: a job asking for mid-epoch checkpoints is
    refused when it is loaded (it used to warn at run time and checkpoint per epoch anyway)."""
    from rayrec.config.loader import load_model

    job = tmp_path / "ur4rec.yaml"
    job.write_text("model:\n  name: ur4rec\nrun:\n  checkpoint:\n    every_n_steps: 50\n")
    with pytest.raises(ConfigError) as e:
        load_model(JobConfig, job)
    assert "run.checkpoint.every_n_steps" in str(e.value) and "end of every epoch" in str(e.value)
    job.write_text("model:\n  name: sasrec\nrun:\n  checkpoint:\n    every_n_steps: 50\n")
    assert load_model(JobConfig, job).run.checkpoint.every_n_steps == 50


def test_test_metric_refused_for_early_stopping(job):
    msg = error_of(job, ["train.early_stopping.metric=test/ndcg@10"])
    assert "validation metric" in msg


def test_override_values_are_never_evaluated(job, tmp_path):
    marker = tmp_path / "pwned"
    msg = error_of(job, [f"run.name=__import__('os').system('touch {marker}')"])
    assert not marker.exists()
    assert "run.name" in msg


def test_bad_override_syntax_and_missing_file(job, tmp_path):
    assert "key=value" in error_of(job, ["train.epochs"])
    assert "no such job file" in error_of(tmp_path / "nope.yaml")


def test_override_into_a_value_is_an_error(job):
    assert "'train.epochs' is a value" in error_of(job, ["train.epochs.x=1"])


def test_dump_and_flatten_round_trip(job, tmp_path):
    cfg = load_job(job, ["train.optim.lr=0.005"])
    again = tmp_path / "again.yaml"
    again.write_text(dump_job(cfg))
    assert load_job(again) == cfg
    flat = flatten(cfg)
    assert flat["train.optim.lr"] == 0.005 and flat["model.name"] == "sasrec"


def test_config_paths_cover_all_variants():
    paths = config_paths(JobConfig)
    assert "train.optim.lr" in paths and "model.loss.gbce_t" in paths and "scaling.resources_per_worker" in paths


def test_every_shipped_job_file_loads():
    root = Path(__file__).resolve().parents[1] / "jobs"
    files = sorted(root.glob("*.yaml"))
    assert files, "no job files shipped"
    from rayrec.config import load_model
    from rayrec.config.kinds import kind_of_file
    from rayrec.config.loader import read_yaml

    for f in files:  # each by the schema of its kind (the rule sweeps use: a grpo, sids or prompts section)
        load_model(kind_of_file(read_yaml(f)[0]).schema, f)


def test_overrides_pick_list_items_by_name_or_index():
    job = Path(__file__).resolve().parents[1] / "jobs" / "sasrec_progressive.yaml"
    cfg = load_job(job, ["train.phases.embeddings.until_epoch=2", "train.phases.1.lr_mult=0.25",
                         "train.optim.groups.0.lr_mult=3"])
    assert [p.until_epoch for p in cfg.train.phases] == [2, None] and cfg.train.phases[1].lr_mult == 0.25
    assert cfg.train.optim.groups[0].lr_mult == 3
    with pytest.raises(ConfigError, match=r"train.phases has no item named 'warm' \(items: 0:embeddings, 1:all\)"):
        load_job(job, ["train.phases.warm.until_epoch=2"])
    with pytest.raises(ConfigError, match="index 5 is out of range"):
        load_job(job, ["train.phases.5.lr_mult=2"])


def test_a_bad_value_picked_by_name_is_blamed_on_the_override():
    job = Path(__file__).resolve().parents[1] / "jobs" / "sasrec_progressive.yaml"
    with pytest.raises(ConfigError, match=r"override 'train.phases.all.lr_mult=-1'"):
        load_job(job, ["train.phases.all.lr_mult=-1"])
    with pytest.raises(ConfigError, match=r"'train.eval.ks.0' is a value, not a section"):
        load_job(job, ["train.eval.ks.0.x=1"])


# --- every field documented -------------------------------------------------------------------


def _models_below(annotation) -> list[type]:
    """Models in a field's type at any depth: Optional, list, dict, Union, Annotated, tagged unions."""
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_below(arg)]


def undocumented(*roots: type) -> list[str]:
    """``Model.field`` of every field without a description in the models reachable from ``roots``."""
    seen, missing = list(roots), []
    for model in seen:  # grows while walking
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                missing.append(f"{model.__name__}.{name}")
            seen.extend(m for m in _models_below(field.annotation) if m not in seen)
    return missing


def test_the_description_check_walks_nested_and_tagged_models():
    from typing import Annotated, Literal

    from pydantic import BaseModel, Field

    class Leaf(BaseModel):
        x: int = 0

    class A(BaseModel):
        name: Literal["a"] = Field("a", description="tag")

    class B(BaseModel):
        name: Literal["b"] = Field("b", description="tag")
        z: int = Field(0, description=" ")

    class Root(BaseModel):
        opt: Leaf | None = Field(None, description="an optional section")
        items: list[Annotated[A | B, Field(discriminator="name")]] = Field(default_factory=list, description="tagged")
        named: dict[str, list[Leaf]] = Field(default_factory=dict, description="a mapping")

    assert undocumented(Root) == ["Leaf.x", "B.z"]


def test_every_field_of_every_config_model_has_a_description():
    """RecBole/TRL style: each field of a job or search-space file says once what it is and its unit or
    meaning (``Field(description=...)``)."""
    import importlib
    import inspect
    import pkgutil

    from pydantic import BaseModel

    import rayrec.config
    from rayrec.config.genrec import GenRecJobConfig, GRPOJobConfig
    from rayrec.tune.space import SearchSpace

    roots = [JobConfig, GenRecJobConfig, GRPOJobConfig, SearchSpace]
    for info in pkgutil.iter_modules(rayrec.config.__path__):  # and any other model defined in rayrec/config
        module = importlib.import_module(f"rayrec.config.{info.name}")
        roots += [c for _, c in inspect.getmembers(module, inspect.isclass)
                  if issubclass(c, BaseModel) and c.__module__ == module.__name__ and c not in roots]
    missing = sorted(set(undocumented(*roots)))
    assert not missing, f"fields without a description: {', '.join(missing)}"


def test_a_secret_in_a_bad_job_override_is_masked(job):
    msg = error_of(job, ["tracking.password=hunter2", "tracking.enabled=http://bob:hunter2@mlflow.example"])
    assert "hunter2" not in msg
    assert "override 'tracking.password=***'" in msg and "(given: 'http://bob:***@mlflow.example')" in msg
