"""LoRA SFT through the real entry points: DeepSpeed on CPU, and Ray Train workers + Ray evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayrec.config.genrec import GenRecJobConfig
from rayrec.data.dataset import open_prepared
from rayrec.genrec.semantic_ids import write_index
from rayrec.genrec.tiny import grid_index

REPO = Path(__file__).resolve().parents[1]


def job_dict(dataset: Path, tmp: Path, **train) -> dict:
    """A job that trains a few steps on the shared 120-item dataset (with a fixed SID index)."""
    write_index(grid_index(open_prepared(dataset).table("items")), tmp / "sids", "items")
    return {
        "data": {"path": str(dataset), "prepare_if_missing": False},
        "sids": {"method": "file", "dir": str(tmp / "sids"), "name": "items"},
        "prompts": {"tasks": {"sid_seq": 1.0}, "max_history": 3, "max_examples": 64},
        "model": {"tiny": {"hidden": 32}, "max_length": 96},
        "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "logging_steps": 1, "val_rows": 8,
                  "lora": {"r": 4, "alpha": 8}, **train},
        "eval": {"num_beams": 5, "ks": [1, 5], "batch_size": 8, "max_rows": 12},
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 0.5}},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "tests"},
        "run": {"name": "g", "storage_path": str(tmp / "runs")},
    }


@pytest.mark.slow  # 80-110 s of DeepSpeed's CPU start; the slow Ray DeepSpeed runs cover the same path
def test_one_sft_step_through_deepspeed_on_cpu(tiny_dataset, tmp_path):
    """`rayrec sft --local train.deepspeed=zero2`: one optimizer step of the DeepSpeed engine (gloo, CPU).

    A subprocess, because DeepSpeed and accelerate keep process-wide state.
    """
    cfg = job_dict(tiny_dataset, tmp_path, batch_size=8, val_rows=0)
    cfg["prompts"]["max_examples"] = 8  # 8 prompts / batch 8 = exactly one step
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "rayrec", "sft", str(path), "--local", "train.deepspeed=zero2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "runs" / "g" / "checkpoints" / "checkpoint-1"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and state["log_history"][0]["train/loss"] > 0
    zero = list((ckpt / "global_step1").glob("*zero_pp_rank_0*optim_states.pt"))
    assert zero, f"no ZeRO optimizer shard in {ckpt}: {sorted(p.name for p in ckpt.rglob('*'))}"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "genrec.json").is_file()


def test_ray_train_sft_then_sharded_evaluation(ray_session, tiny_dataset, tmp_path):
    from rayrec import recipes
    from rayrec.genrec.evaluate import evaluate_adapter

    cfg = GenRecJobConfig.model_validate(job_dict(tiny_dataset, tmp_path))
    out = recipes.run(cfg)
    assert out.checkpoint and out.checkpoint.endswith("/checkpoint") and "val/ndcg@5" in out.metrics
    assert {"adapter_model.safetensors", "tokenizer.json", "trainer_state.json", "genrec.json",
            "sids.index.json"} <= {p.name for p in Path(out.checkpoint).iterdir()}
    two = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": 2,
                                                                          "resources_per_worker": {"CPU": 0.5}})})
    res = evaluate_adapter(two, out.checkpoint)  # two Ray tasks, merged in row order
    local = evaluate_adapter(cfg, out.checkpoint, local=True, out=tmp_path / "local.json")
    assert res.metrics["test/invalid"] == 0 and res.metrics["test/rows"] == 12
    assert [r["predictions"] for r in res.rows] == [r["predictions"] for r in local.rows]


@pytest.mark.slow
def test_ray_train_sft_with_deepspeed_zero2(ray_session, tiny_dataset, tmp_path):
    from rayrec import recipes

    cfg = GenRecJobConfig.model_validate(job_dict(tiny_dataset, tmp_path, deepspeed="zero2"))
    out = recipes.run(cfg)
    assert out.checkpoint and list(Path(out.checkpoint).glob("global_step*/*optim_states.pt"))
