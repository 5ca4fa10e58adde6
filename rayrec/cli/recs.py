"""`rayrec recommend`, `rayrec export` and `rayrec eval-recs`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rayrec.storage import path_or_uri


def add_commands(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("recommend", help="top-K items per user from a trained run, to a Parquet file")
    r.add_argument("run", type=path_or_uri, help="a run folder (its chosen checkpoint), a checkpoint folder or an SFT/GRPO adapter")
    r.add_argument("job", type=Path, nargs="?", help="the job of an adapter that does not keep its own (older checkpoints)")
    r.add_argument("--k", type=int, default=20, help="items per user (default 20)")
    r.add_argument("--out", type=Path, required=True, help="output folder (replaced whole on a rerun)")
    r.add_argument("--as-of", choices=["valid", "test", "all"], default="test",
                   help="histories read: through train (predicts valid), through valid (predicts test, the "
                   "default), every event (production)")
    r.add_argument("--users", type=Path, help="only these raw user ids (one per line, or a CSV/Parquet first column)")
    r.add_argument("--histories", type=Path, help="fresh histories (user_id, item_id[, timestamp]; CSV or Parquet) of "
                   "users the model never saw; unknown items are skipped, a history with none known gets the popular items")
    r.add_argument("--include-seen", action="store_true", help="also recommend items already in the history")
    r.add_argument("--local", action="store_true", help="score in this process instead of Ray Data actors")
    r.add_argument("--actors", type=int, help="Ray Data actors (default: the cluster's CPUs minus one)")
    r.add_argument("--batch-size", type=int, default=256, help="users scored at a time (default 256)")
    r.set_defaults(func=cmd_recommend)

    x = sub.add_parser("export", help="log a trained run as an MLflow pyfunc model and register it")
    x.add_argument("run", type=path_or_uri, help="a run folder (its chosen checkpoint), a checkpoint folder or an adapter")
    x.add_argument("job", type=Path, nargs="?", help="the job of an adapter that does not keep its own")
    x.add_argument("--name", required=True, help="registered model name")
    x.add_argument("--alias", help="alias to point at the new version (e.g. champion)")
    x.add_argument("--tracking-uri", help="default: the run's tracking.uri")
    x.set_defaults(func=cmd_export)

    e = sub.add_parser("eval-recs", help="HR@k, NDCG@k, MRR@K of a recommend output against a prepared split")
    e.add_argument("folder", type=Path, help="a `rayrec recommend --out` folder")
    e.add_argument("--split", choices=["valid", "test"], default="test")
    e.set_defaults(func=cmd_eval_recs)


def cmd_recommend(args: argparse.Namespace) -> int:
    from rayrec.recs.recommend import Request, recommend

    req = Request(args.run, args.k, args.as_of, args.include_seen, args.users, args.batch_size, args.histories, args.job)
    meta = recommend(req, args.out, local=args.local, actors=args.actors)
    notes = [f"{meta['unknown_users']} listed users are not in the data" if meta.get("unknown_users") else "",
             f"{meta['unknown_items']} events name unknown items (skipped)" if meta.get("unknown_items") else "",
             f"{meta['popularity_users']} users with no known item got the popular items"
             if meta.get("popularity_users") else ""]
    print(f"{meta['users']} users x top-{meta['k']} (as of {meta['as_of']}) -> {args.out}/recs.parquet"
          + "".join(f"; {n}" for n in notes if n))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rayrec.recs.export import export

    show_export(export(args.run, args.name, args.alias, job=args.job, tracking_uri=args.tracking_uri))
    return 0


def export_at_end(checkpoint, cfg) -> None:
    """``export.name`` of a job: register what a finished run (or a sweep's best trial) trained."""
    from rayrec.recs.export import export

    if checkpoint is None:
        print(f"\nexport.name={cfg.export.name}: nothing to export (no checkpoint)")
        return
    print()
    show_export(export(path_or_uri(str(checkpoint)), cfg.export.name, cfg.export.alias, tracking_uri=cfg.tracking.uri))


def show_export(done) -> None:
    print(f"registered {done.name} version {done.version}" + (f" as @{done.alias}" if done.alias else "")
          + f" (MLflow run {done.run_id}, {done.tracking_uri})")
    print(f"load it:  mlflow.pyfunc.load_model(\"{done.model_uri}\").predict(pd.DataFrame({{\"user_id\": [...]}}), "
          "params={\"k\": 10})")
    print(f"serve it: mlflow models serve -m {done.model_uri} --env-manager local -h 127.0.0.1 -p 5001")


def cmd_eval_recs(args: argparse.Namespace) -> int:
    from rayrec.recs.evaluate import eval_recs
    from rayrec.runs import print_table

    metrics = eval_recs(args.folder, args.split)
    print_table([(k, f"{v:g}" if k.endswith("/rows") else f"{v:.4f}") for k, v in sorted(metrics.items())],
                f"{args.split} metrics of {args.folder}")
    return 0
