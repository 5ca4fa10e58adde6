"""``bench/gpu_check.py``: its figures on known numbers, its refusal without CUDA, and the whole
check at CPU size (``--cpu-smoke``) through its real command."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
SECTIONS = ["sasrec_bf16", "ddp", "joint_allreduce", "lora_sft", "grpo", "constrained_eval"]


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (its top level imports nothing heavy)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_flops_peaks_and_step_figures_on_known_numbers(gpu_check):
    assert gpu_check.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.peak_bf16_flops("NVIDIA A10") == 125e12  # not A100's
    assert gpu_check.peak_bf16_flops("CPU (2 cores)") is None
    # 0.5B parameters x 2,000 tokens a step: 6e12 FLOPs; in 0.02 s on one 989 TFLOP/s GPU: 30.3 %
    flops = gpu_check.lm_train_flops(500_000_000, 2_000)
    assert flops == 6e12
    assert gpu_check.mfu(flops, 0.02, 989e12) == pytest.approx(6e12 / 0.02 / 989e12)
    assert gpu_check.mfu(flops, 0.04, 989e12, devices=2) == pytest.approx(gpu_check.mfu(flops, 0.02, 989e12) / 4)
    assert gpu_check.mfu(flops, 0.02, None) is None and gpu_check.mfu(None, 0.02, 989e12) is None
    # step ends at 1.0 (warm-up), 1.5, 2.5, 3.0 from a start at 0: median of 0.5, 1.0, 0.5 without the first
    fig = gpu_check.step_figures([0.0, 1.0, 1.5, 2.5, 3.0], [0, 100, 300, 500, 700])
    assert fig == {"steps": 4.0, "step_s": 0.5, "tokens_per_step": 200.0}
    snippet = "WorkerGroupError: failed:\n[Rank 0]:\nTraceback...\n  File x\nCheckFailed: 2 of 20 steps ran\n"
    assert gpu_check.headline(snippet) == "CheckFailed: 2 of 20 steps ran"
    assert gpu_check.headline("ValueError: bad") == "ValueError: bad"


def test_without_cuda_it_refuses_and_names_the_flag(gpu_check, monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "g.json"
    assert gpu_check.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--cpu-smoke" in err
    assert not out.exists()


@pytest.mark.slow  # about a minute on 2 cores: 2 Ray Train runs of 2 workers, LoRA SFT and GRPO of a tiny Qwen2
def test_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "g.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu_smoke" and result["passed"] and result["versions"]["ray"]
    rows = {r["section"]: r for r in result["sections"]}
    assert list(rows) == SECTIONS
    for name, r in rows.items():
        assert r["passed"] and r["error"] is None, (name, r)
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["wall_s"] > 0, (name, r)
        assert r["peak_mem_bytes"] > 0 and r["peak_mem_kind"] == "max_rss", (name, r)
        assert r["mfu"] is None, (name, r)  # no bf16 peak to compare with on CPU
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), (name, r)
    assert rows["grpo"]["steps"] == result["sizes"]["grpo_steps"] == 2
    assert rows["grpo"]["train/reward"] > 0
    assert rows["lora_sft"]["steps"] == 3 and rows["lora_sft"]["deepspeed"] is None
    assert rows["ddp"]["backend"] == "gloo" and rows["ddp"]["workers"] == 2 and rows["ddp"]["ddp_wrapped"]
    assert rows["joint_allreduce"]["workers"] == 2 and rows["joint_allreduce"]["rank_spread"] == 0
    assert rows["constrained_eval"]["rows"] == 16 and 0 <= rows["constrained_eval"]["ndcg@5"] <= 1
    assert "ddp" in proc.stdout and "constrained_eval" in proc.stdout  # the table
