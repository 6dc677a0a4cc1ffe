"""``uirl export RUN_DIR OUT``: the final adapter (PEFT format + interest head) and a model card."""

from __future__ import annotations

import argparse


def _export(args: argparse.Namespace) -> int:
    from uirl.export import export_run  # torch and peft: only when exporting, so `uirl --help` stays quick

    out = export_run(args.run_dir, args.out)
    print(f"uirl: exported the final adapter and its model card to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="write a run's final adapter and a model card (README.md)")
    export.add_argument("run_dir", help="a finished run directory (runs/<run>)")
    export.add_argument("out", help="a new directory to write to")
    export.set_defaults(func=_export)
