"""Shared fixtures: one local Ray for the whole session, small prepared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private test cluster on 127.0.0.1
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(scope="session", autouse=True)
def _private_torch_extensions(tmp_path_factory):
    """JIT-built ops (DeepSpeed's CPU shared-memory comm) go to a folder of this session.

    torch waits forever on the lock file of a build that was killed half-way; a shared
    ``~/.cache/torch_extensions`` with such a lock would hang every later DeepSpeed test.
    Set before Ray starts, so workers inherit it.
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path_factory.mktemp("torch_extensions"))
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors run faster on one thread, and the test machine's cores are shared
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs, started once; tests that need Ray take this fixture.

    With the dashboard: its state API lets Ray Train remove the placement group of a run
    whose controller was killed (a sweep trial stopped by ASHA); without it the next trial
    cannot place its workers.
    """
    import ray

    from rayrec.cluster import quiet_ray_data, state_api_pinned

    if not ray.is_initialized():
        with state_api_pinned() as port:
            ray.init(num_cpus=2, include_dashboard=True, dashboard_port=port, logging_level="WARNING",
                     log_to_driver=True)
    quiet_ray_data()
    yield ray
    ray.shutdown()


def _synth(out: Path, **kw) -> Path:
    from rayrec.config.schema import FilterConfig
    from rayrec.data.dataset import source_reader
    from rayrec.data.prepare import prepare

    synth = {"users": 300, "items": 120, "topics": 4, "mean_len": 20, "seed": 0, "images": False, **kw}
    prepare(source_reader("synthetic", None, on_bad_line="error", synth=synth), out, source="synthetic",
            params={"synth": synth}, filters=FilterConfig(), split="leave_one_out")
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """300 users x 120 items of the synthetic source, leave-one-out, no images."""
    return _synth(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def tiny_mm_dataset(tmp_path_factory) -> Path:
    """Like ``tiny_dataset`` but with item PNGs (the joint model's image expert reads them)."""
    return _synth(tmp_path_factory.mktemp("data") / "tiny_mm", images=True)


@pytest.fixture
def tiny_job(tiny_dataset, tmp_path):
    """A small SASRec job on ``tiny_dataset`` writing runs and MLflow under ``tmp_path``.

    One training row per user (``windows: last``): tests count steps as users / batch size;
    the tests of sliding windows set them.
    """
    from rayrec.config.schema import JobConfig

    return JobConfig.model_validate({
        "data": {"path": str(tiny_dataset), "prepare_if_missing": False},
        "model": {"name": "sasrec", "hidden": 16, "num_blocks": 1, "dropout": 0.1, "max_len": 20},
        "train": {"epochs": 3, "batch_size": 32, "optim": {"lr": 0.005}, "shuffle_buffer": 0, "windows": "last",
                  "early_stopping": {"patience": 5}, "eval": {"ks": [10], "batch_size": 64}},
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 0.5}},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tests"},
        "run": {"name": "t", "storage_path": str(tmp_path / "runs"), "seed": 0},
    })


@pytest.fixture
def job_file(tiny_job, tmp_path):
    """``tiny_job`` (3 epochs) written to a job file: (path, config)."""
    from rayrec.config import dump_job

    cfg = tiny_job.model_copy(deep=True)
    cfg.train.epochs = 3
    path = tmp_path / "job.yaml"
    path.write_text(dump_job(cfg))
    return path, cfg


@pytest.fixture(scope="session")
def tiny_joint_overrides():
    """``overrides(folder)``: ``jobs/ur4rec_quickstart.yaml`` shrunk to seconds (width 16, one epoch per
    stage, hash-text and descriptor-image features, no weights, computed into ``folder``)."""
    def overrides(folder) -> list[str]:
        return ["model.sasrec.hidden=16", "model.sasrec.num_blocks=1", "model.sasrec.max_len=20",
                "model.retriever.hidden=16", "model.retriever.num_negatives=7",
                "model.retriever.train_positions=4", "model.fusion.top_n=40",
                "model.features.text_model=hash:32", "model.features.user_text=dataset",
                "model.features.item_text=dataset", f"model.features.dir={folder}/features",
                f"model.features.cache_dir={folder}/cache",
                "model.stages.pretrain_sasrec.epochs=1", "model.stages.pretrain_retriever.epochs=1",
                "model.stages.joint_finetune.epochs=1", "model.stages.end_to_end.epochs=1",
                "train.batch_size=32"]

    return overrides


@pytest.fixture(scope="session")
def sft(tiny_dataset, tmp_path_factory):
    """(common job sections, SFT adapter folder): a one-epoch LoRA SFT on the shared 120-item dataset."""
    from rayrec import recipes
    from rayrec.config.genrec import GenRecJobConfig
    from rayrec.data.dataset import open_prepared
    from rayrec.genrec.semantic_ids import write_index
    from rayrec.genrec.tiny import grid_index

    tmp = tmp_path_factory.mktemp("grpo")
    write_index(grid_index(open_prepared(tiny_dataset).table("items")), tmp / "sids", "items")
    common = {
        "data": {"path": str(tiny_dataset), "prepare_if_missing": False},
        "sids": {"method": "file", "dir": str(tmp / "sids"), "name": "items"},
        "model": {"tiny": {"hidden": 32}, "max_length": 96},
        "eval": {"num_beams": 10, "ks": [1, 5, 10], "batch_size": 16, "max_rows": 24},
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 0.5}},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "tests"},
    }
    cfg = GenRecJobConfig.model_validate({
        **common, "prompts": {"tasks": {"sid_seq": 1.0}, "max_history": 3, "max_examples": 320},
        "train": {"epochs": 1, "batch_size": 32, "lr": 5e-3, "logging_steps": 5, "val_rows": 0,
                  "lora": {"r": 4, "alpha": 8}},
        "run": {"name": "sft", "storage_path": str(tmp / "runs")}})
    out = recipes.run(cfg, local=True)
    return common, out.checkpoint, tmp


@pytest.fixture(scope="module")
def ft_job(tmp_path_factory):
    """Writes job YAMLs for the slow fault tests: 4 epochs of 19 batches, one worker, 2 failures allowed."""
    from rayrec.config import dump_job
    from rayrec.config.schema import JobConfig

    work = tmp_path_factory.mktemp("ft")
    data = _synth(work / "data", users=600, items=150, mean_len=20)

    def write(name: str, **run) -> Path:
        cfg = JobConfig.model_validate({
            "data": {"path": str(data), "prepare_if_missing": False},
            "model": {"name": "sasrec", "hidden": 16, "num_blocks": 1, "dropout": 0.1, "max_len": 20},
            "train": {"epochs": 4, "batch_size": 32, "optim": {"lr": 0.005}, "shuffle_buffer": 128,
                      "early_stopping": {"patience": 10}, "eval": {"ks": [10], "batch_size": 256}},
            "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 1}},
            "tracking": {"uri": f"sqlite:///{work}/mlflow.db", "experiment": "ft"},
            "run": {"name": name, "storage_path": str(work / "runs"), "seed": 0, "max_failures": 2, **run},
        })
        path = work / f"{name}.yaml"
        path.write_text(dump_job(cfg))
        return path

    write.work = work
    return write
