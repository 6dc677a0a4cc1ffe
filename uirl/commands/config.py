"""``uirl config``: every run-config key with its default and meaning, from :mod:`uirl.config`."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table
from rich.text import Text

from uirl.config import run_config_rows, run_config_table


def _config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(run_config_table(), end="")
        return 0
    table = Table(title='run config (change a key with --run-config "key=value ...")')
    for column in ("key", "default", "meaning"):
        table.add_column(column)
    for row in run_config_rows():
        table.add_row(*map(Text, row))  # Text: a meaning's "[...]" is not rich markup
    Console(width=140).print(table)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser("config", help="list the run-config keys with their defaults and meanings")
    config.add_argument("--markdown", action="store_true",
                        help="print the README's run-config table instead (generated from the same fields)")
    config.set_defaults(func=_config)
