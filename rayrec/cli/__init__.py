"""The `rayrec` command: the top floor of the package.

One module per command group (``data``, ``train``, ``genrec``, ``prefs``, ``tune``, ``submit``),
each adding its subcommands to the parser; every subcommand is a short function that reads
top to bottom and calls into the library. Library folders never import this package."""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from rayrec.cli import data, genrec, prefs, recs, submit, train, tune
from rayrec.errors import RayrecError
from rayrec.secrets import mask_text
from rayrec.stopping import Stopped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayrec",
        description="Train and tune recommendation models on Ray (laptop or cluster).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for group in (data, train, recs, tune, genrec, submit, prefs):
        group.add_commands(sub)
    return parser


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
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" of {e.filename}" if e.filename else ""  # writes that are not rayrec's own atomic ones
        print(f"error: no space left on the disk{where}; free space or write to a larger disk", file=sys.stderr)
        return 2
    except Stopped as e:  # a signal stopped a run: where it stands and how to resume
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
