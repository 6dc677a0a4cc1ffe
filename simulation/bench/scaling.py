"""Scaling of the in-process engine with the number of silos: wall time, time per round, peak memory.

Each cell (a silo count) is one :func:`uirl.engine.run_federated` run in its own process
(``python -m simulation.bench.scaling RUN_CONFIG_JSON SILOS``), so its peak RSS is its own and
nothing one cell loaded or cached helps the next. The child prints one JSON line per round
(seconds since the engine started) and one at the end; a cell that runs past the timeout is
stopped and reported with the rounds it finished (and, from their pace, an estimate of the whole
run, labelled as one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence

from simulation.bench.measure import run_child


def cell(base: dict, *, silos: int, users_per_silo: int, rounds: int, timeout: float, threads: int | None,
         log: Callable[[str], None] = lambda line: None) -> dict:
    """One engine run of ``silos`` silos with ``users_per_silo`` users each, in a child process."""
    run_config = {**base, "synthetic-users": users_per_silo * silos, "num-server-rounds": rounds}
    rows: list[dict] = []
    done: dict = {}

    def on_line(line: str) -> None:
        if not line.startswith("{"):
            return
        row = json.loads(line)
        if "round" in row:
            rows.append(row)
            log(f"scaling: {silos} silos, round {row['round']} done at {row['seconds']:.1f} s")
        else:
            done.update(row)

    args = ["-m", "simulation.bench.scaling", json.dumps(run_config), str(silos)]
    child = run_child(args + (["--threads", str(threads)] if threads else []), timeout=timeout, on_line=on_line)
    trained = [r for r in rows if r["round"] > 0]
    per_round = [b["seconds"] - a["seconds"] for a, b in zip(rows, rows[1:])]
    out = {"silos": silos, "users": users_per_silo * silos, "rounds": rounds, "rounds-done": len(trained),
           "timed-out": child.timed_out, "exit-code": child.returncode, "wall-seconds": round(child.seconds, 2),
           "peak-rss-mib": round(child.peak_rss_mib), "round-seconds": [round(s, 2) for s in per_round]}
    if rows:
        out["round-0-seconds"] = round(rows[0]["seconds"], 2)  # the untrained model's evaluation on every silo
    if per_round:
        out["seconds-per-round"] = round(sum(per_round) / len(per_round), 2)
    if child.timed_out and per_round:  # what the whole run would have taken at the pace it had
        out["estimated-engine-seconds"] = round(rows[0]["seconds"] + rounds * out["seconds-per-round"], 1)
    if done:
        out["engine-seconds"] = round(done["engine-seconds"], 2)
        out["start-up-seconds"] = round(child.seconds - done["engine-seconds"], 2)  # interpreter, imports, exit
    elif not child.timed_out:
        raise RuntimeError(f"scaling cell of {silos} silos failed (exit {child.returncode}):\n{child.stdout[-2000:]}")
    return out


def scaling_section(base: dict, *, silos: Sequence[int], users_per_silo: int, rounds: int, timeout: float,
                    threads: int | None, log: Callable[[str], None] = lambda line: None) -> dict:
    """:func:`cell` for each silo count, smallest first."""
    cells = [cell(base, silos=n, users_per_silo=users_per_silo, rounds=rounds, timeout=timeout, threads=threads,
                  log=log) for n in sorted(silos)]
    return {"model": base.get("model-name"), "users-per-silo": users_per_silo, "rounds": rounds,
            "timeout-seconds": timeout, "torch-threads": threads or "torch default",
            "engine": "uirl.engine.run_federated", "cells": cells}


def main(argv: list[str] | None = None) -> int:
    """The child: one engine run, a JSON line per round and one at the end."""
    parser = argparse.ArgumentParser(prog="python -m simulation.bench.scaling")
    parser.add_argument("run_config", help="the run config as a JSON object")
    parser.add_argument("silos", type=int)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    import torch

    from uirl.config import from_run_config
    from uirl.engine import run_federated

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = from_run_config(json.loads(args.run_config))
    start = time.perf_counter()

    def on_round(row: dict) -> None:
        print(json.dumps({"round": row["round"], "seconds": time.perf_counter() - start}), flush=True)

    run_federated(cfg, args.silos, on_round=on_round)
    print(json.dumps({"engine-seconds": time.perf_counter() - start}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
