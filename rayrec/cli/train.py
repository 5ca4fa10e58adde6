"""`rayrec train` and `rayrec eval`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rayrec.data.atomic import atomic_write
from rayrec.errors import ConfigError
from rayrec.storage import path_or_uri


def add_commands(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a job (Ray Train workers, or --local in this process)")
    t.add_argument("job", type=Path, help="job YAML, e.g. jobs/quickstart.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.optim.lr=3e-4 scaling.num_workers=2")
    t.add_argument("--local", action="store_true", help="run the loop in this process without Ray")
    t.add_argument("--resume-from", help="checkpoint folder to start from (a new run)")
    t.add_argument("--json", type=Path, help="also write the final metrics to this JSON file")
    t.add_argument("--print-groups", action="store_true",
                   help="print each phase's (ur4rec: stage's) optimizer param groups, sizes and LR/WD, and exit")
    t.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show Ray's and the workers' own output here too (else: rayrec.log in the run folder)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on the valid or test split")
    e.add_argument("job", type=Path)
    e.add_argument("overrides", nargs="*")
    e.add_argument("--checkpoint", required=True, type=path_or_uri,
                   help="checkpoint folder (holds state.pt), or its s3:// / gs:// URI")
    e.add_argument("--split", choices=["valid", "test"], default="test")
    e.add_argument("--weights", choices=["best", "last"], default="best")
    e.set_defaults(func=cmd_eval)


def cmd_train(args: argparse.Namespace) -> int:
    from rayrec.cli.jobs import sequential_job
    from rayrec.recipes import recipe_for
    from rayrec.runs import print_outcome, run_job

    cfg = sequential_job(args, shared=False)  # run_job puts the paths under the storage root itself
    if args.print_groups:
        print_groups(cfg)
        return 0
    recipe = recipe_for(cfg)
    check_json_target(args.json)
    out = run_job(recipe, cfg, local=args.local, source=str(args.job), resume_from=args.resume_from,
                  verbose=args.verbose)
    if args.json:
        atomic_write(args.json, json.dumps(out.metrics, indent=2))
    print_outcome(recipe, out, f"final metrics ({cfg.model.name}, best epoch by {cfg.train.early_stopping.metric})")
    if cfg.export.name:
        from rayrec.cli.recs import export_at_end

        export_at_end(out.checkpoint, cfg)
    return 0


def check_json_target(path: Path | None) -> None:
    """``--json``'s folder must exist before the run, not be found missing after it."""
    if path is not None and not path.expanduser().resolve().parent.is_dir():
        raise ConfigError(f"--json {path}: folder {path.parent} does not exist; create it or write the JSON elsewhere")


def print_groups(cfg) -> None:
    """The optimizer's param groups of every phase (or ur4rec stage and module); trains nothing."""
    from rayrec.cluster import shared_paths
    from rayrec.data.dataset import ensure_prepared
    from rayrec.train.groups import group_table
    from rayrec.train.inputs import data_info
    from rayrec.train.specs import build, has_parameters, spec_of

    cfg = shared_paths(cfg)
    info = data_info(ensure_prepared(cfg.data), cfg)
    model = build(cfg, info)
    if not has_parameters(model):
        print(f"model {cfg.model.name} has no trainable parameters")
        return
    for title, groups, frozen in spec_of(cfg.model.name).group_plan(cfg, model):
        _print_groups(group_table(groups), title)
        if frozen:
            print(f"frozen: {len(frozen)} tensors ({', '.join(frozen[:6])}{', ...' if len(frozen) > 6 else ''})")


def _print_groups(rows: list[tuple[str, ...]], title: str) -> None:
    head = ("group", "tensors", "parameters", "lr", "weight decay")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print(f"\n{title}")
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def cmd_eval(args: argparse.Namespace) -> int:
    from rayrec.cli.jobs import sequential_job
    from rayrec.runs import local_checkpoint, print_table
    from rayrec.train.local import evaluate_checkpoint

    cfg = sequential_job(args)
    metrics, epoch = evaluate_checkpoint(cfg, local_checkpoint(args.checkpoint), args.split, args.weights)
    print_table([(k, f"{v:.4f}") for k, v in sorted(metrics.items())],
                f"{args.split} metrics of {args.checkpoint} ({args.weights} weights, epoch {epoch})")
    return 0
