"""The multi-interest model of seed 003: three phases vs end to end, module ablations, SASRec; 3 seeds.

On a synthetic world whose users follow a mixture of 1-3 topics (several interests by
construction), every run has the same epoch budget and comes from
``jobs/multi_interest_quickstart.yaml`` with one override each:

- ``phased``: the job as written (seed 003's three phases and per-module LR/WD table);
- ``e2e``: the same model and table, all losses at weight 1 from step 0 (``train.phases=[]``);
- ``no_vae``, ``no_causal``, ``no_complex``, ``k1``: the phased run without one module (K = 1);
- ``vae_detached``: the phased run with a VAE that models the interests without changing them;
- ``sasrec``: ``jobs/quickstart.yaml``'s SASRec at the same width, depth and epochs.

It prints test NDCG@10 / HR@10 (mean +- std over seeds), NaN/Inf steps skipped, and the rec
and causal losses of the first and last epoch; writes ``bench/results/multi_interest.json`` and
a figure of the phased and e2e curves (``bench/results/multi_interest_curves.png``). All runs log
to one MLflow store (``rayrec compare multi_interest_bench --tracking-uri ...`` shows them).

    python bench/multi_interest.py                     # 7 variants x 3 seeds, ~15 min on 2 cores
    python bench/multi_interest.py --seeds 0 --variants phased e2e
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from rayrec import recipes
from rayrec.config import load_job

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORLD = "{users: 1000, items: 500, topics: 12, mean_len: 30, seed: 0, images: false}"
SIZE = ["model.hidden=32", "model.num_blocks=1", "model.max_len=30"]
VARIANTS = {
    "phased": [],
    "e2e": ["train.phases=[]"],
    "no_vae": ["model.vae.enabled=false"],
    "vae_detached": ["model.vae.shape_interests=false"],
    "no_causal": ["model.causal.enabled=false"],
    "no_complex": ["model.complex.enabled=false"],
    "k1": ["model.num_interests=1"],
    "sasrec": None,
}


def job(variant: str, work: Path, seed: int):
    common = [f"data.path={work}/data", f"data.synth={WORLD}", f"run.seed={seed}", f"run.name={variant}_s{seed}",
              f"run.storage_path={work}/runs", f"tracking.uri=sqlite:///{work}/mlflow.db",
              "tracking.experiment=multi_interest_bench", "train.early_stopping.patience=100"]
    if VARIANTS[variant] is None:
        return load_job(ROOT / "jobs" / "quickstart.yaml", [*common, *SIZE, "train.epochs=12",
                                                             "train.optim.weight_decay=0.01"])
    return load_job(ROOT / "jobs" / "multi_interest_quickstart.yaml", [*common, *SIZE, *VARIANTS[variant]])


def summarize(out) -> dict:
    hist = out.history
    def series(k):
        return [m.get(k) for m in hist]
    return {"ndcg10": out.metrics["test/ndcg@10"], "hr10": out.metrics["test/hr@10"],
            "best_epoch": out.metrics["best_epoch"], "skipped": sum(m.get("health/skipped_steps", 0) for m in hist),
            "val_ndcg10": series("val/ndcg@10"), "loss_rec": series("train/loss_rec"),
            "loss_causal": series("train/loss_causal"), "loss_kl": series("train/loss_kl"),
            "mlflow_run_id": out.mlflow_run_id}


def figure(results: dict, path: Path) -> None:
    from rayrec.tracking.plots import plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for variant, color in (("phased", "tab:blue"), ("e2e", "tab:red")):
        for i, r in enumerate(results.get(variant, [])):
            label = variant if i == 0 else None
            axes[0].plot(range(1, len(r["loss_rec"]) + 1), r["loss_rec"], color=color, alpha=0.7, label=label)
            axes[1].plot(range(1, len(r["loss_causal"]) + 1), [v if v is not None else float("nan") for v in r["loss_causal"]],
                         color=color, alpha=0.7, label=label)
            axes[2].plot(range(1, len(r["val_ndcg10"]) + 1), r["val_ndcg10"], color=color, alpha=0.7, label=label)
    for ax, title in zip(axes, ("train/loss_rec", "train/loss_causal", "val/ndcg@10"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    for end in (3, 8):  # the phased run's boundaries
        for ax in axes:
            ax.axvline(end + 0.5, color="grey", lw=0.5, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--work", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="mi_bench_"))
    print(f"work folder: {work}", flush=True)
    results: dict[str, list[dict]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            out = recipes.run(job(variant, work, seed), local=True, console=False)
            results.setdefault(variant, []).append({"seed": seed, **summarize(out)})
            print(f"{variant} seed {seed}: test/ndcg@10 {out.metrics['test/ndcg@10']:.4f}", flush=True)

    def stat(rs, k):
        vals = [r[k] for r in rs]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    print(f"\n{'variant':<12}{'NDCG@10':>16}{'HR@10':>16}{'skipped':>9}{'rec loss e1->last':>20}{'causal e1->last':>18}")
    table = {}
    for variant, rs in results.items():
        (n, ns), (h, hs) = stat(rs, "ndcg10"), stat(rs, "hr10")
        r0 = rs[0]
        causal = [v for v in r0["loss_causal"] if v is not None]
        rec = f"{r0['loss_rec'][0]:.2f}->{r0['loss_rec'][-1]:.2f}" if r0["loss_rec"][0] is not None else "-"
        cau = f"{causal[0]:.2f}->{causal[-1]:.2f}" if causal else "-"
        skipped = sum(r["skipped"] for r in rs)
        print(f"{variant:<12}{n:>10.4f}+-{ns:.4f}{h:>10.4f}+-{hs:.4f}{skipped:>9}{rec:>20}{cau:>18}")
        table[variant] = {"ndcg10_mean": n, "ndcg10_std": ns, "hr10_mean": h, "hr10_std": hs, "skipped": skipped}
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "phased" in results and "e2e" in results:
        figure(results, RESULTS / "multi_interest_curves.png")
    path = RESULTS / "multi_interest.json"
    path.write_text(json.dumps({"machine": platform.platform(), "world": WORLD, "size": SIZE, "seeds": args.seeds,
                                "table": table, "runs": results, "mlflow": f"sqlite:///{work}/mlflow.db"}, indent=2))
    print(f"\nwrote {path}\nrayrec compare multi_interest_bench --tracking-uri sqlite:///{work}/mlflow.db")


if __name__ == "__main__":
    main()
