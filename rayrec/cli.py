"""The `rayrec` command. Each subcommand is a short function that reads top to bottom."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rayrec.errors import RayrecError
from rayrec.secrets import mask_text

SOURCES_HELP = "synthetic, movielens-100k, movielens-1m, movielens-multimodal, recbole, minionerec, amazon, csv"


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare and inspect datasets")
    dsub = data.add_subparsers(dest="data_cmd", required=True, metavar="{prepare,synth,info}")

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayrec",
        description="Train and tune recommendation models on Ray (laptop or cluster).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _add_data(sub)
    for add in _extra_commands():
        add(sub)
    return parser


def _extra_commands():
    """Subcommands defined next to the code they run (train, eval, ...)."""
    from rayrec.data.features_cli import add_commands as add_features
    from rayrec.genrec.cli import add_commands as add_genrec
    from rayrec.prefs.cli import add_commands as add_prefs
    from rayrec.submit import add_commands as add_submit
    from rayrec.train.cli import add_commands as add_train
    from rayrec.tune.cli import add_commands as add_tune

    return [add_train, add_tune, add_genrec, add_submit, add_features, add_prefs]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may come after options (`train JOB --local a.b=1`): collect them too
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        loose = [x for x in extra if "=" not in x and not x.startswith("-")]
        if hasattr(args, "overrides") and loose:
            parser.error(f"unrecognized arguments: {' '.join(extra)}; overrides are key=value with no spaces "
                         f"(e.g. {loose[0]}=VALUE, or train.epochs=5)")
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except RayrecError as e:
        print(f"error: {mask_text(str(e))}", file=sys.stderr)  # a URI's credentials never reach the screen
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
