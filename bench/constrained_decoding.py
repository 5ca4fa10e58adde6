"""Benchmark of the generative track's two targets; prints a table and writes JSON under bench/results/.

1. Constrained decoding overhead: rows/s of constrained beam search (SID trie as a
   logits processor, trie built once) against the same model's unconstrained beam search
   at the same ``num_beams``. Target: ratio >= 0.7.
2. (``--sft``) Quality on the tiny synthetic task: test HR@10 / NDCG@10 of LoRA SFT
   (``jobs/genrec_tiny.yaml``, run in-process) against the popularity baseline
   (written to ``bench/results/genrec_tiny_sft.json``).

Rows/s are given by wall clock and by this process's CPU time: on a shared host the wall
clock mostly measures the neighbours, while CPU time measures the decoding itself.

    python bench/constrained_decoding.py                  # decoding only (about a minute on 2 cores)
    python bench/constrained_decoding.py --sft            # + the tiny SFT run (a few minutes)
    python bench/constrained_decoding.py --items 5000 --hidden 256 --layers 4 --beams 20 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from rayrec.genrec import constrained as C
from rayrec.genrec.lm import extend_tokenizer
from rayrec.genrec.prompts import INSTRUCTIONS, render
from rayrec.genrec.semantic_ids import sid_token
from rayrec.genrec.tiny import tiny_qwen2, tiny_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"


def random_sids(n: int, levels: int, k: int, seed: int = 0) -> dict[int, tuple[str, ...]]:
    """n distinct random SIDs of ``levels`` codes in 0..k-1."""
    rng = np.random.default_rng(seed)
    codes: set[tuple[int, ...]] = set()
    while len(codes) < n:
        codes.add(tuple(int(c) for c in rng.integers(k, size=levels)))
    return {i + 1: tuple(sid_token(lvl, c) for lvl, c in enumerate(code)) for i, code in enumerate(sorted(codes))}


def prompts_for(sids: dict[int, tuple[str, ...]], rows: int, history: int, seed: int = 0) -> list[str]:
    """Realistic eval prompts: the Alpaca template over ``history`` random SIDs."""
    rng = np.random.default_rng(seed)
    items = list(sids)
    out = []
    for _ in range(rows):
        hist = rng.choice(items, size=history, replace=False)
        listed = ", ".join("".join(sids[i]) for i in hist)
        out.append(render(INSTRUCTIONS["sid_seq"][0], "The user interacted with: " + listed))
    return out


def run_once(model, tok, prompts, trie, beams: int, batch: int, constrained: bool) -> tuple[float, float, list]:
    """(wall seconds, CPU seconds of this process, ranked output) of one pass over ``prompts``."""
    w0, c0 = time.perf_counter(), time.process_time()
    ranked = C.beam_rank(model, tok, prompts, trie, num_beams=beams, batch_size=batch, constrained=constrained)
    return time.perf_counter() - w0, time.process_time() - c0, ranked


def summary(passes: list[tuple[float, float, list]], rows: int, beams: int, pad: int) -> dict:
    """Median rows/s over passes, by wall clock and by CPU time, plus invalid outputs and lengths."""
    ranked = passes[-1][2]
    return {"rows_per_s": statistics.median(rows / w for w, _, _ in passes),
            "rows_per_cpu_s": statistics.median(rows / c for _, c, _ in passes),
            "wall_s": [w for w, _, _ in passes], "cpu_s": [c for _, c, _ in passes],
            "invalid": sum(i is None for r in ranked for i in r.items), "outputs": len(ranked) * beams,
            "mean_generated_tokens": statistics.mean(len([t for t in x if t != pad]) for r in ranked for x in r.tokens)}


def time_pair(model, tok, prompts, trie, beams: int, batch: int, repeats: int) -> tuple[dict, dict]:
    """Unconstrained and constrained passes, interleaved so load changes hit both alike."""
    for constrained in (False, True):  # warm-up
        C.beam_rank(model, tok, prompts[:batch], trie, num_beams=beams, batch_size=batch, constrained=constrained)
    free, cons = [], []
    for _ in range(repeats):
        free.append(run_once(model, tok, prompts, trie, beams, batch, False))
        cons.append(run_once(model, tok, prompts, trie, beams, batch, True))
    pad = tok.pad_token_id
    return summary(free, len(prompts), beams, pad), summary(cons, len(prompts), beams, pad)


def bench_decoding(args) -> dict:
    sids = random_sids(args.items, args.levels, args.codebook, args.seed)
    prompts = prompts_for(sids, args.rows, args.history, args.seed)
    tok = tiny_tokenizer(prompts)
    extend_tokenizer(tok, sorted({t for s in sids.values() for t in s}))
    model = tiny_qwen2(len(tok), hidden=args.hidden, layers=args.layers, heads=4, kv_heads=2, seed=args.seed).eval()
    t0 = time.perf_counter()
    trie = C.build_trie(tok, sids)
    build_s = time.perf_counter() - t0
    rows = []
    for beams in args.beams:
        free, cons = time_pair(model, tok, prompts, trie, beams, args.batch, args.repeats)
        rows.append({"num_beams": beams, "unconstrained": free, "constrained": cons,
                     "ratio": cons["rows_per_s"] / free["rows_per_s"],
                     "ratio_cpu": cons["rows_per_cpu_s"] / free["rows_per_cpu_s"]})
    prompt_tokens = statistics.mean(len(tok(p)["input_ids"]) for p in prompts)
    setup = {k: getattr(args, k) for k in ("items", "levels", "codebook", "rows", "batch", "history", "hidden",
                                           "layers", "repeats", "seed")}
    return {"setup": {**setup, "vocab": len(tok), "prompt_tokens": prompt_tokens, "trie_build_s": build_s,
                      "trie_nodes": trie.num_nodes, "torch_threads": torch.get_num_threads()},
            "rows": rows, "target_ratio": 0.7, "meets_target_wall": all(r["ratio"] >= 0.7 for r in rows),
            "meets_target_cpu": all(r["ratio_cpu"] >= 0.7 for r in rows)}


def bench_sft(job: str) -> dict:
    """The tiny job end to end in this process; test metrics of SFT and of popularity."""
    from rayrec import recipes
    from rayrec.config.genrec import GenRecJobConfig
    from rayrec.config.loader import load_model
    from rayrec.genrec.evaluate import evaluate_adapter

    cfg = load_model(GenRecJobConfig, job, ["tracking.enabled=false", "run.name=bench_genrec_tiny"])
    t0 = time.perf_counter()
    out = recipes.run(cfg, local=True, source=job)
    train_s = time.perf_counter() - t0
    res = evaluate_adapter(cfg, out.checkpoint, local=True)
    m = res.metrics
    return {"job": job, "adapter": out.checkpoint, "train_s": train_s, "eval_s": time.perf_counter() - t0 - train_s,
            "test": {k: m[k] for k in sorted(m) if k.startswith("test/")},
            "popularity": {k: m[k] for k in sorted(m) if k.startswith("test_popularity/")}}


def print_tables(dec: dict, sft: dict | None) -> None:
    s = dec["setup"]
    print(f"\nconstrained beam search vs unconstrained (same model, same num_beams); items={s['items']}, "
          f"SID {s['levels']}x{s['codebook']}, tiny Qwen2 h={s['hidden']} L={s['layers']}, vocab={s['vocab']}, "
          f"prompt ~{s['prompt_tokens']:.0f} tokens, batch={s['batch']}, trie built once in {s['trie_build_s']:.2f}s")
    print(f"{'num_beams':>9}  {'rows/s unc.':>11}  {'rows/s con.':>11}  {'ratio':>5}  {'rows/CPU-s unc.':>15}  "
          f"{'rows/CPU-s con.':>15}  {'ratio':>5}  {'invalid unc.':>12}  {'invalid con.':>12}")
    for r in dec["rows"]:
        u, c = r["unconstrained"], r["constrained"]
        print(f"{r['num_beams']:>9}  {u['rows_per_s']:>11.1f}  {c['rows_per_s']:>11.1f}  {r['ratio']:>5.2f}  "
              f"{u['rows_per_cpu_s']:>15.1f}  {c['rows_per_cpu_s']:>15.1f}  {r['ratio_cpu']:>5.2f}  "
              f"{u['invalid']:>5}/{u['outputs']:<6}  {c['invalid']:>5}/{c['outputs']:<6}")
    print(f"target ratio >= {dec['target_ratio']}: wall clock {'met' if dec['meets_target_wall'] else 'NOT met'}, "
          f"CPU time {'met' if dec['meets_target_cpu'] else 'NOT met'} (CPU time is the fair measure on a shared host)")
    if sft:
        print(f"\ntiny synthetic task ({sft['job']}), test split, constrained beam search")
        print(f"{'metric':>10}  {'LoRA SFT':>9}  {'popularity':>10}")
        for k in ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@10"):
            t, p = sft["test"].get(f"test/{k}"), sft["popularity"].get(f"test_popularity/{k}")
            if t is not None:
                print(f"{k:>10}  {t:>9.4f}  {p:>10.4f}")
        print(f"invalid outputs: {sft['test']['test/invalid']:.0f}; "
              f"train {sft['train_s']:.0f}s, eval {sft['eval_s']:.0f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook", type=int, default=32)
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--history", type=int, default=10)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--beams", type=int, nargs="+", default=[10, 20])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft", action="store_true", help="also run jobs/genrec_tiny.yaml and compare with popularity")
    p.add_argument("--job", default="jobs/genrec_tiny.yaml")
    p.add_argument("--out", type=Path, default=RESULTS / "constrained_decoding.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dec = bench_decoding(args)
    sft = bench_sft(args.job) if args.sft else None
    print_tables(dec, sft)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    args.out.write_text(json.dumps({"env": info, "decoding": dec}, indent=2))
    print(f"\nwrote {args.out}")
    if sft:
        sft_out = args.out.with_name("genrec_tiny_sft.json")
        sft_out.write_text(json.dumps({"env": info, "sft": sft}, indent=2))
        print(f"wrote {sft_out}")


if __name__ == "__main__":
    main()
