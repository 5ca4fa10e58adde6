"""`rayrec prefs generate JOB.yaml`."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prefs", help="LLM (or template) user preferences and item descriptions")
    psub = p.add_subparsers(dest="prefs_cmd", required=True, metavar="{generate}")
    g = psub.add_parser("generate", help="summarise users' tastes and describe items (model.prefs of the job)")
    g.add_argument("job", type=Path, help="a ur4rec job YAML (its model.prefs section)")
    g.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.prefs.backend=openai")
    g.add_argument("--num-users", type=int, default=None, help="at most this many users (default: all)")
    g.add_argument("--num-items", type=int, default=None, help="at most this many items (default: all)")
    g.add_argument("--skip-users", type=int, default=0, help="skip the first N users (by user_idx)")
    g.add_argument("--skip-items", type=int, default=0, help="skip the first N items (by item_idx)")
    g.add_argument("--dry-run", action="store_true", help="print the prompts; send nothing")
    g.set_defaults(func=cmd_prefs_generate)


def cmd_prefs_generate(args: argparse.Namespace) -> int:
    from rayrec.cli.jobs import joint_job
    from rayrec.data.dataset import ensure_prepared
    from rayrec.prefs.generate import Selection, generate_prefs, prefs_out_dir

    cfg = joint_job(args, "prefs", "prefs generate")
    ds = ensure_prepared(cfg.data)
    sel = Selection(args.num_users, args.num_items, args.skip_users, args.skip_items)
    summary = generate_prefs(cfg, ds.path, sel, dry_run=args.dry_run)
    if not args.dry_run:
        s = asdict(summary)
        s.pop("errors")
        print(json.dumps(s, indent=2))
        print(f"wrote {prefs_out_dir(cfg.model.prefs, ds.path)}")
    return 1 if summary.failed else 0
