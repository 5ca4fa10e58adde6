"""UR4Rec joint model vs SASRec alone at the same budget, per-expert ablations, alternation switches.

Usage:  python bench/ur4rec_ablation.py [--ray] [overrides ...] [--seeds 0 1 2]

Trains jobs/ur4rec_quickstart.yaml (in-process by default, --ray for Ray Train as configured)
and SASRec alone with the same SASRec settings, batch size, data and total epochs. Then, on
the joint model's best checkpoint, evaluates the test split with each expert zeroed, and with
each module alone. Every variant is also measured on two halves of the test rows: targets that
are sparse in training (fewer than --sparse events, where item IDs know little) and the rest.
Prints a table and writes bench/results/ur4rec_ablation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rayrec import recipes  # noqa: E402
from rayrec.config import load_job  # noqa: E402
from rayrec.config.schema import JobConfig  # noqa: E402
from rayrec.data.dataset import open_prepared  # noqa: E402
from rayrec.eval.metrics import MetricSums  # noqa: E402
from rayrec.train.checkpoint import load_state  # noqa: E402
from rayrec.train.evaluation import evaluate  # noqa: E402
from rayrec.train.inputs import data_info  # noqa: E402
from rayrec.train.local import PlainBatches  # noqa: E402
from rayrec.train.specs import build  # noqa: E402

KEYS = ["test/ndcg@10", "test/hr@10", "test/mrr"]
GROUPS = ("sparse", "frequent")  # test targets by how often they occur in training
EXPERTS = ("user_pref", "item_text", "item_image")
SAME, COSINE = "sasrec alone (same budget)", "sasrec alone, cosine LR"


def sasrec_job(joint: JobConfig, schedule: str | None = None) -> JobConfig:
    """SASRec alone: the joint job's SASRec, data, batch size, optimizer and total epochs; stage 1's
    learning rate; ``schedule`` replaces the LR schedule (cosine: SASRec's usual single decay)."""
    raw = joint.model_dump(mode="json")
    raw["model"] = {**raw["model"]["sasrec"], "name": "sasrec"}
    raw["train"]["epochs"] = joint.model.total_epochs
    raw["train"]["optim"]["lr"] = joint.model.stages[0].lr.get("sasrec", joint.train.optim.lr)
    raw["train"]["optim"]["schedule"] = schedule or joint.train.optim.schedule
    raw["run"]["name"] = f"{joint.run.name}_sasrec_{raw['train']['optim']['schedule']}"
    return JobConfig.model_validate(raw)


def target_groups(cfg: JobConfig, sparse: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Item -> 0 (sparse: fewer than ``sparse`` training events) or 1 (frequent), and each group's
    share of the test rows."""
    ds = open_prepared(cfg.data.path)
    counts = np.bincount(np.concatenate(ds.table("train")["seq"].to_numpy()), minlength=data_info(ds, cfg).num_items + 1)
    group = torch.as_tensor((counts >= sparse).astype(np.int64))
    test_group = group[torch.as_tensor(ds.table("test")["target"].to_numpy(np.int64))]
    return group, {g: float((test_group == i).float().mean()) for i, g in enumerate(GROUPS)}


def measure(model, batches, cfg: JobConfig, group: torch.Tensor) -> dict[str, float]:
    """Test metrics over all rows and per target group (``sparse/test/ndcg@10`` ...)."""
    sums = {g: MetricSums(cfg.train.eval.ks) for g in GROUPS}

    def by_group(batch, ranks: torch.Tensor) -> None:
        g = group[batch["target"]]
        for i, name in enumerate(GROUPS):
            sums[name].update(ranks[g == i])

    out = evaluate(model, batches, cfg, len(group) - 1, torch.device("cpu"), prefix="test/", on_ranks=by_group)
    return out | {k: v for name, m in sums.items() for k, v in m.means(f"{name}/test").items()}


def load_model(cfg: JobConfig, checkpoint: str):
    ds = open_prepared(cfg.data.path)
    info = data_info(ds, cfg)
    model = build(cfg, info)
    state = load_state(checkpoint)
    model.load_state_dict(state["best_model"] or state["model"])
    return model, PlainBatches(cfg, ds, info).test()


def variants(cfg: JobConfig, checkpoint: str, group: torch.Tensor) -> dict[str, dict[str, float]]:
    """Test metrics of the joint model's best weights: full, each expert zeroed, each module alone."""
    model, test = load_model(cfg, checkpoint)
    out = {}
    for name, scorer, ablate in ([("joint", "joint", set())] + [(f"joint - {e}", "joint", {e}) for e in EXPERTS]
                                 + [("sasrec part only", "sasrec", set()), ("retriever part only", "retriever", set())]):
        model.scorer, model.retriever.ablate = scorer, ablate
        out[name] = measure(model, test, cfg, group)
    out["joint"]["fusion_weight"] = float(model.fusion_weight)  # as calibrated on validation
    return out


def row_keys() -> list[str]:
    return KEYS + [f"{g}/{KEYS[0]}" for g in GROUPS]


def switch_rows(history: list[dict[str, float]]) -> list[dict[str, float]]:
    keys = ["epoch", "stage", "strategy/switches_from_sasrec_epoch", "strategy/switches_from_retriever_epoch",
            "strategy/epoch_share_sasrec", "train/loss_sasrec", "train/loss_retriever", "val/ndcg@10"]
    return [{k: m[k] for k in keys if k in m} for m in history if "epoch" in m and not any(k.startswith("test/") for k in m)]


def history_of(out, cfg: JobConfig) -> list[dict[str, float]]:
    """Per-epoch metrics: from the local run, or read back from MLflow for a Ray run."""
    if out.history:
        return out.history
    from mlflow.tracking import MlflowClient

    c = MlflowClient(cfg.tracking.uri)
    rows: dict[int, dict[str, float]] = {}
    for key in c.get_run(out.mlflow_run_id).data.metrics:
        for m in c.get_metric_history(out.mlflow_run_id, key):
            rows.setdefault(m.step, {"epoch": m.step})[key.replace("_at_", "@")] = m.value
    return [rows[s] for s in sorted(rows) if s > 0 and "val/ndcg@10" in rows[s]]


def run_seed(seed: int, args, work: Path) -> dict:
    common = [f"run.storage_path={work}/runs", f"tracking.uri=sqlite:///{work}/mlflow.db", f"run.seed={seed}"]
    common += [f"data.path={args.data}"] if args.data else []
    joint = load_job(ROOT / "jobs" / "ur4rec_quickstart.yaml", common + args.overrides + [f"run.name=joint_s{seed}"])
    t0 = time.perf_counter()
    jout = recipes.run(joint, local=not args.ray)
    t_joint = time.perf_counter() - t0
    group, shares = target_groups(joint, args.sparse)
    rows = {}
    for name, schedule in ((SAME, None), (COSINE, "cosine")):
        t0 = time.perf_counter()
        scfg = sasrec_job(joint, schedule)
        sout = recipes.run(scfg, local=not args.ray)
        wall = time.perf_counter() - t0
        rows[name] = {k: v for k, v in measure(*load_model(scfg, sout.checkpoint), scfg, group).items()
                      if k in row_keys()} | {"wall_s": wall}
    for name, m in variants(joint, jout.checkpoint, group).items():
        rows[name] = {k: m[k] for k in row_keys() + ["fusion_weight"] if k in m}
    rows["joint"]["wall_s"] = t_joint
    weight = rows["joint"].pop("fusion_weight", None)
    return {"seed": seed, "rows": rows, "epochs": joint.model.total_epochs, "fusion_weight": weight,
            "sparse_threshold": args.sparse, "test_share": shares,
            "switches": switch_rows(history_of(jout, joint)), "joint_best_epoch": jout.metrics.get("best_epoch")}


def print_seed(r: dict) -> None:
    print(f"\nseed {r['seed']}: test split, full ranking, {r['epochs']} epochs each; fusion weight "
          f"(SASRec's share, calibrated on validation) {r['fusion_weight']}")
    share = r["test_share"]
    print(f"sparse: test targets with < {r['sparse_threshold']} training events ({100 * share['sparse']:.0f} % of rows)")
    keys = row_keys()
    print(f"{'variant':<28}" + "".join(f"{k:>22}" for k in keys) + f"{'wall s':>9}")
    for name, m in r["rows"].items():
        wall = f"{m['wall_s']:>9.0f}" if "wall_s" in m else ""
        print(f"{name:<28}" + "".join(f"{m[k]:>22.4f}" for k in keys) + wall)
    print("\njoint epochs: switches away from each module, SASRec's share of steps, module losses")
    for s in r["switches"]:
        if "strategy/switches_from_sasrec_epoch" in s:
            print(f"  epoch {int(s['epoch']):>2}: from sasrec {int(s['strategy/switches_from_sasrec_epoch'])}, "
                  f"from retriever {int(s['strategy/switches_from_retriever_epoch'])}, "
                  f"sasrec share {s['strategy/epoch_share_sasrec']:.2f}, loss sasrec {s.get('train/loss_sasrec', float('nan')):.3f}, "
                  f"loss retriever {s.get('train/loss_retriever', float('nan')):.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ray", action="store_true", help="train on Ray Train as the job says (default: in-process)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--data", type=Path, default=None, help="prepared data (made if absent; default: the job's data.path)")
    p.add_argument("--sparse", type=int, default=20, help="a target is sparse with fewer training events than this")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ur4rec_ablation.json")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="rayrec-ur4rec-"))
    results = [run_seed(s, args, work) for s in args.seeds]
    for r in results:
        print_seed(r)
    mean = {name: {k: sum(r["rows"][name][k] for r in results) / len(results) for k in row_keys()}
            for name in results[0]["rows"]}
    base = max(mean[SAME]["test/ndcg@10"], mean[COSINE]["test/ndcg@10"])
    print(f"\nmean over seeds {args.seeds}: joint NDCG@10 {mean['joint']['test/ndcg@10']:.4f} vs best SASRec alone {base:.4f} "
          f"({100 * (mean['joint']['test/ndcg@10'] / base - 1):+.1f} %)")
    for e in EXPERTS:
        print(f"  without {e:<10}: {mean[f'joint - {e}']['test/ndcg@10']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": "ur4rec_ablation", "ray": args.ray, "overrides": args.overrides,
                               "seeds": results, "mean": mean}, indent=2))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
