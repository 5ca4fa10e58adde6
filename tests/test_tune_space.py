"""Search-space files: parsing, conversion of every distribution, conditions, and the errors
that must stop a sweep before Ray starts (no Ray is used in this file)."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from rayrec.config import dump_job, load_job, load_model
from rayrec.config.genrec import GenRecJobConfig
from rayrec.config.kinds import GENREC, SEQUENTIAL, kind_of_file
from rayrec.errors import ConfigError
from rayrec.tune.paths import PathError, get_path, locate, set_paths
from rayrec.tune.reports import objective_key
from rayrec.tune.space import OptunaSpace, load_space, to_optuna
from rayrec.tune.trial import TrialPlan, trial_job

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def job_file(tiny_job, tmp_path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(dump_job(tiny_job))
    return path


def write_space(tmp_path: Path, job_file: Path, **fields) -> Path:
    space = {"job": job_file.name, "metric": "val/ndcg@10", "num_samples": 4,
             "params": {"train.optim.lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-2}}, **fields}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def draws(space_path: Path, n: int = 60, sampler=None) -> list[dict]:
    sweep = load_space(space_path)
    study = optuna.create_study(sampler=sampler or optuna.samplers.RandomSampler(seed=0))
    fn = OptunaSpace(sweep.space.params, sweep.order)
    return [fn(study.ask()) for _ in range(n)]


# --- shipped spaces ---------------------------------------------------------------------------


def test_sasrec_quick_parses_against_the_quickstart_job():
    sweep = load_space(ROOT / "search_spaces" / "sasrec_quick.yaml")
    assert sweep.order == ["train.optim.lr", "model.dropout", "model.hidden", "model.max_len"]
    assert sweep.job_source == (ROOT / "jobs" / "quickstart.yaml").resolve()
    assert sweep.max_epochs == 8 and sweep.space.resolved_mode == "max"
    assert sweep.job.train.early_stopping.patience == 3  # the space's own job override


def test_ur4rec_switch_parses_against_the_joint_job():
    sweep = load_space(ROOT / "search_spaces" / "ur4rec_switch.yaml")
    assert "model.stages.joint_finetune.strategies.adaptive_alternating.threshold" in sweep.order
    assert sweep.job.model.name == "ur4rec"


# --- conversion -------------------------------------------------------------------------------


def test_every_distribution_converts_and_samples_inside_its_range(tmp_path, job_file):
    params = {
        "train.optim.lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-2},
        "model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.5},
        "train.optim.weight_decay": {"dist": "quniform", "low": 0.0, "high": 0.1, "q": 0.025},
        "train.optim.grad_clip": {"dist": "qloguniform", "low": 0.1, "high": 10.0, "q": 0.1},
        "model.max_len": {"dist": "int", "low": 10, "high": 40, "step": 10},
        "train.batch_size": {"dist": "int", "low": 8, "high": 64, "log": True},
        "model.hidden": {"dist": "choice", "values": [16, 32]},
    }
    sweep = load_space(write_space(tmp_path, job_file, params=params))
    dists = {k: to_optuna(p) for k, p in sweep.space.params.items()}
    assert dists["train.optim.lr"].log and dists["train.optim.lr"].low == 1e-4
    assert not dists["model.dropout"].log and dists["model.dropout"].step is None
    assert dists["train.optim.weight_decay"].step == 0.025
    assert dists["train.optim.grad_clip"].log  # quantised after drawing
    assert dists["model.max_len"].step == 10 and dists["train.batch_size"].log
    assert list(dists["model.hidden"].choices) == [16, 32]

    for d in draws(tmp_path / "space.yaml"):
        assert 1e-4 <= d["train.optim.lr"] <= 1e-2
        assert 0.0 <= d["model.dropout"] <= 0.5
        assert math.isclose(d["train.optim.weight_decay"] / 0.025, round(d["train.optim.weight_decay"] / 0.025))
        clip = d["train.optim.grad_clip"]
        assert 0.1 <= clip <= 10.0 and math.isclose(clip * 10, round(clip * 10), abs_tol=1e-9)
        assert d["model.max_len"] in (10, 20, 30, 40)
        assert 8 <= d["train.batch_size"] <= 64 and isinstance(d["train.batch_size"], int)
        assert d["model.hidden"] in (16, 32)


def test_tpe_with_a_seed_is_reproducible(tmp_path, job_file):
    path = write_space(tmp_path, job_file)
    first = draws(path, 12, optuna.samplers.TPESampler(seed=3, n_startup_trials=2))
    second = draws(path, 12, optuna.samplers.TPESampler(seed=3, n_startup_trials=2))
    assert first == second and len({d["train.optim.lr"] for d in first}) == 12


def test_conditional_param_is_drawn_only_when_its_parent_matches(tmp_path, job_file):
    params = {
        "model.loss.name": {"dist": "choice", "values": ["ce", "bce", "gbce"]},
        "model.loss.gbce_t": {"dist": "uniform", "low": 0.2, "high": 0.9, "when": {"model.loss.name": "gbce"}},
        "model.loss.num_negatives": {"dist": "int", "low": 1, "high": 8,
                                     "when": {"model.loss.name": ["bce", "gbce"]}},
    }
    sweep = load_space(write_space(tmp_path, job_file, params=params))
    assert sweep.order[0] == "model.loss.name"
    seen = set()
    for d in draws(tmp_path / "space.yaml"):
        seen.add(d["model.loss.name"])
        assert ("model.loss.gbce_t" in d) == (d["model.loss.name"] == "gbce")
        assert ("model.loss.num_negatives" in d) == (d["model.loss.name"] != "ce")
    assert seen == {"ce", "bce", "gbce"}


def test_condition_on_the_base_job_is_decided_at_load_time(tmp_path, job_file):
    ok = {"model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.3, "when": {"model.name": "sasrec"}}}
    sweep = load_space(write_space(tmp_path, job_file, params=ok))
    assert not sweep.space.params["model.dropout"].when  # always true for this job
    never = {"model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.3, "when": {"model.loss.name": "bce"}}}
    with pytest.raises(ConfigError, match="base job has 'ce', so it would never be used"):
        load_space(write_space(tmp_path, job_file, params=never))


# --- overrides and the trial's job ------------------------------------------------------------


def test_overrides_go_to_the_space_or_to_the_base_job(tmp_path, job_file):
    path = write_space(tmp_path, job_file)
    sweep = load_space(path, ["num_samples=2", "scheduler.grace_period=2", "train.epochs=5"])
    assert sweep.space.num_samples == 2 and sweep.space.scheduler.grace_period == 2
    assert sweep.job.train.epochs == 5 and sweep.max_epochs == 5


def test_trial_job_sets_values_metric_epochs_and_resources(tiny_job):
    plan = TrialPlan(sweep="s", sweep_dir="/tmp/s", base=tiny_job.model_dump(mode="json"), job_source="job.yaml",
                     metric="val/hr@10", mode="max", epochs=7,
                     scaling={"num_workers": 1, "use_gpu": False, "resources_per_worker": {"CPU": 0.25}},
                     tracking_uri=None, parent_run_id=None, searched=["model.dropout"])
    cfg = trial_job(plan, {"model.dropout": 0.35, "train.optim.lr": 0.01}, name="s-t1")
    assert cfg.model.dropout == 0.35 and cfg.train.optim.lr == 0.01 and cfg.train.epochs == 7
    assert cfg.train.early_stopping.metric == "val/hr@10" and cfg.scaling.resources_per_worker == {"CPU": 0.25}
    assert cfg.run.name == "s-t1" and objective_key("val/hr@10") == "best/val/hr@10"
    with pytest.raises(ConfigError, match="trial s-t2"):
        trial_job(plan, {"model.dropout": 1.5}, name="s-t2")


def test_paths_pick_list_items_by_name_or_index():
    data = {"model": {"stages": [{"name": "a", "lr": {}}, {"name": "b", "strategies": [{"name": "x", "t": 1}]}]}}
    assert locate(data, "model.stages.b.strategies.x.t") == ["model", "stages", 1, "strategies", 0, "t"]
    assert get_path(data, "model.stages.1.strategies.0.t") == 1
    assert get_path(data, "model.stages.a.lr.sasrec") is None  # a dict may gain a key
    out = set_paths(data, {"model.stages.b.strategies.x.t": 5, "model.stages.a.lr.sasrec": 0.1})
    assert out["model"]["stages"][1]["strategies"][0]["t"] == 5 and out["model"]["stages"][0]["lr"] == {"sasrec": 0.1}
    assert data["model"]["stages"][1]["strategies"][0]["t"] == 1  # a copy
    with pytest.raises(PathError, match="no item named 'c'.*0:a, 1:b"):
        locate(data, "model.stages.c.lr")
    with pytest.raises(PathError, match="index 5 is out of range"):
        locate(data, "model.stages.5.lr")


# --- errors before anything starts ------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"params": {"train.optim.lrr": {"dist": "uniform", "low": 0.1, "high": 0.2}}},
     r"space.yaml:\d+: 'train.optim.lrr' is not a job config path; did you mean train.optim.lr\b"),
    ({"params": {"train.optim": {"dist": "uniform", "low": 0.1, "high": 0.2}}},
     "'train.optim' is a section, not a value; search one of its keys: train.optim.lr"),
    ({"params": {"scaling.num_workers": {"dist": "int", "low": 1, "high": 2}}},
     "cannot be searched: trial resources are set in the space's `trial` section"),
    ({"params": {"train.optim.lr": {"dist": "loguniform", "low": 0.0, "high": 0.1}}},
     r"space.yaml:\d+: params.train.optim.lr: loguniform needs positive bounds"),
    ({"params": {"model.hidden": {"dist": "choice", "values": []}}},
     "choice needs at least one value"),
    ({"params": {"model.hidden": {"dist": "gaussian", "low": 1, "high": 2}}},
     "`dist` must be one of uniform, loguniform"),
    ({"params": {"model.dropout": {"dist": "uniform", "low": 0.0, "high": 1.0}}},
     r"params.model.dropout: the job schema rejects model.dropout=1.0: model.sasrec.dropout: Input should be less than 1"),
    ({"params": {"model.hidden": {"dist": "choice", "values": ["wide"]}}},
     "the job schema rejects model.hidden='wide'"),
    ({"num_samples": None}, "num_samples must be a positive number of trials"),
    ({"num_samples": 0}, "num_samples must be a positive number of trials"),
    ({"metric": "test/ndcg@10"}, "'test/ndcg@10' is a test metric; a sweep must select on a validation metric"),
    ({"metric": "val/ndcg@10", "mode": "min"}, "mode 'min' would search for the worst model"),
    ({"metric": "val/ndcg@5"}, r"metric val/ndcg@5 needs k=5 in the job's train.eval.ks \(has \[10\]\)"),
    ({"num_sample": 3}, "unknown key 'num_sample'; did you mean num_samples"),
    ({"scheduler": {"name": "asha", "grace_period": 3}}, r"grace_period \(3\) must be below the trial's epochs \(3\)"),
    ({"searcher": {"points_to_evaluate": [{"model.dropout": 0.1}]}}, "sets model.dropout, which are not searched"),
    ({"params": {"train.optim.lr": {"dist": "uniform", "low": 0.1, "high": 0.2, "when": {"model.hidden": 32}}}},
     "searched only when model.hidden is 32, but the base job has 16"),
    ({"job": "missing.yaml"}, "job 'missing.yaml' not found"),
])
def test_bad_space_fails_with_one_clear_message(tmp_path, job_file, fields, message):
    with pytest.raises(ConfigError, match=message):
        load_space(write_space(tmp_path, job_file, **fields))


def test_condition_must_test_a_searched_choice(tmp_path, job_file):
    params = {"model.hidden": {"dist": "int", "low": 16, "high": 32, "step": 16},
              "model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.3, "when": {"model.hidden": 16}}}
    with pytest.raises(ConfigError, match="depends on model.hidden, which is searched as int"):
        load_space(write_space(tmp_path, job_file, params=params))


def test_bad_job_override_names_the_job_file(tmp_path, job_file):
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'"):
        load_space(write_space(tmp_path, job_file), ["train.epoch=3"])


@pytest.mark.parametrize("override, secret, masked", [
    ("mode=http://bob:hunter2@mlflow.example/x", "hunter2", "mode=http://bob:***@mlflow.example/x"),
    ("num_samples=sk-live0123456789abcdefABCDEF", "sk-live0123456789abcdefABCDEF", "num_samples=<hidden"),
    ("trial.password=hunter2", "hunter2", "trial.password=***"),
    ("searcher.openai_api_key=hunter2", "hunter2", "searcher.openai_api_key=***"),
])
def test_a_bad_space_override_that_looks_like_a_secret_is_masked(tmp_path, job_file, override, secret, masked):
    """The space's errors come from the loader's explainer, which masks what it echoes (rayrec.secrets)."""
    with pytest.raises(ConfigError) as e:
        load_space(write_space(tmp_path, job_file), [override])
    assert secret not in str(e.value) and masked in str(e.value)
    assert str(e.value).startswith(f"{tmp_path / 'space.yaml'}: override '")


def test_shipped_job_loads(job_file):
    assert load_job(job_file).model.hidden == 16


# --- generative base jobs (GenRecJobConfig) ---------------------------------------------------


@pytest.fixture
def genrec_job_file(tmp_path) -> Path:
    """A small generative job (validated only: nothing is prepared or trained here)."""
    job = {"data": {"path": str(tmp_path / "data")}, "sids": {"method": "file", "dir": str(tmp_path / "sids")},
           "prompts": {"tasks": {"sid_seq": 1.0}}, "model": {"tiny": {"hidden": 32}, "max_length": 96},
           "train": {"epochs": 2, "val_rows": 8, "lora": {"r": 4, "alpha": 8}},
           "eval": {"num_beams": 5, "ks": [1, 5]}}
    path = tmp_path / "genrec_job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def test_lora_sft_parses_against_the_genrec_job():
    sweep = load_space(ROOT / "search_spaces" / "lora_sft.yaml")
    assert sweep.kind is GENREC and isinstance(sweep.job, GenRecJobConfig)
    assert sweep.order == ["train.lora.r", "train.lora.alpha", "train.lora.dropout", "train.lr"]
    assert sweep.job_source == (ROOT / "jobs" / "genrec_tiny.yaml").resolve()
    assert sweep.job.train.epochs == 4 and sweep.job.train.val_rows == 128  # the space's own job overrides
    assert sweep.max_epochs == 4 and sweep.space.resolved_mode == "max"


def test_job_kind_comes_from_the_generative_sections():
    assert kind_of_file({"sids": {}, "train": {"lora": {}}}) is GENREC
    assert kind_of_file({"prompts": {"max_history": 3}}) is GENREC
    assert kind_of_file({"model": {"name": "sasrec"}, "train": {"epochs": 3}}) is SEQUENTIAL
    assert load_space(ROOT / "search_spaces" / "sasrec_quick.yaml").kind is SEQUENTIAL


def test_genrec_overrides_go_to_the_base_job(tmp_path, genrec_job_file):
    sweep = load_space(write_space(tmp_path, genrec_job_file, metric="val/ndcg@5",
                                   params={"train.lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-2}}),
                       ["num_samples=3", "eval.ks=[1,5]", "prompts.max_history=2", "train.epochs=3"])
    assert sweep.space.num_samples == 3 and sweep.job.prompts.max_history == 2 and sweep.max_epochs == 3


@pytest.mark.parametrize("fields, overrides, message", [
    ({"params": {"train.lora.alpah": {"dist": "choice", "values": [8, 16]}}}, [],
     r"genrec_space.yaml:\d+: 'train.lora.alpah' is not a job config path; did you mean train.lora.alpha\b"),
    ({"params": {"train.optim.lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-2}}}, [],
     r"'train.optim.lr': train has no key 'optim' \(keys: epochs, .*\); did you mean train.lr\?"),
    ({"params": {"model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.3}}}, [],
     r"'model.dropout' is not a job config path; did you mean train.lora.dropout\?"),
    ({"params": {"sids.levels": {"dist": "int", "low": 2, "high": 3}}}, [],
     "'sids.levels' cannot be searched: the semantic-ID index is built once"),
    ({"params": {"eval.num_beams": {"dist": "int", "low": 5, "high": 10}}}, [],
     "'eval.num_beams' cannot be searched: the validation ranking"),
    ({"params": {"train.lora.dropout": {"dist": "uniform", "low": 0.0, "high": 1.0}}}, [],
     r"the job schema rejects train.lora.dropout=1.0: train.lora.dropout: Input should be less than 1"),
    ({"metric": "val/ndcg@10"}, [], r"metric val/ndcg@10 needs k=10 in the job's eval.ks \(has \[1, 5\]\)"),
    ({"metric": "val/mrr"}, [], r"a generative job reports val/hr@K and val/ndcg@K .* not val/mrr"),
    ({}, ["train.val_rows=0"], r"the job decodes no validation rows \(train.val_rows=0\)"),
    ({}, ["train.epochs=2.5"], r"train.epochs \(2.5\) is not a whole number"),
    ({"scheduler": {"name": "asha", "grace_period": 2}}, [], r"grace_period \(2\) must be below the trial's epochs"),
])
def test_bad_genrec_space_fails_against_the_genrec_schema(tmp_path, genrec_job_file, fields, overrides, message):
    space = {"job": genrec_job_file.name, "metric": "val/ndcg@5", "num_samples": 2,
             "params": {"train.lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-2}}, **fields}
    path = tmp_path / "genrec_space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    with pytest.raises(ConfigError, match=message):
        load_space(path, overrides)


def test_genrec_path_on_a_sequential_job_is_refused(tmp_path, job_file):
    path = write_space(tmp_path, job_file, params={"train.lora.r": {"dist": "choice", "values": [4, 8]}})
    with pytest.raises(ConfigError, match="'train.lora.r': train has no key 'lora'"):
        load_space(path)


def test_genrec_trial_job_sets_values_epochs_and_resources(tmp_path, genrec_job_file):
    job = load_model(GenRecJobConfig, genrec_job_file)
    plan = TrialPlan(sweep="s", sweep_dir=str(tmp_path), base=job.model_dump(mode="json"), job_source="job.yaml",
                     metric="val/ndcg@5", mode="max", epochs=3,
                     scaling={"num_workers": 1, "use_gpu": False, "resources_per_worker": {"CPU": 0.25}},
                     tracking_uri=None, parent_run_id=None, searched=["train.lora.r"], kind=GENREC.name)
    cfg = trial_job(plan, {"train.lora.r": 8, "train.lr": 0.002}, name="s-t1")
    assert isinstance(cfg, GenRecJobConfig) and cfg.train.lora.r == 8 and cfg.train.lr == 0.002
    assert cfg.train.epochs == 3 and cfg.scaling.resources_per_worker == {"CPU": 0.25} and cfg.run.name == "s-t1"
    with pytest.raises(ConfigError, match="trial s-t2"):
        trial_job(plan, {"train.lora.dropout": 1.5}, name="s-t2")


def test_dry_run_of_the_lora_space(capsys):
    from rayrec.cli import main

    assert main(["tune", str(ROOT / "search_spaces" / "lora_sft.yaml"), "--dry-run", "num_samples=2"]) == 0
    out = capsys.readouterr().out
    assert "sweep lora_sft: 2 trials of" in out and "(genrec job)" in out and "compared at epochs 1, 2" in out
    assert out.count("train.lora.r=") == 5


def test_a_generative_job_without_its_sections_gets_a_hint(tmp_path, genrec_job_file):
    job = yaml.safe_load(genrec_job_file.read_text())
    del job["sids"], job["prompts"]  # valid for GenRecJobConfig (both have defaults), but read as sequential
    genrec_job_file.write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError, match=r"(?s)unknown key 'train.lora'.*taken as generative only when its top level has "
                                          r"a `sids` or `prompts` section"):
        load_space(write_space(tmp_path, genrec_job_file, metric="val/ndcg@5",
                               params={"train.lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-2}}))
    job["model"]["hiddden"] = 3  # not valid as either kind: no hint, just the error
    genrec_job_file.write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError) as err:
        load_space(write_space(tmp_path, genrec_job_file, metric="val/ndcg@5",
                               params={"train.lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-2}}))
    assert "taken as generative" not in str(err.value)


# --- GRPO base jobs (GRPOJobConfig) -------------------------------------------------------------


def test_grpo_space_parses_with_a_report_clock():
    from rayrec.config.genrec import GRPOJobConfig
    from rayrec.config.kinds import GRPO

    sweep = load_space(ROOT / "search_spaces" / "grpo.yaml")
    assert sweep.kind is GRPO and isinstance(sweep.job, GRPOJobConfig)
    assert sweep.order == ["grpo.beta", "train.lr", "train.max_grad_norm", "grpo.num_generations",
                           "grpo.rewards.rule", "grpo.rewards.semantic", "grpo.rewards.collaborative"]
    assert sweep.job.train.max_steps == 80 and sweep.job.train.save_steps == 20
    assert sweep.max_epochs == 4  # ASHA's clock: reports (one per checkpoint), not epochs
    assert kind_of_file({"grpo": {"beta": 0.0}, "sids": {}}) is GRPO


@pytest.mark.parametrize("params, overrides, message", [
    ({"train.lora.r": {"dist": "choice", "values": [4, 8]}}, [],
     "'train.lora.r' cannot be searched: the LoRA config is the SFT adapter's"),
    ({"grpo.adapter": {"dist": "choice", "values": ["a", "b"]}}, [],
     "'grpo.adapter' cannot be searched: every trial continues the same SFT adapter"),
    ({}, ["train.max_steps=null"], "a GRPO trial reports at each checkpoint .* set train.max_steps"),
    ({"train.save_steps": {"dist": "choice", "values": [10, 20]}}, [],
     "'train.save_steps' cannot be searched: with train.max_steps it sets the trial's report count"),
    ({"train.batch_size": {"dist": "choice", "values": [64, 12]}}, ["space:grpo.num_generations=4"],  # each fits alone
     r"the job schema rejects train.batch_size=12, grpo.num_generations=8: .*whole groups"),
    ({"train.batch_size": {"dist": "int", "low": 32, "high": 64}}, [],
     "'train.batch_size' is searched with train.batch_size, grpo.num_generations, which must fit together"),
    ({}, ["scheduler.max_epochs=3"], r"scheduler.max_epochs \(3\) differs from the GRPO trial's reports \(4"),
])
def test_bad_grpo_space_says_why(params, overrides, message):
    import tempfile

    space = yaml.safe_load((ROOT / "search_spaces" / "grpo.yaml").read_text())
    space["job"] = str(ROOT / "jobs" / "genrec_tiny_grpo.yaml")
    space["params"].update(params)
    space["overrides"] = space.get("overrides", []) + [o.removeprefix("space:") for o in overrides if o.startswith("space:")]
    overrides = [o for o in overrides if not o.startswith("space:")]  # a searched param's base value: in the space
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "space.yaml"
        path.write_text(yaml.safe_dump(space))
        with pytest.raises(ConfigError, match=message):
            load_space(path, overrides)


def test_grpo_trial_reports_count_as_the_clock():
    from rayrec.tune.reports import LAST_EPOCH_KEY, TIME_ATTR, Objective

    obj = Objective("val/ndcg@10", "max", last_epoch=2, steps_per_report=20)
    first = obj.complete({"epoch": 0.16, "step": 20, "val/ndcg@10": 0.2})  # HF's epoch here is a fraction
    last = obj.complete({"epoch": 0.32, "step": 40, "val/ndcg@10": 0.1})
    assert (first[TIME_ATTR], last[TIME_ATTR]) == (1, 2) and last[LAST_EPOCH_KEY] and LAST_EPOCH_KEY not in first
    resumed = Objective("val/ndcg@10", "max", last_epoch=2, steps_per_report=20)  # a trial resumed at step 20
    assert resumed.complete({"epoch": 0.32, "step": 40, "val/ndcg@10": 0.1})[TIME_ATTR] == 2


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_loads_and_its_draws_are_valid_jobs(path, capsys):
    from rayrec.cli.tune import print_samples

    sweep = load_space(path)
    assert print_samples(sweep, n=0, checked=20) == 0, capsys.readouterr().out
