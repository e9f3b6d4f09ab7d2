"""The `pangudraw` command line. Each subcommand lives in its own module with a `register(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from schemas.errors import UserError

# Modules that add subcommands, in the order `pangudraw --help` lists them.
COMMAND_MODULES = (
    "jobs.run_cmd",
    "jobs.generate_cmd",
    "jobs.cluster_cmd",
    "jobs.train_cmd",
    "jobs.eval_cmd",
    "jobs.convert_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pangudraw", description="Batch text-to-image generation with PanGu-Draw.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished rows are kept, run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
