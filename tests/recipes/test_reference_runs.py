"""Pinned reference runs: each recipe end to end through the CLI, its numbers equal to a checked-in run.

One tiny job per recipe (a shipped ``jobs/*.yaml`` shrunk by overrides) runs with ``rayrec train|sft|grpo
--local``; its per-epoch (``train``) or per-step (``sft``, ``grpo``) metrics and its final test metrics
must equal ``reference/<name>.json`` within ``RTOL``/``ATOL`` (``conftest.py``). The command itself is
recorded there too, so editing a job here without regenerating fails as well.

Regenerate on purpose, then review the diff::

    RAYREC_REGEN_REFERENCE=1 pytest tests/recipes -m "slow or not slow"
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_argv(pin, job: str, data, tmp_path, *overrides: str) -> list:
    """``rayrec train JOB --local`` on ``data``, writing under ``tmp_path``, plus ``overrides``."""
    return ["train", pin.jobs / job, "--local", "--json", tmp_path / "final.json",
            f"data.path={data}", "data.prepare_if_missing=false",
            f"run.storage_path={tmp_path}/runs", "run.name=ref", *overrides]


def check_train(pin, name: str, argv: list, data, tmp_path, tracking: list[str]) -> None:
    pin.cli(*argv, *tracking)
    pin.check(name, {"command": pin.portable(argv, data=data, tmp=tmp_path),
                     **pin.epochs(tmp_path / "runs" / "ref", tmp_path / "final.json")})


def test_sequential_sasrec(pin, tiny_dataset, tmp_path, tracking):
    """SASRec (``jobs/quickstart.yaml``): 3 epochs of sliding windows, full-ranking evaluation."""
    argv = train_argv(pin, "quickstart.yaml", tiny_dataset, tmp_path,
                      "model.hidden=16", "model.num_blocks=1", "model.max_len=20",
                      "train.epochs=3", "train.batch_size=32")
    check_train(pin, "sequential_sasrec", argv, tiny_dataset, tmp_path, tracking)


def test_sequential_multi_interest(pin, tiny_dataset, tmp_path, tracking):
    """The multi-interest model (``jobs/multi_interest_quickstart.yaml``): its 3 phases, an epoch each."""
    argv = train_argv(pin, "multi_interest_quickstart.yaml", tiny_dataset, tmp_path,
                      "model.hidden=16", "model.num_blocks=1", "model.max_len=20", "model.vae.latent=8",
                      "model.complex.dim=8", "train.epochs=3", "train.phases.components.until_epoch=1",
                      "train.phases.joint.until_epoch=2", "train.batch_size=32")
    check_train(pin, "sequential_multi_interest", argv, tiny_dataset, tmp_path, tracking)


def test_joint_ur4rec(pin, tiny_mm_dataset, tmp_path, tracking, tiny_joint_overrides):
    """UR4Rec (``jobs/ur4rec_quickstart.yaml``): its four stages, one epoch each, on hash-text and
    descriptor-image features (no weights) computed by the run."""
    argv = train_argv(pin, "ur4rec_quickstart.yaml", tiny_mm_dataset, tmp_path, *tiny_joint_overrides(tmp_path))
    check_train(pin, "joint_ur4rec", argv, tiny_mm_dataset, tmp_path, tracking)


# ----------------------------------------------------------------------------- generative recommendation


@pytest.fixture(scope="module")
def genrec(pin, tiny_dataset, tmp_path_factory, tracking, one_torch_thread) -> SimpleNamespace:
    """``rayrec sft jobs/genrec_tiny.yaml --local --eval`` once for the module (GRPO continues its adapter).

    Semantic IDs: a fixed grid index (``sids.method=file``), as embedding item text needs MiniLM weights.
    """
    from rayrec.data.dataset import open_prepared
    from rayrec.genrec.semantic_ids import write_index
    from rayrec.genrec.tiny import grid_index

    tmp = tmp_path_factory.mktemp("genrec")
    write_index(grid_index(open_prepared(tiny_dataset).table("items")), tmp / "sids", "items")
    common = [f"data.path={tiny_dataset}", "data.prepare_if_missing=false", "sids.method=file",
              f"sids.dir={tmp}/sids", "model.tiny={hidden: 32, layers: 1, heads: 2, kv_heads: 1}",
              "model.max_length=96", "prompts.max_history=3", "train.lora={r: 4, alpha: 8, dropout: 0.0}",
              "train.logging_steps=1", "train.val_rows=8", "eval.num_beams=10", "eval.ks=[1,5,10]",
              "eval.batch_size=16", "eval.max_rows=24", f"run.storage_path={tmp}/runs"]
    sft = ["sft", pin.jobs / "genrec_tiny.yaml", "--local", "--eval", *common, "prompts.max_examples=320",
           "train.epochs=1", "train.batch_size=32", "train.warmup_ratio=0"]
    pin.cli(*sft, *tracking)
    return SimpleNamespace(tmp=tmp, data=tiny_dataset, common=common, sft=sft,
                           sft_dir=tmp / "runs" / "genrec_tiny")


def test_sft(pin, genrec):
    """LoRA SFT of the tiny Qwen2-shaped model on the job's four prompt tasks: 10 steps, validation
    ranking of 8 rows, then constrained beam search on 24 test rows."""
    pin.check("sft", {"command": pin.portable(genrec.sft, data=genrec.data, tmp=genrec.tmp),
                      **pin.steps(genrec.sft_dir)})


def test_grpo(pin, genrec, tracking):
    """GRPO of the SFT adapter: 3 steps of 4 prompts x 4 beam-search completions, ranking reward, KL."""
    argv = ["grpo", pin.jobs / "genrec_tiny_grpo.yaml", "--local", "--eval", *genrec.common,
            f"grpo.adapter={genrec.sft_dir}", "prompts.max_examples=48", "train.max_steps=3",
            "train.batch_size=16", "train.save_steps=3", "train.lr=2e-3", "grpo.num_generations=4",
            "grpo.add_gt=true", "grpo.beta=0.05"]
    pin.cli(*argv, *tracking)
    pin.check("grpo", {"command": pin.portable(argv, data=genrec.data, tmp=genrec.tmp),
                       **pin.steps(genrec.tmp / "runs" / "genrec_tiny_grpo")})
