"""`spillover` entry point: one subcommand a file (run, serve, plan, doctor, bench)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from spillover import __version__
from spillover.errors import SpilloverError

SUBCOMMANDS = ("run", "serve", "plan", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spillover",
        description="LLM inference with automatic, memory-aware device mapping.",
    )
    parser.add_argument("--version", action="version", version=f"spillover {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"spillover.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"spillover.cli.{name}":
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SpilloverError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
