"""One check of every CUDA path of rayrec on one GPU machine: prints a table and writes JSON.

Each section runs rayrec's own code, as a job runs it, and is timed:

1. ``sasrec_bf16``: SASRec steps of rayrec's loop (``train.loop.train_epoch``: autocast bf16, the
   health check, clipping, AdamW) on the job's batches, in this process; FLOPs counted by torch.
2. ``ddp``: the sequential recipe's Ray Train worker (``train_loop_per_worker``: DDP via
   ``prepare_model``, ``fit``, ``all_reduce_sum`` of the metric sums) through ``rayrec.runs``' one
   ``TorchTrainer`` builder: NCCL, 2 workers when 2 GPUs are present, else 1 (Ray wraps DDP only
   for 2+ workers).
3. ``joint_allreduce``: the joint model's ``StageRunner`` steps with ``all_reduce_grads`` and
   ``all_reduce_sum`` (``rayrec.workers.torch``) inside the same kind of Ray Train workers, the
   joint recipe preparing its features; ranks must end with identical weights.
4. ``lora_sft``: the SFT recipe's Ray Train worker (TRL + PEFT LoRA, DeepSpeed ZeRO-2, NCCL) on a
   Qwen2.5-0.5B-shaped LM built from config with random weights and a word-level tokenizer made
   here (nothing is downloaded).
5. ``grpo``: the GRPO recipe's worker, 20 steps from that adapter (constrained beam rollouts,
   ranking reward, KL to the SFT policy), DeepSpeed ZeRO-2.
6. ``constrained_eval``: constrained beam search (``genrec.constrained.beam_rank``) over test rows
   with the GRPO adapter on the GPU, scored by ``genrec.evaluate`` (HR@K, NDCG@K).

Figures per section: median step time (first step left out), tokens/s, peak memory
(``torch.cuda.max_memory_allocated`` on GPU, the process's max RSS on CPU), MFU (achieved FLOP/s
over the GPU's dense bf16 peak; the LM's FLOPs are 6 x parameters x tokens), pass/fail. A failed
section prints its error and the script exits 1; without CUDA it exits 2 unless ``--cpu-smoke``.

    python bench/gpu_check.py                      # on a GPU machine, < 8 min on one H100/A100
    python bench/gpu_check.py --cpu-smoke --out /tmp/g.json   # the same paths at CPU size (< 2 min)

``--cpu-smoke`` shrinks every section (a 2-layer Qwen2 of width 32, a few SASRec steps, 2 GRPO
steps) and runs it on CPU: fp32 (rayrec's autocast is GPU-only), gloo instead of NCCL, 2 Ray
Train workers for DDP and the joint all-reduces, no DeepSpeed (its CPU start alone takes 80-110 s
on 2 cores; ``tests/test_genrec_ray.py`` covers it), and SFT and GRPO through the recipes' own
CPU path in this process (``rayrec sft --local``: the same TRL trainer, PEFT model and callbacks
without the Ray Train worker around them, whose start costs ~15 s a run on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NO_CUDA = ("no CUDA device is visible: this check needs a GPU. Pass --cpu-smoke to run the same paths "
           "at CPU size (gloo, fp32, no DeepSpeed)")

#: Dense bf16 peak FLOP/s by device-name fragment, most specific first ("A100" before "A10").
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12),
             ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
             ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12))

#: Qwen2.5-0.5B's shape (494M parameters with its tied 151,936-row embedding).
QWEN25_05B = {"vocab_size": 151936, "hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2,
              "intermediate": 4864, "tie_embeddings": True}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU check and the CPU smoke run."""

    users: int
    items: int
    mean_len: int
    max_len: int
    hidden: int
    blocks: int
    heads: int
    batch: int
    sasrec_steps: int  # timed steps of section 1 (after one counted warm-up step)
    epochs: int  # of the DDP job
    joint_steps: int
    ray_cpus: float  # CPUs per Ray Train worker
    lm: dict  # ``tiny_qwen2`` arguments (``vocab_size``: rows beyond the tokenizer's, as Qwen pads)
    sid_k: int  # grid SIDs: 3 levels of sid_k codes
    prompts: int  # SFT prompts (one epoch)
    lm_batch: int
    max_history: int
    max_length: int
    lora_r: int
    val_rows: int  # valid rows ranked by the trainers' validation callback
    grpo_steps: int
    generations: int
    grpo_batch: int  # completions per step (prompts x generations)
    eval_rows: int
    beams: int
    eval_batch: int
    deepspeed: str | None
    cpu_workers: int  # Ray Train workers of sections 2-3 without GPUs


GPU = Sizes(users=4000, items=4000, mean_len=100, max_len=100, hidden=256, blocks=2, heads=2, batch=256,
            sasrec_steps=20, epochs=2, joint_steps=20, ray_cpus=2.0, lm=QWEN25_05B, sid_k=16, prompts=1024,
            lm_batch=16, max_history=10, max_length=256, lora_r=16, val_rows=32, grpo_steps=20, generations=8,
            grpo_batch=64, eval_rows=256, beams=20, eval_batch=32, deepspeed="zero2", cpu_workers=1)
CPU_SMOKE = Sizes(users=200, items=100, mean_len=15, max_len=20, hidden=16, blocks=1, heads=1, batch=32,
                  sasrec_steps=4, epochs=1, joint_steps=3, ray_cpus=0.5,
                  lm={"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "tie_embeddings": True}, sid_k=8,
                  prompts=48, lm_batch=16, max_history=3, max_length=96, lora_r=4, val_rows=4, grpo_steps=2,
                  generations=4, grpo_batch=8, eval_rows=16, beams=5, eval_batch=8, deepspeed=None, cpu_workers=2)


class CheckFailed(Exception):
    """A section ran but its result is wrong (the message says what)."""


def require(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)


# ----------------------------------------------------------------------------- figures


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its ``torch.cuda.get_device_name``; None when unknown."""
    return next((peak for part, peak in PEAK_BF16 if part in device_name), None)


def lm_train_flops(params: int, tokens: float) -> float:
    """Training FLOPs of a causal LM over ``tokens`` (forward 2N + backward 4N per token)."""
    return 6.0 * params * tokens


def mfu(flops_per_step: float | None, step_s: float | None, peak: float | None, devices: int = 1) -> float | None:
    """Achieved FLOP/s over the devices' peak; None where any input is unknown (e.g. on CPU)."""
    if not flops_per_step or not step_s or not peak:
        return None
    return flops_per_step / step_s / (peak * devices)


def step_figures(marks: list[float], tokens: list[float] | None = None) -> dict[str, float]:
    """Median step time from step-end wall times (``marks[0]``: the start), the first step left out
    (compilation, allocator and cuBLAS warm-up); tokens per step likewise from cumulative counts."""
    times = [b - a for a, b in zip(marks, marks[1:])]
    out = {"steps": float(len(times)), "step_s": statistics.median(times[1:] or times) if times else math.nan}
    if tokens and len(tokens) > 1:
        per_step = [b - a for a, b in zip(tokens, tokens[1:])]
        out["tokens_per_step"] = statistics.median(per_step[1:] or per_step)
    return out


def peak_memory() -> dict[str, Any]:
    """This process's peak: CUDA memory allocated by torch on its device, else max RSS."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated()), "peak_mem_kind": "cuda_max_allocated"}
    return {"peak_mem_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
            "peak_mem_kind": "max_rss"}


class Clock:
    """Wall time at the end of each step, after the device finished its queued work."""

    def __init__(self) -> None:
        self.marks = [time.perf_counter()]

    def tick(self, *_: Any) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())


def hf_clock():
    """A ``TrainerCallback`` with a ``Clock`` over optimizer steps, the tokens seen at each (all ranks;
    TRL's GRPO counts its prompts and completions, the SFT trainer counts nothing) and the logged losses."""
    from transformers import TrainerCallback

    class HFClock(TrainerCallback):
        def __init__(self) -> None:
            self.clock, self.tokens, self.losses = Clock(), [0.0], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.clock, self.tokens = Clock(), [float(state.num_input_tokens_seen or 0)]

        def on_step_end(self, args, state, control, **kwargs):
            self.clock.tick()
            self.tokens.append(float(state.num_input_tokens_seen or 0))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in (logs or {}):
                self.losses.append(float(logs["loss"]))

        def figures(self) -> dict[str, Any]:
            return {**step_figures(self.clock.marks, self.tokens if self.tokens[-1] > 0 else None),
                    "losses": self.losses}

    return HFClock()


# ----------------------------------------------------------------------------- Ray Train workers, probed


def probe_run(loop: Callable[[dict], Any], out: str, hf: bool, config: dict[str, Any]) -> Any:
    """Run a worker loop as it is, then write what the driver cannot see from outside: the process
    group's backend and size, the device, peak memory, and (``hf``) the trainer's step clock, a
    default callback of every ``transformers.Trainer`` built meanwhile; returns what the loop returns."""
    import torch
    import torch.distributed as dist

    facts: dict[str, Any] = {"backend": dist.get_backend() if dist.is_initialized() else None,
                             "world": dist.get_world_size() if dist.is_initialized() else 1,
                             "rank": dist.get_rank() if dist.is_initialized() else 0}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # else the peak starts at 0 anyway
        torch.cuda.reset_peak_memory_stats()
    clock = hf_clock() if hf else None
    if clock is not None:  # every Trainer built meanwhile starts from these default callbacks
        import transformers.trainer

        transformers.trainer.DEFAULT_CALLBACKS.append(clock)
    start = time.perf_counter()
    try:
        result = loop(config)
    finally:
        if clock is not None:
            transformers.trainer.DEFAULT_CALLBACKS.remove(clock)
    facts["wall_s"] = time.perf_counter() - start
    facts.update(peak_memory())
    if clock is not None:
        facts.update(clock.figures())
    if isinstance(result, dict):
        facts.update(result)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{facts['rank']}.json").write_text(json.dumps(facts))
    return result


def run_probed(recipe, cfg, probe_dir: Path, *, loop=None, hf: bool = False, local: bool = False
               ) -> tuple[Any, list[dict]]:
    """``run_job`` of ``recipe`` with its Ray Train worker loop (or ``loop``) probed; ``local``: the
    recipe's own path in this process (``rayrec sft --local``), probed here. (outcome, a probe per rank)."""
    from rayrec.runs import run_job

    if local:
        outcome = probe_run(lambda _: run_job(recipe, cfg, local=True), str(probe_dir), hf, {})
        return outcome, [json.loads((probe_dir / "rank0.json").read_text())]

    def trainer(cfg, inputs, run):
        parts = recipe.trainer(cfg, inputs, run)
        parts.loop = partial(probe_run, loop or parts.loop, str(probe_dir), hf)
        return parts

    outcome = run_job(dataclasses.replace(recipe, trainer=trainer), cfg)  # Ray's noise: runs/NAME/rayrec.log
    probes = [json.loads(p.read_text()) for p in sorted(probe_dir.glob("rank*.json"))]
    require(len(probes) == cfg.scaling.num_workers, f"{len(probes)} of {cfg.scaling.num_workers} workers finished")
    return outcome, probes


def merged(probes: list[dict]) -> dict[str, Any]:
    """Rank 0's figures, with the highest peak memory of all ranks."""
    return {**probes[0], "peak_mem_bytes": max(p["peak_mem_bytes"] for p in probes)}


def joint_allreduce_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The joint model's training steps with rayrec's collectives, in a Ray Train worker.

    ``StageRunner.step`` averages the trained parameters' gradients with ``all_reduce_grads`` (one
    all-reduce of which have a gradient, one flat all-reduce of the gradients) and each step's
    losses with ``all_reduce_sum``, on the NCCL device (``comm_device``). Workers start from rank
    0's weights (``broadcast_from_rank0``), so they must end with identical weights.
    """
    from itertools import chain, count

    import torch

    from rayrec.recipes.sequential import setup_worker
    from rayrec.train.joint import StageRunner, plan_stages
    from rayrec.train.state import to_device
    from rayrec.workers.torch import all_reduce_grads, all_reduce_sum, broadcast_from_rank0, comm_device

    w = setup_worker(config)
    w.model.to(w.device)
    broadcast_from_rank0(w.model)
    steps = int(config["steps"])
    runner = StageRunner(plan_stages(w.cfg.model.stages)[0], w.model, w.cfg, w.device, steps, all_reduce_grads,
                         all_reduce_sum, w.world)
    batches = chain.from_iterable(w.batches.train(e) for e in count(1))  # this worker's shard, epoch after epoch
    clock, losses = Clock(), []
    for _ in range(steps):
        out = runner.step([to_device(next(batches), w.device)])
        require(out is not None, "a joint step was skipped (non-finite gradients)")
        losses.append(out[0])
        clock.tick()
    flat = torch.cat([p.detach().float().reshape(-1) for p in w.model.parameters()])
    mine = torch.stack([flat.sum(), flat.square().sum()]).double()
    spread = (all_reduce_sum(mine.clone()) - mine * w.world).abs().max().item()  # 0 when all ranks agree
    return {**step_figures(clock.marks), "losses": losses, "rank_spread": spread,
            "comm_device": str(comm_device()), "seqs_per_step": w.cfg.train.batch_size * w.world}


# ----------------------------------------------------------------------------- the check's inputs


@dataclasses.dataclass
class Context:
    sizes: Sizes
    cuda: bool
    gpus: int
    peak: float | None
    work: Path
    data: Path | None = None
    synth: dict | None = None  # the synthetic source's settings of ``data``
    flops_per_seq: float | None = None  # SASRec training FLOPs per sequence (section 1)
    lm_params: int | None = None
    sft_adapter: str | None = None
    grpo_adapter: str | None = None

    @property
    def workers(self) -> int:
        """Ray Train workers of the multi-worker sections: 2 with 2+ GPUs, else 1 (CPU smoke: ``cpu_workers``)."""
        return min(2, self.gpus) if self.cuda else self.sizes.cpu_workers

    def scaling(self, workers: int | None = None) -> dict[str, Any]:
        """Ray Train workers; one start attempt of at most 2 minutes, so a stuck section fails instead of waiting."""
        return {"num_workers": workers or self.workers, "use_gpu": self.cuda, "start_timeout_s": 120,
                "start_attempts": 1, "poll_interval_s": 0.1,
                "resources_per_worker": {"CPU": self.sizes.ray_cpus, **({"GPU": 1.0} if self.cuda else {})}}

    def run(self, name: str) -> dict[str, Any]:
        return {"name": name, "storage_path": str(self.work / "runs"), "seed": 0, "checkpoint": {"num_to_keep": 1}}


def synthetic_data(ctx: Context) -> Path:
    """rayrec's synthetic source at the check's size, prepared once (leave one out, no images)."""
    from rayrec.config.schema import FilterConfig
    from rayrec.data.dataset import source_reader
    from rayrec.data.prepare import prepare

    s = ctx.sizes
    ctx.synth = {"users": s.users, "items": s.items, "topics": 8, "mean_len": s.mean_len, "seed": 0, "images": False}
    out = ctx.work / "data"
    prepare(source_reader("synthetic", None, on_bad_line="error", synth=ctx.synth), out, source="synthetic",
            params={"synth": ctx.synth}, filters=FilterConfig(), split="leave_one_out")
    return out


def data_section(ctx: Context, **extra) -> dict[str, Any]:
    return {"path": str(ctx.data), "source": "synthetic", "synth": ctx.synth, "prepare_if_missing": False, **extra}


def sasrec_job(ctx: Context, name: str, **scaling):
    from rayrec.config.schema import JobConfig

    s = ctx.sizes
    return JobConfig.model_validate({
        "data": data_section(ctx, ingest="memory"),
        "model": {"name": "sasrec", "hidden": s.hidden, "num_blocks": s.blocks, "num_heads": s.heads,
                  "dropout": 0.1, "max_len": s.max_len},
        "train": {"epochs": s.epochs, "batch_size": s.batch, "amp": True, "windows": "last", "shuffle_buffer": 0,
                  "optim": {"lr": 1e-3}, "eval": {"ks": [10], "batch_size": 512}},
        "scaling": ctx.scaling(**scaling), "tracking": {"enabled": False}, "run": ctx.run(name)})


# ----------------------------------------------------------------------------- sections


def sasrec_bf16(ctx: Context) -> dict[str, Any]:
    """rayrec's ``train_epoch`` (autocast bf16, health check, clipping, AdamW) over the job's batches."""
    from itertools import chain, count, islice

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rayrec.data.dataset import open_prepared
    from rayrec.train.health import GradHealth
    from rayrec.train.inputs import data_info
    from rayrec.train.local import PlainBatches
    from rayrec.train.loop import LossModule, train_epoch
    from rayrec.train.phases import PhaseRunner
    from rayrec.train.specs import build

    cfg, device = sasrec_job(ctx, "sasrec"), torch.device("cuda" if ctx.cuda else "cpu")
    ds = open_prepared(ctx.data)
    info = data_info(ds, cfg)
    model = build(cfg, info).to(device)
    loader = PlainBatches(cfg, ds, info)
    batches = list(islice(chain.from_iterable(loader.train(e) for e in count(1)), ctx.sizes.sasrec_steps + 1))
    run = PhaseRunner(model, cfg, len(batches))
    run.enter(run.phase_of(1), 0)
    health = GradHealth(model.named_parameters(), cfg.train.health)
    dtypes: set[torch.dtype] = set()
    hook = model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    module = LossModule(model)
    with FlopCounterMode(display=False) as counter:  # the warm-up step, its FLOPs counted
        train_epoch(module, batches[:1], run, health, cfg, device)
    clock = Clock()
    stats = train_epoch(module, batches[1:], run, health, cfg, device, on_step=clock.tick)
    hook.remove()
    require(math.isfinite(stats.loss), f"training loss is {stats.loss}")
    require(stats.steps == ctx.sizes.sasrec_steps, f"{stats.steps} of {ctx.sizes.sasrec_steps} steps taken")
    want = torch.bfloat16 if ctx.cuda else torch.float32  # rayrec's autocast is GPU-only
    require(dtypes == {want}, f"attention ran in {sorted(map(str, dtypes))}, expected {want}")
    ctx.flops_per_seq = counter.get_total_flops() / batches[0]["input_ids"].shape[0]
    fig = step_figures(clock.marks)
    seqs = stats.seqs / stats.steps
    return {**fig, "tokens_per_s": seqs * ctx.sizes.max_len / fig["step_s"], "loss": stats.loss,
            "flops_per_step": ctx.flops_per_seq * seqs, "autocast_dtype": str(want),
            "mfu": mfu(ctx.flops_per_seq * seqs, fig["step_s"], ctx.peak),
            "note": f"{stats.steps} steps, activations in {want}{'' if ctx.cuda else ' (rayrec autocasts on GPU only)'}"
                    f", loss {stats.loss:.3f}"}


def ddp(ctx: Context) -> dict[str, Any]:
    """The sequential recipe's Ray Train worker (DDP, ``fit``, metric all-reduce) on NCCL (gloo on CPU)."""
    from rayrec.recipes.sequential import RECIPE
    from rayrec.train.checkpoint import load_state

    cfg = sasrec_job(ctx, "ddp")
    outcome, probes = run_probed(RECIPE, cfg, ctx.work / "probe_ddp")
    p = merged(probes)
    backend = "nccl" if ctx.cuda else "gloo"
    require(p["backend"] == backend and p["world"] == ctx.workers,
            f"process group {p['backend']} x {p['world']}, expected {backend} x {ctx.workers}")
    history = load_state(outcome.checkpoint)["history"]  # every epoch's metrics, in rayrec's checkpoint
    last = history[-1]
    require(math.isfinite(last["train/loss"]) and math.isfinite(outcome.metrics["test/ndcg@10"]),
            f"train/loss {last['train/loss']}, test/ndcg@10 {outcome.metrics.get('test/ndcg@10')}")
    seqs_per_s = last["train/seqs_per_s"]  # the last epoch's, all workers together
    step_s = cfg.train.batch_size * ctx.workers / seqs_per_s
    flops = ctx.flops_per_seq * cfg.train.batch_size * ctx.workers if ctx.flops_per_seq else None
    return {"step_s": step_s, "step_source": "the last epoch's train/seqs_per_s",
            "tokens_per_s": seqs_per_s * ctx.sizes.max_len, "peak_mem_bytes": p["peak_mem_bytes"],
            "peak_mem_kind": p["peak_mem_kind"], "mfu": mfu(flops, step_s, ctx.peak, ctx.workers),
            "backend": p["backend"], "workers": p["world"], "ddp_wrapped": p["world"] > 1, "epochs": len(history),
            "loss": last["train/loss"], "test/ndcg@10": outcome.metrics["test/ndcg@10"],
            "note": f"{p['backend']} x {p['world']} worker(s), DDP wrapper "
                    f"{'on' if p['world'] > 1 else 'off (Ray wraps 2+ workers only)'}, "
                    f"test ndcg@10 {outcome.metrics['test/ndcg@10']:.4f}"}


def joint_allreduce(ctx: Context) -> dict[str, Any]:
    """``StageRunner`` steps of the joint model with ``all_reduce_grads`` / ``all_reduce_sum`` across workers."""
    from rayrec.config.schema import JobConfig
    from rayrec.recipes import joint, sequential
    from rayrec.train.joint import prepare_features

    s = ctx.sizes
    cfg = JobConfig.model_validate({
        "data": data_section(ctx, ingest="memory"),
        "model": {"name": "ur4rec",
                  "sasrec": {"hidden": s.hidden, "num_blocks": s.blocks, "num_heads": s.heads, "max_len": s.max_len},
                  "retriever": {"hidden": s.hidden, "experts": ["user_pref", "item_text"], "num_negatives": 15},
                  "fusion": {"top_n": 50},
                  "features": {"text_model": "hash:64", "user_text": "dataset", "item_text": "dataset",
                               "dir": str(ctx.work / "features"), "cache_dir": str(ctx.work / "feature_cache")},
                  "stages": [{"name": "end_to_end", "epochs": 1, "strategies": [{"name": "uncertainty"}]}]},
        "train": {"epochs": 1, "batch_size": s.batch, "windows": "last", "shuffle_buffer": 0, "amp": True,
                  "optim": {"lr": 1e-3, "warmup_steps": 0}},
        "scaling": ctx.scaling(), "tracking": {"enabled": False}, "run": ctx.run("joint")})

    def trainer(c, inputs, run):  # the joint recipe's data path, this check's step count
        parts = sequential.trainer_parts(c, inputs, run)
        return dataclasses.replace(parts, config={**parts.config, "steps": s.joint_steps})

    recipe = dataclasses.replace(joint.RECIPE, trainer=trainer)
    prepare_features(cfg, ctx.data, use_ray=False)  # here, not on Ray Data: not a CUDA path, and faster
    _, probes = run_probed(recipe, cfg, ctx.work / "probe_joint", loop=joint_allreduce_worker)
    p = merged(probes)
    want = "cuda" if ctx.cuda else "cpu"
    require(p["comm_device"].startswith(want), f"collectives ran on {p['comm_device']}, expected {want}")
    require(p["steps"] == s.joint_steps and all(map(math.isfinite, p["losses"])), f"losses {p['losses']}")
    require(p["rank_spread"] < 1e-3, f"workers disagree on the weights after the steps (spread {p['rank_spread']:.3g})")
    return {"step_s": p["step_s"], "tokens_per_s": p["seqs_per_step"] * s.max_len / p["step_s"],
            "peak_mem_bytes": p["peak_mem_bytes"], "peak_mem_kind": p["peak_mem_kind"], "mfu": None,
            "backend": p["backend"], "workers": p["world"], "comm_device": p["comm_device"],
            "steps": p["steps"], "loss": p["losses"][-1], "rank_spread": p["rank_spread"],
            "note": f"{p['backend']} x {p['world']} worker(s), collectives on {p['comm_device']}, weights equal "
                    f"on every rank{'' if p['world'] > 1 else ' (all_reduce_sum is a no-op for one worker)'}"}


def genrec_common(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    return {"data": data_section(ctx),
            "sids": {"method": "file", "dir": str(ctx.work / "sids"), "name": "items"},
            "model": {"base": str(ctx.work / "base"), "max_length": s.max_length},
            "eval": {"num_beams": s.beams, "ks": [1, 5, 10, 20][: 2 if s.beams < 10 else 4],
                     "batch_size": s.eval_batch, "max_rows": s.eval_rows},
            "scaling": ctx.scaling(1 if not ctx.cuda else None), "tracking": {"enabled": False}}


def write_base(ctx: Context, cfg) -> int:
    """The SID index (a fixed grid) and a random Qwen2-shaped base with a word-level tokenizer made
    from the prompts, saved where ``model.base`` points; returns the base's parameter count."""
    import torch

    from rayrec.data.dataset import open_prepared
    from rayrec.genrec.inputs import prepare_inputs, tiny_corpus
    from rayrec.genrec.semantic_ids import write_index
    from rayrec.genrec.tiny import grid_index, tiny_qwen2, tiny_tokenizer

    write_index(grid_index(open_prepared(ctx.data).table("items"), k=ctx.sizes.sid_k), ctx.work / "sids", "items")
    tokenizer = tiny_tokenizer(tiny_corpus(cfg, prepare_inputs(cfg)))
    shape = dict(ctx.sizes.lm)
    vocab = max(shape.pop("vocab_size", 0), len(tokenizer))
    with torch.device("cuda" if ctx.cuda else "cpu"):  # 0.5B random weights: drawn on the GPU in seconds
        model = tiny_qwen2(vocab, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, **shape)
    params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16 if ctx.cuda else torch.float32).save_pretrained(cfg.model.base)
    tokenizer.save_pretrained(cfg.model.base)
    del model
    if ctx.cuda:
        torch.cuda.empty_cache()
    return params


def lora_sft(ctx: Context) -> dict[str, Any]:
    """LoRA SFT of the random base: the SFT recipe's Ray Train worker with DeepSpeed ZeRO-2 on GPU,
    its local path on CPU."""
    from rayrec.config.genrec import GenRecJobConfig
    from rayrec.recipes.sft import RECIPE

    s = ctx.sizes
    cfg = GenRecJobConfig.model_validate({
        **genrec_common(ctx), "prompts": {"tasks": {"sid_seq": 1.0}, "max_history": s.max_history,
                                          "max_examples": s.prompts},
        "train": {"epochs": 1, "batch_size": s.lm_batch, "lr": 5e-3, "warmup_ratio": 0.0, "logging_steps": 1,
                  "val_rows": s.val_rows, "deepspeed": s.deepspeed, "lora": {"r": s.lora_r, "alpha": 2 * s.lora_r}},
        "run": ctx.run("sft")})
    ctx.lm_params = write_base(ctx, cfg)
    outcome, probes = run_probed(RECIPE, cfg, ctx.work / "probe_sft", hf=True, local=not ctx.cuda)
    ctx.sft_adapter = outcome.checkpoint
    workers = cfg.scaling.num_workers
    p = {**merged(probes), "tokens_per_step": sft_tokens_per_example(cfg) * s.lm_batch * workers}
    return lm_figures(ctx, p, workers, steps=math.ceil(s.prompts / (s.lm_batch * workers)),
                      adapter=outcome.checkpoint)


def sft_tokens_per_example(cfg) -> float:
    """Mean tokens of an SFT example (prompt + completion + EOS, unpadded, as TRL tokenizes it)."""
    from rayrec.genrec.inputs import prepare_inputs, token_counter
    from rayrec.genrec.lm import extend_tokenizer, load_tokenizer

    data = prepare_inputs(cfg)
    tokenizer = load_tokenizer(cfg.model.base)
    extend_tokenizer(tokenizer, data.index.vocab())
    counts = token_counter(tokenizer, eos=True)((data.train["prompt"] + data.train["completion"]).tolist())
    return statistics.fmean(counts)


def grpo(ctx: Context) -> dict[str, Any]:
    """``grpo_steps`` GRPO steps from the SFT adapter (beam rollouts): the recipe's Ray Train worker
    with DeepSpeed ZeRO-2 on GPU, its local path on CPU."""
    from rayrec.config.genrec import GRPOJobConfig
    from rayrec.recipes.grpo import RECIPE

    require(ctx.sft_adapter is not None, "no SFT adapter (lora_sft failed)")
    s = ctx.sizes
    cfg = GRPOJobConfig.model_validate({
        **genrec_common(ctx), "prompts": {"tasks": {"sid_seq": 1.0}, "max_history": s.max_history,
                                          "max_examples": s.grpo_steps * s.grpo_batch // s.generations},
        "train": {"max_steps": s.grpo_steps, "batch_size": s.grpo_batch, "lr": 3e-4, "logging_steps": 1,
                  "save_steps": s.grpo_steps, "val_rows": s.val_rows, "deepspeed": s.deepspeed},
        "grpo": {"adapter": ctx.sft_adapter, "num_generations": s.generations, "rollout": "beam", "beta": 1e-3,
                 "add_gt": True, "rewards": {"ranking": 1.0}},  # the target in every group: advantages not all 0
        "run": ctx.run("grpo")})
    outcome, probes = run_probed(RECIPE, cfg, ctx.work / "probe_grpo", hf=True, local=not ctx.cuda)
    ctx.grpo_adapter = outcome.checkpoint
    fig = lm_figures(ctx, merged(probes), cfg.scaling.num_workers, steps=s.grpo_steps, adapter=outcome.checkpoint)
    kl, reward = outcome.metrics.get("train/kl"), outcome.metrics.get("train/reward")
    require(kl is not None and math.isfinite(kl) and kl > 0, f"train/kl {kl}: the policy never left the SFT one")
    require(reward is not None and reward > 0, f"train/reward {reward}: the target is in every group, so it is > 0")
    return {**fig, "train/kl": kl, "train/reward": reward, "generations": s.generations,
            "note": f"{fig['note']}; G={s.generations}, reward {reward:.3f}, KL {kl:.2g}"}


def lm_figures(ctx: Context, p: dict[str, Any], workers: int, *, steps: int, adapter: str | None) -> dict[str, Any]:
    """An HF trainer's probe -> the table's figures; the step count and losses checked."""
    require(adapter is not None and (Path(adapter) / "adapter_model.safetensors").is_file(), f"no adapter at {adapter}")
    require(p["steps"] == steps, f"{p['steps']:g} of {steps} optimizer steps ran")
    require(bool(p["losses"]) and all(map(math.isfinite, p["losses"])), f"losses {p['losses']}")
    backend = "nccl" if ctx.cuda else None  # on CPU: the recipe's path in this process, no group
    require(p["backend"] == backend, f"process group {p['backend']}, expected {backend}")
    tokens = p.get("tokens_per_step")
    flops = lm_train_flops(ctx.lm_params, tokens) if tokens else None
    where = f"Ray Train {p['backend']} x {p['world']}" if p["backend"] else "in this process"
    return {"step_s": p["step_s"], "tokens_per_s": tokens / p["step_s"] if tokens else None,
            "peak_mem_bytes": p["peak_mem_bytes"], "peak_mem_kind": p["peak_mem_kind"],
            "mfu": mfu(flops, p["step_s"], ctx.peak, workers), "steps": int(p["steps"]), "loss": p["losses"][-1],
            "backend": p["backend"], "workers": p["world"], "deepspeed": ctx.sizes.deepspeed,
            "lm_params": ctx.lm_params, "adapter": adapter,
            "note": f"{int(p['steps'])} steps of a {ctx.lm_params / 1e6:.2f}M-parameter Qwen2, {where}, "
                    f"DeepSpeed {ctx.sizes.deepspeed or 'off'}, loss {p['losses'][-1]:.3f}"}


def constrained_eval(ctx: Context) -> dict[str, Any]:
    """Constrained beam search over test rows with the trained adapter, on this process's device,
    scored as ``rayrec eval-genrec`` scores (``evaluate.result_rows`` / ``metrics_from_results``)."""
    import torch

    from rayrec.config.genrec import GenRecJobConfig
    from rayrec.data.dataset import open_prepared
    from rayrec.genrec import prompts as P
    from rayrec.genrec.constrained import beam_rank
    from rayrec.genrec.evaluate import answer_trie, metrics_from_results, result_rows
    from rayrec.genrec.inputs import token_counter
    from rayrec.genrec.lm import SID_FILE, load_for_eval
    from rayrec.genrec.semantic_ids import read_index

    adapter = ctx.grpo_adapter or ctx.sft_adapter
    require(adapter is not None, "no adapter (lora_sft failed)")
    cfg = GenRecJobConfig.model_validate({**genrec_common(ctx), "prompts": {"max_history": ctx.sizes.max_history}})
    ds = open_prepared(ctx.data)
    item_sids = read_index(Path(adapter) / SID_FILE).for_items(ds.table("items"))
    model, tokenizer, _ = load_for_eval(adapter, device="cuda" if ctx.cuda else "cpu")
    trie = answer_trie(tokenizer, "sid_seq", item_sids, {})
    budget = cfg.model.max_length - trie.max_len
    rows = P.eval_prompts(ds, "test", item_sids, cfg.prompts, cfg.eval.max_rows)
    rows, _ = P.fit_lengths(rows, token_counter(tokenizer, eos=False), budget, item_sids, P.titles_of(ds),
                            with_answer=False, drop=False)
    records = rows.to_dict("records")
    prompts, batch = [r["prompt"] for r in records], cfg.eval.batch_size
    beam_rank(model, tokenizer, prompts[:batch], trie, num_beams=cfg.eval.num_beams, batch_size=batch,
              max_prompt_tokens=budget)  # warm-up batch
    clock, ranked = Clock(), []
    for start in range(0, len(prompts), batch):
        ranked += beam_rank(model, tokenizer, prompts[start : start + batch], trie, num_beams=cfg.eval.num_beams,
                            batch_size=batch, max_prompt_tokens=budget)
        clock.tick()
    metrics = metrics_from_results(result_rows(records, ranked, item_sids, trie.canonical), cfg.eval.ks, "test")
    require(metrics["test/invalid"] == 0, f"{metrics['test/invalid']:g} decoded answers are no item")
    require(all(math.isfinite(v) for v in metrics.values()), f"metrics {metrics}")
    fig = step_figures(clock.marks)
    del model
    if ctx.cuda:
        torch.cuda.empty_cache()
    k = cfg.eval.ks[-1]
    scores = ", ".join(f"{m}@{j} {metrics[f'test/{m}@{j}']:.4f}" for j in cfg.eval.ks for m in ("hr", "ndcg"))
    return {**fig, "tokens_per_s": batch * cfg.eval.num_beams * trie.max_len / fig["step_s"], "mfu": None,
            "rows": len(records), "num_beams": cfg.eval.num_beams, f"hr@{k}": metrics[f"test/hr@{k}"],
            f"ndcg@{k}": metrics[f"test/ndcg@{k}"], "metrics": metrics, "adapter": adapter,
            "note": f"{len(records)} test rows, {cfg.eval.num_beams} beams, no invalid item: {scores}"}


SECTIONS: list[tuple[str, Callable[[Context], dict[str, Any]]]] = [
    ("sasrec_bf16", sasrec_bf16), ("ddp", ddp), ("joint_allreduce", joint_allreduce), ("lora_sft", lora_sft),
    ("grpo", grpo), ("constrained_eval", constrained_eval)]


# ----------------------------------------------------------------------------- driver


def run_section(name: str, fn: Callable[[Context], dict[str, Any]], ctx: Context) -> dict[str, Any]:
    """One section, timed; its figures with ``passed`` (and the error when it failed)."""
    import torch

    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        fig = fn(ctx)
        passed, error = True, None
    except Exception as e:  # every section runs; the exit code says whether one failed
        traceback.print_exc()
        detail = f"{type(e).__name__}: {e}"
        fig, passed, error = {"error_detail": detail}, False, headline(detail)
        print(f"FAILED section {name}: {error}", file=sys.stderr, flush=True)
    fig.setdefault("peak_mem_bytes", peak_memory()["peak_mem_bytes"])
    fig.setdefault("peak_mem_kind", peak_memory()["peak_mem_kind"])
    if passed:
        bad = [k for k in ("step_s", "tokens_per_s", "mfu") if fig.get(k) is not None
               and not (math.isfinite(fig[k]) and fig[k] > 0)]
        if bad:
            passed, error = False, f"CheckFailed: non-positive or non-finite {bad}: {[fig[k] for k in bad]}"
            print(f"FAILED section {name}: {error}", file=sys.stderr, flush=True)
    return {"section": name, "passed": passed, "error": error, "wall_s": time.perf_counter() - start, **fig}


def headline(error: str) -> str:
    """The line of an error that says what failed: a worker's error arrives as a traceback snippet
    (Ray's ``WorkerGroupError``), whose last line is the worker's own exception."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return lines[-1] if len(lines) > 1 else error.strip()


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]], device: str) -> None:
    kind = rows[0]["peak_mem_kind"] if rows else ""
    print(f"\nrayrec GPU check on {device} (step: median, first step left out; peak memory: {kind})")
    print(f"{'section':<18}{'step s':>9}{'tokens/s':>12}{'peak MiB':>10}{'MFU':>8}{'wall s':>8}  result")
    for r in rows:
        result = "pass" if r["passed"] else f"FAIL: {r['error']}"
        print(f"{r['section']:<18}{fmt(r.get('step_s'), '.4f'):>9}{fmt(r.get('tokens_per_s'), ',.0f'):>12}"
              f"{r['peak_mem_bytes'] / 2**20:>10,.0f}{fmt(r.get('mfu'), '.1%'):>8}{r['wall_s']:>8.1f}  {result}")
    print()
    for r in rows:
        if r.get("note"):
            print(f"{r['section']}: {r['note']}")


def versions() -> dict[str, str]:
    import ray
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
           "transformers": transformers.__version__, "cuda": torch.version.cuda or "-"}
    for name in ("trl", "peft", "deepspeed"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "-"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="every section at CPU size (gloo, fp32, no DeepSpeed)")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json", help="the JSON result")
    ap.add_argument("--work", type=Path, default=None, help="data, runs and probes (default: a temporary folder, "
                    "removed at the end)")
    args = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print(f"error: {NO_CUDA}", file=sys.stderr)
        return 2
    for k, v in {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}.items():
        os.environ.setdefault(k, v)
    work = (args.work or Path(tempfile.mkdtemp(prefix="rayrec_gpu_check_"))).resolve()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(work / "torch_extensions"))  # no shared JIT lock files
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    ctx = Context(GPU if cuda else CPU_SMOKE, cuda, torch.cuda.device_count() if cuda else 0,
                  peak_bf16_flops(device) if cuda else None, work)
    start = time.perf_counter()
    rows = []
    try:
        ctx.data = synthetic_data(ctx)
        for name, fn in SECTIONS:
            print(f"== {name}", flush=True)
            rows.append(run_section(name, fn, ctx))
    finally:
        import ray

        ray.shutdown()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows, device)
    result = {"benchmark": "gpu_check", "mode": "gpu" if cuda else "cpu_smoke", "device": device,
              "gpus": ctx.gpus, "peak_bf16_flops": ctx.peak, "versions": versions(), "cpus": os.cpu_count(),
              "sizes": dataclasses.asdict(ctx.sizes), "wall_s": time.perf_counter() - start,
              "passed": all(r["passed"] for r in rows), "sections": rows}
    from rayrec.data.atomic import atomic_write

    atomic_write(args.out, json.dumps(result, indent=2, default=str))
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    failed = [r["section"] for r in rows if not r["passed"]]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
