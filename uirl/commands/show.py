"""``uirl show RUN_DIR``: the round-by-round table and each silo's privacy spend of a run.

A damaged file is never a traceback: ``metrics.jsonl`` or ``privacy_ledger.json`` that does not
parse is one line naming the file and line; a ledger entry without a numeric ``epsilon`` is named
on one line (file, node) and left out, the rest is printed, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from uirl.errors import UirlError
from uirl.rundir import read_jsonl, read_ledger
from uirl.tables import print_table


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value: Any, spec: str) -> str:
    return format(value, spec) if _number(value) else str(value)


def spend_line(node: str, entry: dict[str, Any]) -> str:
    """One silo's privacy spend, from its ledger entry (which has a numeric ``epsilon``)."""
    return (f"silo {entry.get('silo', '?')} (node {node}): epsilon {_num(entry['epsilon'], '.3f')} of "
            f"{entry.get('target-epsilon')} at delta {entry.get('delta')} "
            f"(user-level, noise {_num(entry.get('noise-multiplier', 0), '.3f')}, "
            f"sample rate {_num(entry.get('sample-rate', 0), '.4f')}) after round {entry.get('round')}")


def _show(args: argparse.Namespace) -> int:
    run = Path(args.run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise UirlError(f"{run}: not a run directory (no metrics.jsonl)")
    rows = read_jsonl(metrics)
    ledger_path = run / "privacy_ledger.json"
    ledger = read_ledger(ledger_path) if ledger_path.is_file() else {}
    print_table(rows, title=f"uirl run {run.name}")
    status = 0
    for node, entry in sorted(ledger.items(), key=lambda kv: (str(kv[1].get("silo", "")), kv[0])):
        eps = entry.get("epsilon")
        if not _number(eps) or math.isnan(eps):
            print(f"uirl: {ledger_path}, node {node!r}: no epsilon (expected a number, found {eps!r}); "
                  "this entry is damaged and not shown", file=sys.stderr)
            status = 2
            continue
        print(spend_line(node, entry))
    return status


def register(sub: argparse._SubParsersAction) -> None:
    show = sub.add_parser("show", help="print a run's round table and privacy spend")
    show.add_argument("run_dir", help="a run directory (runs/<run>)")
    show.set_defaults(func=_show)
