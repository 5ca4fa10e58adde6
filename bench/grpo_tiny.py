"""GRPO after SFT on the tiny synthetic task; prints a table and writes JSON under bench/results/.

For each seed: LoRA SFT (``jobs/genrec_tiny.yaml`` with ``run.seed``, so its own SID index and
initial weights), then GRPO from that adapter (``jobs/genrec_tiny_grpo.yaml``) once per reward
(``ranking`` and ``rule``). Every model is scored by the same constrained beam search on the
whole test split (HR@K, NDCG@K); GRPO's checkpoint is the one best on validation. All runs go
to one MLflow experiment, so ``rayrec compare`` shows them side by side (the command is printed).

Also the rollout cost: G completions per prompt by constrained beam search (what GRPO trains on)
against unconstrained sampling of the same G, in generated tokens per second of CPU time.

    python bench/grpo_tiny.py                       # 3 seeds x (SFT + 2 GRPO runs), ~15 min on 2 cores
    python bench/grpo_tiny.py --seeds 0 --steps 100 # a quick look
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

import torch

from rayrec import recipes
from rayrec.config.genrec import GenRecJobConfig, GRPOJobConfig
from rayrec.config.loader import load_model
from rayrec.genrec.evaluate import evaluate_adapter

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
KEYS = ("test/hr@1", "test/ndcg@10", "test/hr@10")


def sft_job(work: Path, seed: int) -> GenRecJobConfig:
    return load_model(GenRecJobConfig, ROOT / "jobs" / "genrec_tiny.yaml", [
        f"data.path={work}/data", f"sids.dir={work}/sids_s{seed}", f"run.seed={seed}", f"run.name=sft_s{seed}",
        f"run.storage_path={work}/runs", f"tracking.uri=sqlite:///{work}/mlflow.db", "tracking.experiment=grpo_bench"])


def grpo_job(work: Path, seed: int, adapter: str, reward: str, steps: int) -> GRPOJobConfig:
    return load_model(GRPOJobConfig, ROOT / "jobs" / "genrec_tiny_grpo.yaml", [
        f"data.path={work}/data", f"sids.dir={work}/sids_s{seed}", f"run.seed={seed}",
        f"run.name=grpo_{reward}_s{seed}", f"run.storage_path={work}/runs", f"grpo.adapter={adapter}",
        "grpo.rewards.rule=0", "grpo.rewards.ranking=0", f"grpo.rewards.{reward}=1", f"train.max_steps={steps}",
        f"tracking.uri=sqlite:///{work}/mlflow.db", "tracking.experiment=grpo_bench"])


def test_metrics(cfg, adapter: str) -> dict[str, float]:
    res = evaluate_adapter(cfg, adapter, split="test", local=True)
    return {k: res.metrics[k] for k in (*KEYS, "test/invalid")}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rewards", nargs="+", default=["ranking", "rule"])
    ap.add_argument("--steps", type=int, default=300, help="GRPO optimizer steps")
    ap.add_argument("--work", type=Path, default=None, help="runs, data and MLflow (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=RESULTS / "grpo_tiny.json")
    ap.add_argument("--rollouts-only", action="store_true",
                    help="re-measure only the rollout cost with the first seed's SFT adapter in --work, into --out")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    work = (args.work or Path(tempfile.mkdtemp(prefix="rayrec_grpo_bench_"))).resolve()
    if args.rollouts_only:
        from rayrec.runs import run_checkpoint

        seed = args.seeds[0]
        cost = rollout_cost(str(run_checkpoint(work / "runs" / f"sft_s{seed}")), sft_job(work, seed))
        print_cost(cost)
        results = json.loads(args.out.read_text())
        results["rollout_cost"] = cost
        args.out.write_text(json.dumps(results, indent=2))
        print(f"updated rollout_cost in {args.out}")
        return

    per_seed, cost = [], None
    for seed in args.seeds:
        sft_cfg = sft_job(work, seed)
        t0 = time.perf_counter()
        sft = recipes.run(sft_cfg, local=True, console=False)
        row = {"seed": seed, "sft": {**test_metrics(sft_cfg, sft.checkpoint), "minutes": (time.perf_counter() - t0) / 60,
                                     "run": sft.mlflow_run_id}}
        if cost is None:
            cost = rollout_cost(sft.checkpoint, sft_cfg)
        for reward in args.rewards:
            cfg = grpo_job(work, seed, sft.checkpoint, reward, args.steps)
            t0 = time.perf_counter()
            out = recipes.run(cfg, local=True, console=False)
            row[f"grpo_{reward}"] = {**test_metrics(cfg, out.checkpoint), "minutes": (time.perf_counter() - t0) / 60,
                                     "val/ndcg@10": out.metrics.get("val/ndcg@10"), "checkpoint": Path(out.checkpoint).name,
                                     "train/kl": out.metrics.get("train/kl"), "run": out.mlflow_run_id}
        per_seed.append(row)
        print(f"seed {seed}: " + "  ".join(f"{m} hr@1 {row[m]['test/hr@1']:.4f} ndcg@10 {row[m]['test/ndcg@10']:.4f}"
                                         for m in ["sft", *(f"grpo_{r}" for r in args.rewards)]), flush=True)

    models = ["sft", *(f"grpo_{r}" for r in args.rewards)]
    mean = {m: {k: statistics.mean(r[m][k] for r in per_seed) for k in KEYS} for m in models}
    print(f"\ntest metrics, mean of seeds {args.seeds} (each seed: its own SFT adapter; GRPO {args.steps} steps)")
    print(f"{'model':<14}" + "".join(f"{k:>14}" for k in KEYS) + "   per seed (hr@1 / ndcg@10)")
    for m in models:
        seeds = "  ".join(f"{r[m]['test/hr@1']:.3f}/{r[m]['test/ndcg@10']:.3f}" for r in per_seed)
        print(f"{m:<14}" + "".join(f"{mean[m][k]:>14.4f}" for k in KEYS) + f"   {seeds}")
    for m in models[1:]:
        gain = {k: mean[m][k] / mean["sft"][k] - 1 for k in KEYS[:2]}
        wins = sum(r[m]["test/ndcg@10"] > r["sft"]["test/ndcg@10"] for r in per_seed)
        print(f"{m} vs sft: hr@1 {gain['test/hr@1']:+.1%}, ndcg@10 {gain['test/ndcg@10']:+.1%}; "
              f"ndcg@10 higher in {wins}/{len(per_seed)} seeds")
    print_cost(cost)
    print(f"\nside by side in MLflow: rayrec compare grpo_bench --tracking-uri sqlite:///{work}/mlflow.db")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "steps": args.steps, "rewards": args.rewards,
                                    "per_seed": per_seed, "mean": mean, "rollout_cost": cost, "work": str(work),
                                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                "torch": torch.__version__}}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
