"""The ``uirl`` command line.

Each subcommand lives in its own module under :mod:`uirl.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (``args -> exit status``).

Errors a user can cause print one line (``uirl: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from uirl.errors import UirlError

#: Modules under ``uirl.commands`` whose ``register`` adds a subcommand, in help order.
COMMANDS = (
    "run",
    "deploy",
    "silo-worker",
    "config",
    "data",
    "show",
    "embed",
    "recommend",
    "export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uirl", description="uirl: federated, private user interest models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"uirl.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UirlError as exc:
        print(f"uirl: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
