"""Round-by-round results as a rich table (terminal) and as markdown (notes, README)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

COLUMNS = [("round", "round"), ("train-loss", "loss"), ("auc", "AUC"), ("mrr", "MRR"),
           ("ndcg@5", "nDCG@5"), ("ndcg@10", "nDCG@10"), ("recall@10", "R@10"), ("epsilon", "eps per silo"),
           ("silos", "silos")]


def _fmt(key: str, value: Any) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4f}" if key != "eps" else f"{value:.2f}"
    return str(value)


def _silo_epsilons(row: dict[str, Any]) -> str:
    """``epsilon/silo-K`` keys of a round row -> "0.52 0.52 0.61" (silo order)."""
    keys = sorted((k for k in row if k.startswith("epsilon/silo-")), key=lambda k: int(k.rsplit("-", 1)[1]))
    return " ".join(_fmt("eps", row[k]) for k in keys) or "-"


def _silos(row: dict[str, Any]) -> str:
    """"trained/replied" of a round row, and how many replies the server rejected and how many silos
    asked sent none in time (a degraded round)."""
    if "silos-trained" not in row:
        return "-"
    replied = f"/{row['silos-replied']}" if "silos-replied" in row else ""
    degraded = [f"{row['silos-rejected']} rejected"] if row.get("silos-rejected") else []
    degraded += [f"{row['silos-no-reply']} no reply"] if row.get("silos-no-reply") else []
    note = f" ({', '.join(degraded)})" if degraded else ""
    return f"{row['silos-trained']}{replied}{note}"


def _cell(key: str, row: dict[str, Any]) -> str:
    if key == "silos":
        return _silos(row)
    return _silo_epsilons(row) if key == "epsilon" else _fmt(key, row.get(key))


def round_line(row: dict[str, Any]) -> str:
    return "  ".join(f"{title}={_cell(key, row)}" for key, title in COLUMNS)


def rich_table(rows: Sequence[dict[str, Any]], title: str = "uirl rounds") -> Table:
    table = Table(title=title)
    for _, name in COLUMNS:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*(_cell(key, row) for key, _ in COLUMNS))
    return table


def print_table(rows: Sequence[dict[str, Any]], title: str = "uirl rounds") -> None:
    Console(width=120).print(rich_table(rows, title))
