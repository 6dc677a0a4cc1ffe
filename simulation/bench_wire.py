"""Bytes on the wire per silo and round, for both training paths and every ``compression`` mode.

    python -m simulation.bench_wire [--run-config "key=value ..."] [--out results/bench_wire.json]

For the project defaults (all-MiniLM-L6-v2) with ``train-mode`` ``lora`` and ``cached``, counts
(:func:`uirl.wire.wire_bytes`): the base encoder's parameter bytes, the full adapter the server
holds, what a silo receives (trainable arrays only; the frozen bytes that no longer travel), and a
training reply uncompressed, fp16 and int8. Array values only, and, from Flower's own ``Array``
serialisation, the same with its per-array framing. Nothing is trained: sizes do not depend on values.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flwr.app import Array
from rich.console import Console
from rich.table import Table

from uirl.config import from_run_config
from uirl.launch.run_config import parse_overrides
from uirl.wire import wire_bytes, wire_payloads


def _flower_bytes(arrays: dict) -> int:
    """Bytes of the arrays as Flower serialises them (numpy's .npy bytes per ``Array``, plus names)."""
    return sum(len(Array(value).data) + len(name) for name, value in arrays.items())


def measure(overrides: dict) -> dict:
    cfg = from_run_config({"device": "cpu", **overrides})
    payloads, _ = wire_payloads(cfg)
    return {**wire_bytes(cfg), **{f"flower-bytes-{k}": _flower_bytes(v) for k, v in payloads.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation.bench_wire", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", default="", help="overrides, e.g. \"lora-r=16 user-proj-rank=16\"")
    parser.add_argument("--out", default="results/bench_wire.json")
    args = parser.parse_args(argv)
    base = parse_overrides(args.run_config)
    result = {mode: measure({**base, "train-mode": mode}) for mode in ("lora", "cached")}
    table = Table(title="bytes per silo and round (array values; with Flower's framing in brackets)")
    for column in ("", "lora", "cached"):
        table.add_column(column, justify="right")
    rows = [("base encoder parameters", "encoder-bytes", None),
            ("full adapter (server, checkpoints)", "adapter-bytes", "adapter"),
            ("downlink: trainable arrays", "downlink-bytes", "downlink"),
            ("frozen arrays no longer sent", "frozen-bytes", None),
            ("reply, compression = none", "reply-bytes-none", "reply-none"),
            ("reply, compression = fp16", "reply-bytes-fp16", "reply-fp16"),
            ("reply, compression = int8", "reply-bytes-int8", "reply-int8")]
    for title, key, flower in rows:
        cells = []
        for mode in ("lora", "cached"):
            r = result[mode]
            cell = f"{r[key]:,}"
            if flower:
                cell += f" [{r['flower-bytes-' + flower]:,}]"
            if key.startswith("reply"):
                cell += f" ({100 * r[key] / r['encoder-bytes']:.3f}%)"
            cells.append(cell)
        table.add_row(title, *cells)
    Console(width=140).print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run-config": base, **result}, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
