"""Checkpoint files: atomic writes, weights-only loading, RNG round trip, config differences."""

import logging
import random

import numpy as np
import pytest
import torch

from rayrec.config import dump_job
from rayrec.config.schema import JobConfig
from rayrec.train.checkpoint import (
    CheckpointError,
    checkpoint_name,
    config_diff,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
    warn_config_diff,
)


def test_save_load_round_trip_leaves_no_temp_files(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "history": [{"train/loss": 1.5}], "rng": rng_state()}
    save_state(state, tmp_path / "c")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["state.pt"]
    back = load_state(tmp_path / "c")
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["epoch"] == 3
    with pytest.raises(CheckpointError, match="missing/state.pt: no rayrec checkpoint here"):
        load_state(tmp_path / "missing")


def test_rng_state_restores_all_generators(tmp_path):
    save_state({"rng": rng_state()}, tmp_path)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(load_state(tmp_path)["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_config_diff_names_changed_keys(caplog):
    a = JobConfig()
    b = a.model_copy(deep=True)
    b.train.optim.lr = 0.01
    b.scaling.num_workers = 4
    diff = config_diff(dump_job(a), dump_job(b))
    assert diff == {"scaling.num_workers": (1, 4), "train.optim.lr": (0.001, 0.01)}
    with caplog.at_level(logging.WARNING):
        warn_config_diff(dump_job(a), dump_job(b))
    assert "train.optim.lr was 0.001 in the checkpoint, now 0.01" in caplog.text


def test_checkpoint_names():
    assert checkpoint_name({"epoch": 7, "val/ndcg@10": 0.1}) == "epoch_0007"
    assert checkpoint_name({"epoch": 7, "test/ndcg@10": 0.1}) == "final"
