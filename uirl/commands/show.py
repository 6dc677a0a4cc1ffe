"""``uirl show RUN_DIR``: the round-by-round table and each silo's privacy spend of a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from uirl.errors import UirlError
from uirl.tables import print_table


def _show(args: argparse.Namespace) -> int:
    run = Path(args.run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise UirlError(f"{run}: not a run directory (no metrics.jsonl)")
    rows = []
    for n, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UirlError(f"{metrics} line {n}: not valid JSON") from None
    print_table(rows, title=f"uirl run {run.name}")
    ledger = run / "privacy_ledger.json"
    if ledger.is_file():
        for node, entry in sorted(json.loads(ledger.read_text(encoding="utf-8")).items(),
                                  key=lambda kv: (str(kv[1].get("silo", "")), kv[0])):
            eps, target = entry.get("epsilon"), entry.get("target-epsilon")
            print(f"silo {entry.get('silo', '?')} (node {node}): epsilon {eps:.3f} of {target} "
                  f"at delta {entry.get('delta')} "
                  f"(user-level, noise {entry.get('noise-multiplier', 0):.3f}, "
                  f"sample rate {entry.get('sample-rate', 0):.4f}) after round {entry.get('round')}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    show = sub.add_parser("show", help="print a run's round table and privacy spend")
    show.add_argument("run_dir", help="a run directory (runs/<run>)")
    show.set_defaults(func=_show)
