"""`rayrec data prepare|synth|info|features`: prepared datasets and a joint job's features."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rayrec.errors import RayrecError

SOURCES_HELP = "synthetic, movielens-100k, movielens-1m, movielens-multimodal, recbole, minionerec, amazon, csv"


def add_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare and inspect datasets")
    dsub = data.add_subparsers(dest="data_cmd", required=True, metavar="{prepare,synth,info,features}")

    p = dsub.add_parser("prepare", help="read a raw source, filter, split, write a prepared dataset")
    p.add_argument("source", help=f"one of: {SOURCES_HELP}")
    p.add_argument("--input", type=Path, help="raw input file or folder of the source")
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    _add_prepare_options(p)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra reader option, e.g. --option user_col=userId (repeatable)")
    p.set_defaults(func=cmd_data_prepare)

    s = dsub.add_parser("synth", help="generate and prepare the synthetic dataset (no download)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--users", type=int, default=943)
    s.add_argument("--items", type=int, default=1682)
    s.add_argument("--topics", type=int, default=12)
    s.add_argument("--mean-len", type=int, default=60)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--styles", type=int, default=0,
                   help="split topics into genre (text) x look (image); must divide --topics (0 = off)")
    s.add_argument("--new-items", type=float, default=0.0,
                   help="fraction of items released at the end of the log (cold-start items)")
    s.add_argument("--new-window", type=int, default=3, help="last steps of each history where new items appear")
    s.add_argument("--no-images", action="store_true", help="skip writing item PNGs")
    _add_prepare_options(s)
    s.set_defaults(func=cmd_data_synth)

    i = dsub.add_parser("info", help="statistics of a prepared dataset")
    i.add_argument("path", type=Path)
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=cmd_data_info)

    _add_features(dsub)


def _add_prepare_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="leave_one_out", choices=["leave_one_out", "temporal", "user_prefix"])
    p.add_argument("--min-rating", type=float, default=None, help="keep events with rating >= this")
    p.add_argument("--user-core", type=int, default=0, help="k-core: min events per user")
    p.add_argument("--item-core", type=int, default=0, help="k-core: min events per item")
    p.add_argument("--min-seq-len", type=int, default=3, help="drop users with fewer events")
    p.add_argument("--max-seq-len", type=int, default=None, help="keep the last N events per user")
    p.add_argument("--on-bad-line", choices=["error", "skip"], default="error")
    p.add_argument("--drop-duplicates", action="store_true",
                   help="drop repeated (user, item, timestamp) events (counted in the manifest either way)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (a prepared dataset only)")


def _filters(args: argparse.Namespace):
    from rayrec.config.schema import FilterConfig

    return FilterConfig(min_rating=args.min_rating, user_core=args.user_core, item_core=args.item_core,
                        min_seq_len=args.min_seq_len, max_seq_len=args.max_seq_len,
                        drop_duplicates=args.drop_duplicates)


def _parse_options(items: list[str]) -> dict[str, object]:
    from rayrec.config.loader import parse_override

    return dict(parse_override(i) for i in items)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from rayrec.data.dataset import open_prepared, source_reader
    from rayrec.data.prepare import prepare
    from rayrec.data.sources import SOURCES

    if args.source not in SOURCES:
        raise RayrecError(f"unknown source '{args.source}'; choose one of: {', '.join(SOURCES)}")
    options = _parse_options(args.option)
    read = source_reader(args.source, args.input, on_bad_line=args.on_bad_line, options=options)
    params = {"source": args.source, "input": str(args.input), "options": options}
    prepare(read, args.out, source=args.source, params=params, filters=_filters(args),
            split=args.split, overwrite=args.overwrite)
    _print_info(open_prepared(args.out))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from rayrec.data.dataset import open_prepared, source_reader
    from rayrec.data.prepare import prepare

    synth = {"users": args.users, "items": args.items, "topics": args.topics, "mean_len": args.mean_len,
             "seed": args.seed, "images": not args.no_images, "styles": args.styles,
             "new_items": args.new_items, "new_window": args.new_window}
    read = source_reader("synthetic", None, on_bad_line=args.on_bad_line, synth=synth)
    prepare(read, args.out, source="synthetic", params={"source": "synthetic", "synth": synth},
            filters=_filters(args), split=args.split, overwrite=args.overwrite)
    _print_info(open_prepared(args.out))
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from rayrec.data.dataset import describe, open_prepared

    ds = open_prepared(args.path)
    if args.json:
        print(json.dumps(describe(ds), indent=2))
    else:
        _print_info(ds)
    return 0


def _print_info(ds) -> None:
    from rayrec.data.dataset import describe

    d = describe(ds)
    rows = [
        ("dataset", d["path"]), ("source", d["source"]), ("split", d["split"]),
        ("users", f"{d['users']:,}"), ("items", f"{d['items']:,}"),
        ("interactions", f"{d['interactions']:,}"), ("sparsity", f"{d['sparsity']:.4%}"),
        ("train seq len mean", f"{d['train_seq_len_mean']:.1f}"),
        ("train seq len p5/p50/p95/max", "/".join(f"{d['train_seq_len'][k]:.0f}" for k in ("p5", "p50", "p95", "max"))),
        ("train users / events", f"{d['split_sizes']['train_users']:,} / {d['split_sizes']['train_events']:,}"),
        ("valid rows", f"{d['split_sizes']['valid_rows']:,}"), ("test rows", f"{d['split_sizes']['test_rows']:,}"),
        ("skipped lines", str(d["skipped_lines"])), ("missing", json.dumps(d["missing"]) if d["missing"] else "-"),
        ("input hash", d["input_hash"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _add_features(dsub: argparse._SubParsersAction) -> None:
    f = dsub.add_parser("features", help="text/image embeddings of a ur4rec job (cached)")
    f.add_argument("job", type=Path, help="a ur4rec job YAML (its model.features section)")
    f.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.features.text_model=hash:256")
    f.add_argument("--local", action="store_true", help="encode in this process instead of Ray Data")
    f.add_argument("--force", action="store_true", help="rewrite the feature files even if up to date")
    f.set_defaults(func=cmd_data_features)


def cmd_data_features(args: argparse.Namespace) -> int:
    from rayrec.cli.jobs import joint_job
    from rayrec.cluster import gpu_available
    from rayrec.data.dataset import ensure_prepared
    from rayrec.data.features import compute_features, manifest_summary, num_users_of
    from rayrec.prefs.generate import prefs_out_dir

    cfg = joint_job(args, "features", "data features")
    ds = ensure_prepared(cfg.data)
    if not args.local:
        from rayrec.cluster import ensure_ray

        ensure_ray()
    manifest = compute_features(cfg.model.features, ds.path, num_users_of(ds.path),
                                prefs_dir=prefs_out_dir(cfg.model.prefs, ds.path), use_ray=not args.local,
                                use_gpu=cfg.scaling.use_gpu and gpu_available(not args.local), force=args.force)
    print(json.dumps(manifest_summary(manifest), indent=2))
    return 0
