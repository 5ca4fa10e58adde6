"""GRPO after SFT on the tiny synthetic task; prints a table and writes JSON under bench/results/.

For each seed: LoRA SFT (``jobs/genrec_tiny.yaml`` with ``run.seed``, so its own SID index and
initial weights), then from that adapter:

* ``sft_control``: SFT continued from the checkpoint GRPO starts from (weights, optimizer and
  schedule state; the schedule re-sized to end after the extra steps) for as many optimizer steps
  as GRPO takes, the best checkpoint on validation kept: what the same extra steps buy without rewards;
* ``grpo_<reward>``: GRPO (``jobs/genrec_tiny_grpo.yaml``) with one reward each (rule, ranking,
  semantic, collaborative);
* ``grpo_mixed``: ranking 1 + collaborative 0.5 (each standardised within its group before the
  weights apply).

The collaborative reward reads a SASRec trained on the same prepared data per seed. Every model
is scored by the same constrained beam search on the whole test split; a run's checkpoint is the
one best on validation, and its own validation score is reported beside it. Means over seeds
come with 95 % bootstrap intervals over the test rows (rows resampled alike for every seed).
All runs go to one MLflow experiment, so ``rayrec compare`` shows them side by side.

``--defaults`` measures the learning rate and gradient clipping of the GRPO job on seed 0
(validation only), the measurement behind ``jobs/minionerec_grpo_lora.yaml``'s defaults.

    python bench/grpo_tiny.py                       # 3 seeds x 7 models, ~40 min on 2 cores
    python bench/grpo_tiny.py --seeds 0 --steps 100 # a quick look
    python bench/grpo_tiny.py --defaults            # lr x max_grad_norm of GRPO on seed 0, into --out
    python bench/grpo_tiny.py --work W --rollouts-only  # re-measure the rollout cost on a quiet machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rayrec import recipes
from rayrec.config.genrec import GenRecJobConfig, GRPOJobConfig
from rayrec.config.loader import load_model
from rayrec.config.schema import JobConfig
from rayrec.genrec.evaluate import evaluate_adapter

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
KEYS = ("test/hr@1", "test/ndcg@10", "test/hr@10")
REWARDS = ("rule", "ranking", "semantic", "collaborative")
MIXED = {"ranking": 1.0, "collaborative": 0.5}
BOOTSTRAP = {"resamples": 2000, "seed": 0}


def common(work: Path, seed: int, name: str, sids: bool = True) -> list[str]:
    return [f"data.path={work}/data", *([f"sids.dir={work}/sids_s{seed}"] if sids else []), f"run.seed={seed}",
            f"run.name={name}", f"run.storage_path={work}/runs", f"tracking.uri=sqlite:///{work}/mlflow.db",
            "tracking.experiment=grpo_bench"]


def sft_job(work: Path, seed: int, name: str | None = None, extra: list[str] = ()) -> GenRecJobConfig:
    return load_model(GenRecJobConfig, ROOT / "jobs" / "genrec_tiny.yaml",
                      [*common(work, seed, name or f"sft_s{seed}"), *extra])


def grpo_job(work: Path, seed: int, adapter: str, name: str, weights: dict[str, float], steps: int,
             collaborative: str | None, extra: list[str] = ()) -> GRPOJobConfig:
    rewards = [f"grpo.rewards.{r}={weights.get(r, 0.0)}" for r in REWARDS]
    cf = [f"grpo.collaborative_checkpoint={collaborative}"] if weights.get("collaborative") else []
    return load_model(GRPOJobConfig, ROOT / "jobs" / "genrec_tiny_grpo.yaml", [
        *common(work, seed, name), f"grpo.adapter={adapter}", *rewards, *cf, f"train.max_steps={steps}", *extra])


def sasrec_job(work: Path, seed: int) -> JobConfig:
    """The collaborative reward's SASRec, on the SFT job's prepared data."""
    return load_model(JobConfig, ROOT / "jobs" / "genrec_tiny_sasrec.yaml",
                      [*common(work, seed, f"sasrec_s{seed}", sids=False), "data.prepare_if_missing=false"])


def test_rows(cfg, adapter: str) -> tuple[dict[str, float], np.ndarray]:
    """Test metrics and each test row's rank (inf: not among the beams)."""
    res = evaluate_adapter(cfg, adapter, split="test", local=True)
    ranks = np.array([float(r["rank"]) if r.get("rank") else np.inf for r in res.rows])
    return {k: res.metrics[k] for k in (*KEYS, "test/invalid")}, ranks


def row_metrics(ranks: np.ndarray) -> dict[str, np.ndarray]:
    return {"test/hr@1": (ranks <= 1).astype(float), "test/ndcg@10": np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0.0),
            "test/hr@10": (ranks <= 10).astype(float)}


def with_intervals(per_seed: list[np.ndarray]) -> dict[str, object]:
    """Mean over seeds and 95 % bootstrap intervals over the test rows (resampled alike for every seed)."""
    rows = np.random.default_rng(BOOTSTRAP["seed"]).integers(0, len(per_seed[0]), (BOOTSTRAP["resamples"],
                                                                                   len(per_seed[0])))
    out: dict[str, object] = {}
    for k in KEYS:
        stacked = np.stack([row_metrics(r)[k] for r in per_seed])  # [seeds, rows]
        boot = stacked[:, rows].mean(axis=(0, 2))
        out[k] = float(stacked.mean())
        out[f"{k}_ci95"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    return out


def sft_control(work: Path, seed: int, checkpoint: str, steps: int) -> tuple[GenRecJobConfig, object]:
    """SFT resumed from the checkpoint GRPO starts from (its weights, optimizer and schedule) for ``steps``
    more optimizer steps: ``train.epochs`` is stretched to fit, so the schedule is re-sized to end there."""
    folder = Path(checkpoint)
    state = json.loads((folder / "trainer_state.json").read_text())
    done, epoch = int(state["global_step"]), float(state["epoch"])
    epochs = epoch * (done + steps) / done
    cfg = sft_job(work, seed, f"sft_control_s{seed}", [f"train.epochs={epochs:.6f}"])
    return cfg, recipes.run(cfg, local=True, console=False, resume_from=str(folder))


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t0) / 60


def rollout_cost(adapter: str, cfg: GenRecJobConfig, size: int = 8, prompts: int = 32, repeats: int = 3) -> dict:
    """Tokens per CPU second of G constrained beam completions vs G unconstrained samples per prompt."""
    from rayrec.data.dataset import ensure_prepared
    from rayrec.genrec import prompts as P
    from rayrec.genrec.constrained import build_trie
    from rayrec.genrec.lm import SID_FILE, load_for_eval
    from rayrec.genrec.rollouts import generate_groups
    from rayrec.genrec.semantic_ids import read_index

    model, tokenizer, _ = load_for_eval(adapter)
    ds = ensure_prepared(cfg.data)
    item_sids = read_index(Path(adapter) / SID_FILE).for_items(ds.table("items"))
    trie = build_trie(tokenizer, item_sids)
    texts = P.eval_prompts(ds, "valid", item_sids, cfg.prompts, prompts)["prompt"].tolist()
    out = {}
    for name, kw in {"beam_constrained": {"mode": "beam"},
                     "sample_unconstrained": {"mode": "sample", "constrained": False}}.items():
        runs = []
        for _ in range(repeats):
            t0 = time.process_time()
            groups = generate_groups(model, tokenizer, texts, trie, size=size, **kw)
            cpu = time.process_time() - t0
            tokens = sum(len(c) for g in groups for c in g.completion_ids)
            invalid = sum(i is None for g in groups for i in g.items)
            runs.append((tokens / cpu, invalid / (len(texts) * size)))
        out[name] = {"tokens_per_cpu_s": statistics.median(r[0] for r in runs), "invalid": runs[0][1]}
    out["ratio_beam_to_sample"] = out["beam_constrained"]["tokens_per_cpu_s"] / out["sample_unconstrained"][
        "tokens_per_cpu_s"]
    out.update({"G": size, "prompts": prompts})
    return out


def print_cost(cost: dict) -> None:
    print(f"\nrollouts, G={cost['G']}, {cost['prompts']} prompts: constrained beam "
          f"{cost['beam_constrained']['tokens_per_cpu_s']:.0f} tokens/CPU-s, unconstrained sampling "
          f"{cost['sample_unconstrained']['tokens_per_cpu_s']:.0f} tokens/CPU-s (invalid outputs "
          f"{cost['sample_unconstrained']['invalid']:.1%}); ratio {cost['ratio_beam_to_sample']:.2f}")


def defaults_sweep(work: Path, steps: int, lrs: list[float], clips: list[float]) -> list[dict]:
    """GRPO (ranking reward) on seed 0 for each lr x max_grad_norm: the chosen checkpoint's val/ndcg@10."""
    seed = 0
    sft_dir = work / "runs" / f"sft_s{seed}"
    if not sft_dir.is_dir():
        recipes.run(sft_job(work, seed), local=True, console=False)
    from rayrec.runs import run_checkpoint

    adapter = str(run_checkpoint(sft_dir))
    rows = []
    for lr in lrs:
        for clip in clips:
            cfg = grpo_job(work, seed, adapter, f"defaults_lr{lr:g}_clip{clip:g}", {"ranking": 1.0}, steps, None,
                           [f"train.lr={lr}", f"train.max_grad_norm={clip}"])
            out, minutes = timed(recipes.run, cfg, local=True, console=False)
            row = {"lr": lr, "max_grad_norm": clip, "val/ndcg@10": out.metrics.get("val/ndcg@10"),
                   "checkpoint": Path(out.checkpoint).name, "train/kl": out.metrics.get("train/kl"),
                   "minutes": round(minutes, 2)}
            rows.append(row)
            print(f"  lr {lr:g} max_grad_norm {clip:g}: val ndcg@10 {row['val/ndcg@10'] or float('nan'):.4f} at "
                  f"{row['checkpoint']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=REWARDS)
    ap.add_argument("--steps", type=int, default=300, help="GRPO optimizer steps (and the SFT control's extra steps)")
    ap.add_argument("--work", type=Path, default=None, help="runs, data and MLflow (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=RESULTS / "grpo_tiny.json")
    ap.add_argument("--defaults", action="store_true", help="the lr x max_grad_norm measurement (seed 0), into --out")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4, 3e-4, 1e-3])
    ap.add_argument("--clips", type=float, nargs="+", default=[0.3, 1.0])
    ap.add_argument("--rollouts-only", action="store_true",
                    help="re-measure only the rollout cost with the first seed's SFT adapter in --work, into --out")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    work = (args.work or Path(tempfile.mkdtemp(prefix="rayrec_grpo_bench_"))).resolve()
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.rollouts_only or args.defaults:
        if args.defaults:
            rows = defaults_sweep(work, args.steps, args.lrs, args.clips)
            best = max(rows, key=lambda r: r["val/ndcg@10"] if r["val/ndcg@10"] is not None else -1.0)
            print(f"best on validation: lr {best['lr']:g}, max_grad_norm {best['max_grad_norm']:g}")
            previous["defaults_sweep"] = {"seed": 0, "steps": args.steps, "reward": "ranking", "rows": rows,
                                          "best": best}
        else:
            from rayrec.runs import run_checkpoint

            seed = args.seeds[0]
            previous["rollout_cost"] = cost = rollout_cost(str(run_checkpoint(work / "runs" / f"sft_s{seed}")),
                                                           sft_job(work, seed))
            print_cost(cost)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(previous, indent=2))
        print(f"updated {args.out}")
        return

    grpo_models = [f"grpo_{r}" for r in args.rewards] + (["grpo_mixed"] if {"ranking", "collaborative"} <= set(
        args.rewards) else [])
    models = ["sft", "sft_control", *grpo_models]
    per_seed, ranks, cost = [], {m: [] for m in models}, None
    for seed in args.seeds:
        sft_cfg = sft_job(work, seed)
        sft, minutes = timed(recipes.run, sft_cfg, local=True, console=False)
        metrics, r = test_rows(sft_cfg, sft.checkpoint)
        row = {"seed": seed, "sft": {**metrics, "val/ndcg@10": sft.metrics.get("val/ndcg@10"),
                                     "checkpoint": Path(sft.checkpoint).name, "minutes": minutes,
                                     "run": sft.mlflow_run_id}}
        ranks["sft"].append(r)
        if cost is None:
            cost = rollout_cost(sft.checkpoint, sft_cfg)
        (cfg, ctl), minutes = timed(sft_control, work, seed, sft.checkpoint, args.steps)
        metrics, r = test_rows(cfg, ctl.checkpoint)
        row["sft_control"] = {**metrics, "val/ndcg@10": ctl.metrics.get("val/ndcg@10"),
                              "checkpoint": Path(ctl.checkpoint).name, "minutes": minutes, "run": ctl.mlflow_run_id}
        ranks["sft_control"].append(r)
        collaborative = None
        if "collaborative" in args.rewards:
            sas = recipes.run(sasrec_job(work, seed), local=True, console=False)
            collaborative = sas.checkpoint
            row["sasrec_for_collaborative"] = {"val/ndcg@10": sas.metrics.get("val/ndcg@10"), "run": sas.mlflow_run_id}
        for m in grpo_models:
            weights = MIXED if m == "grpo_mixed" else {m.removeprefix("grpo_"): 1.0}
            cfg = grpo_job(work, seed, sft.checkpoint, f"{m}_s{seed}", weights, args.steps, collaborative)
            out, minutes = timed(recipes.run, cfg, local=True, console=False)
            metrics, r = test_rows(cfg, out.checkpoint)
            row[m] = {**metrics, "weights": weights, "val/ndcg@10": out.metrics.get("val/ndcg@10"),
                      "checkpoint": Path(out.checkpoint).name, "train/kl": out.metrics.get("train/kl"),
                      "minutes": minutes, "run": out.mlflow_run_id}
            ranks[m].append(r)
        per_seed.append(row)
        print(f"seed {seed}: " + "  ".join(f"{m} {row[m]['test/ndcg@10']:.4f}" for m in models) + " (test ndcg@10)",
              flush=True)

    mean = {m: with_intervals(ranks[m]) for m in models}
    print(f"\ntest, mean of seeds {args.seeds} (each seed: its own SFT adapter; GRPO and the SFT control "
          f"{args.steps} steps), 95 % bootstrap intervals over the test rows")
    print(f"{'model':<22}{'hr@1':>26}{'ndcg@10':>26}{'hr@10':>9}   per seed ndcg@10 (val ndcg@10 of the chosen ckpt)")
    for m in models:
        ci = {k: mean[m][f"{k}_ci95"] for k in KEYS}
        seeds = "  ".join(f"{r[m]['test/ndcg@10']:.3f} ({r[m]['val/ndcg@10'] or float('nan'):.3f})" for r in per_seed)
        print(f"{m:<22}" + "".join(f"{mean[m][k]:>9.4f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" for k in KEYS[:2])
              + f"{mean[m]['test/hr@10']:>9.4f}   {seeds}")
    wins = {}
    for m in grpo_models:
        wins[m] = sum(r[m]["test/ndcg@10"] > r["sft_control"]["test/ndcg@10"] for r in per_seed)
        gain = mean[m]["test/ndcg@10"] / mean["sft_control"]["test/ndcg@10"] - 1
        print(f"{m} vs sft_control: ndcg@10 {gain:+.1%}, higher in {wins[m]}/{len(per_seed)} seeds")
    print_cost(cost)
    print(f"\nside by side in MLflow: rayrec compare grpo_bench --tracking-uri sqlite:///{work}/mlflow.db")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {"seeds": args.seeds, "steps": args.steps, "rewards": args.rewards, "mixed": MIXED,
               "bootstrap": BOOTSTRAP, "per_seed": per_seed, "mean": mean, "wins_vs_sft_control": wins,
               "rollout_cost": cost, "work": str(work),
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}}
    if "defaults_sweep" in previous:
        results["defaults_sweep"] = previous["defaults_sweep"]
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
