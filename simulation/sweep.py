"""Privacy-utility sweep: ``python -m simulation.sweep CONFIG.toml``.

A sweep is a grid of run configs crossed with methods (federated with user-level DP, federated
with client-level central DP, and the baselines of :mod:`uirl.baselines`). Each cell is one run;
its result is one row appended to ``results.jsonl`` (and ``results.csv``) in the sweep's output
directory. A cell's key is a hash of everything that defines it (method, engine, silos, audit and
the full resolved run config), so an interrupted sweep started again skips the cells it finished,
and a changed default makes new cells instead of reusing stale ones. See ``simulation/sweeps/``.

Sweep file::

    [sweep]
    out = "results/quick"            # relative to the current directory
    silos = 3
    engine = "inprocess"             # or "flower": federated cells through `flwr run` (no audit)
    methods = ["federated", "central-dp", "centralized", "local-only", "popularity", "popularity-global", "zero-shot", "sasrec"]
    audit = true                     # membership audit of federated, central-dp and centralized cells
    tiny-encoder = false             # true: a tiny random encoder built in <out>/tiny-encoder (smoke tests)

    [base]                           # run-config values of every cell (any key of the run config)
    num-server-rounds = 3

    [grid]                           # run-config key -> values; the cells are the cartesian product
    target-epsilon = [1.0, 8.0, inf] # inf: federated without DP
    seed = [0]

    [method-grid.central-dp]         # optional: replace grid entries for one method
    target-epsilon = [8.0]

Cells that do not depend on a grid key (the privacy keys, for non-private methods) are run once.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import os
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulation.report import read_results
from uirl.errors import ConfigError, UirlError

METHODS = ("federated", "central-dp", "centralized", "local-only", "popularity", "popularity-global", "zero-shot",
           "sasrec")
AUDITED = ("federated", "central-dp", "centralized")
_USER_DP_KEYS = ("target-epsilon", "target-delta", "clip-norm", "noise-multiplier", "accountant")
_CENTRAL_KEYS = ("central-dp", "central-clip", "central-noise")
_RESULTS, _CSV = "results.jsonl", "results.csv"


@dataclass(frozen=True)
class Cell:
    method: str
    run_config: dict[str, Any]  # the full resolved run config
    grid: dict[str, Any]  # the grid values that made this cell (for tables)
    silos: int
    engine: str
    audit: bool
    key: str = field(default="")


@dataclass
class Sweep:
    source: str
    out: Path
    cells: list[Cell]
    tiny_encoder: bool = False


def _fail(source: str, message: str, field_name: str, value: Any = None) -> ConfigError:
    return ConfigError(f"{source}: {message}", field=field_name, value=value)


def _cell_config(method: str, values: dict[str, Any]) -> dict[str, Any] | None:
    """The run config of ``method`` for one grid point, with the keys that do not apply removed
    (so equal cells hash equal); None if the method has nothing to do there."""
    rc = dict(values)
    eps = rc.get("target-epsilon")
    private = eps is None or not math.isinf(float(eps))
    if method == "federated":
        for k in _CENTRAL_KEYS:
            rc.pop(k, None)
        if not private:
            for k in _USER_DP_KEYS:
                rc.pop(k, None)
        rc["dp"] = private
        return rc
    if method == "central-dp":
        if not private:
            return None  # no noise at all: that is the non-private federated cell
        for k in ("clip-norm", "noise-multiplier", "accountant"):
            rc.pop(k, None)
        return {**rc, "dp": False, "central-dp": "fixed"}
    for k in _USER_DP_KEYS + _CENTRAL_KEYS:
        rc.pop(k, None)
    return {**rc, "dp": False}


def cell_key(cell: Cell) -> str:
    identity = {"method": cell.method, "run-config": cell.run_config, "silos": cell.silos,
                "engine": cell.engine, "audit": cell.audit}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_sweep(path: str | Path, *, out: str | Path | None = None) -> Sweep:
    """Parse and validate a sweep file into its cells (every cell's run config checked up front).
    ``out`` overrides the file's output directory."""
    from uirl.config import from_run_config, to_run_config

    path = Path(path)
    source = str(path)
    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such sweep file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None
    unknown = sorted(set(spec) - {"sweep", "base", "grid", "method-grid"})
    if unknown:
        raise _fail(source, "unknown table; expected [sweep], [base], [grid], [method-grid.<method>]", unknown[0])
    sw = spec.get("sweep", {})
    unknown = sorted(set(sw) - {"out", "silos", "engine", "methods", "audit", "tiny-encoder"})
    if unknown:
        raise _fail(source, "unknown [sweep] key; expected out, silos, engine, methods, audit, tiny-encoder",
                    unknown[0])
    silos, engine, audit = sw.get("silos", 3), sw.get("engine", "inprocess"), sw.get("audit", False)
    methods = sw.get("methods", list(METHODS))
    if not isinstance(silos, int) or isinstance(silos, bool) or silos < 1:
        raise _fail(source, "expected an integer >= 1", "sweep.silos", silos)
    if engine not in ("inprocess", "flower"):
        raise _fail(source, "expected 'inprocess' or 'flower'", "sweep.engine", engine)
    if not isinstance(audit, bool):
        raise _fail(source, "expected true or false", "sweep.audit", audit)
    if not isinstance(methods, list) or not methods or any(m not in METHODS for m in methods):
        raise _fail(source, f"expected a list of {', '.join(METHODS)}", "sweep.methods", methods)
    out = Path(out or sw.get("out") or Path("results") / path.stem)
    base, grid = dict(spec.get("base", {})), spec.get("grid", {})
    dataset = base.get("dataset")
    if isinstance(dataset, str) and dataset != "synthetic" and not Path(dataset).is_absolute():
        base["dataset"] = str(Path(dataset).resolve())  # relative to the current directory
    tiny = sw.get("tiny-encoder", False)
    if tiny:
        base["model-name"] = str(out / "tiny-encoder")
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _fail(source, "a grid entry must be a non-empty list", f"grid.{name}", values)
    method_grid = spec.get("method-grid", {})
    for name in method_grid:
        if name not in methods:
            raise _fail(source, "a method-grid table must name one of the sweep's methods", f"method-grid.{name}")
    cells: dict[str, Cell] = {}
    for method in methods:
        mgrid = {**grid, **method_grid.get(method, {})}
        names = list(mgrid)
        for combo in itertools.product(*(mgrid[n] for n in names)):
            point = dict(zip(names, combo))
            rc = _cell_config(method, {**base, **point})
            if rc is None:
                continue
            try:
                resolved = to_run_config(from_run_config(rc))
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
            point = {k: v for k, v in point.items() if k in rc}  # what still applies to this method
            cell = Cell(method=method, run_config=resolved, grid=point, silos=silos, engine=engine,
                        audit=audit and method in AUDITED and engine == "inprocess")
            key = cell_key(cell)
            cells.setdefault(key, Cell(**{**cell.__dict__, "key": key}))
    return Sweep(source=source, out=out, cells=list(cells.values()), tiny_encoder=bool(tiny))


def _atomic_write(path: Path, text: str) -> None:
    from uirl.atomic import atomic_write_text

    atomic_write_text(path, text)


def _write_csv(out: Path, rows: list[dict[str, Any]]) -> None:
    flat = [{k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v)
             for k, v in r.items() if k != "rounds"} for r in rows]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    _atomic_write(out / _CSV, buf.getvalue())


def _append(out: Path, row: dict[str, Any]) -> None:
    path = out / _RESULTS
    rows = read_results(path)
    if path.exists() and len(rows) != len(path.read_text(encoding="utf-8").splitlines()):
        # A torn line would corrupt the row written after it: rewrite the intact rows first.
        _atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    _write_csv(out, rows + [row])


def round_summary(label: str, row: dict[str, Any]) -> str:
    """One line for a round: its metrics (those evaluated; no training loss under DP, where the
    silos keep it) and the epsilon spent so far."""
    parts = [f"{k}={row[k]:.4f}" for k in ("train-loss", "auc", "ndcg@10", "full/recall@20")
             if isinstance(row.get(k), (int, float)) and not math.isnan(row[k])]
    eps = row.get("epsilon")
    if isinstance(eps, (int, float)) and not math.isnan(eps):
        parts.append(f"eps={eps:.2f}")
    return f"{label} | round {row['round']} " + " ".join(parts)


def _cell_child(cell: Cell, threads: int | None, queue) -> None:
    """A cell in its own process: round rows and the result go back through ``queue``, with the
    process's peak resident memory (so each cell's memory is its own, not the sweep's high-water mark)."""
    import resource

    import torch

    from simulation.bench.measure import peak_rss_mib
    from simulation.cells import run_cell

    if threads:
        torch.set_num_threads(threads)
    try:
        result = run_cell(cell, lambda row: queue.put(("round", row)))
    except UirlError as exc:
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
        return
    # Not ru_maxrss where /proc says: that includes the parent's peak (see peak_rss_mib).
    peak = peak_rss_mib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(("done", {**result, "peak-rss-gb": round(peak / 2**10, 2)}))


def run_isolated(cell: Cell, on_round: Callable[[dict], None], *, threads: int | None = None) -> dict[str, Any]:
    """Run ``cell`` in a fresh (spawned) process; stream its round rows to ``on_round``."""
    import multiprocessing as mp
    import queue as queues

    ctx = mp.get_context("spawn")
    channel = ctx.Queue()
    child = ctx.Process(target=_cell_child, args=(cell, threads, channel), daemon=True)
    child.start()
    try:
        while True:
            try:
                kind, payload = channel.get(timeout=5.0)
            except queues.Empty:
                if not child.is_alive():
                    raise UirlError(f"sweep cell {cell.method} {cell.grid} died (exit code {child.exitcode}) "
                                    "without a result") from None
                continue
            if kind == "round":
                on_round(payload)
            elif kind == "error":
                raise UirlError(f"sweep cell {cell.method} {cell.grid}: {payload}")
            else:
                return payload
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()


def run_sweep(sweep: Sweep, *, run_cell: Callable[[Cell, Callable[[dict], None]], dict] | None = None,
              after_cell: Callable[[Cell, dict], None] | None = None, console=None,
              threads: int | None = None) -> list[dict[str, Any]]:
    """Run every cell not already in the results file; return all rows (old and new). By default
    each cell runs in its own process (:func:`run_isolated`), which bounds memory to one cell's and
    measures it (``peak-rss-gb``); a given ``run_cell`` runs in this process."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if run_cell is None:
        def run_cell(cell: Cell, on_round: Callable[[dict], None]) -> dict[str, Any]:
            return run_isolated(cell, on_round, threads=threads)
    console = console or Console(stderr=True)
    sweep.out.mkdir(parents=True, exist_ok=True)
    if sweep.tiny_encoder:
        from simulation.tiny_encoder import save_tiny_encoder

        save_tiny_encoder(sweep.out / "tiny-encoder")
    _atomic_write(sweep.out / "sweep.toml", Path(sweep.source).read_text(encoding="utf-8"))
    done = {r["key"] for r in read_results(sweep.out / _RESULTS)}
    todo = [c for c in sweep.cells if c.key not in done]
    console.print(f"sweep {sweep.source}: {len(sweep.cells)} cells, {len(sweep.cells) - len(todo)} already "
                  f"done, results in {sweep.out / _RESULTS}")
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("cells", total=len(sweep.cells), completed=len(sweep.cells) - len(todo))
        for cell in todo:
            label = f"{cell.method} {' '.join(f'{k}={v}' for k, v in cell.grid.items())}"
            progress.update(task, description=label)

            def on_round(row: dict, label: str = label) -> None:
                progress.update(task, description=f"{label} | round {row['round']} auc={row.get('auc', 0):.4f}")
                # A plain line per round as well: it reaches a log file where the bar does not.
                progress.console.print(round_summary(label, row), highlight=False, soft_wrap=True)

            start = time.time()
            result = run_cell(cell, on_round)
            row = {"key": cell.key, "method": cell.method, "silos": cell.silos, "engine": cell.engine,
                   "grid": cell.grid, **result, "seconds": round(time.time() - start, 1),
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run-config": cell.run_config}
            _append(sweep.out, row)
            progress.advance(task)
            console.print(f"done {label}: auc={row.get('auc', float('nan')):.4f} "
                          f"eps={row.get('epsilon')} ({row['seconds']} s)")
            if after_cell is not None:
                after_cell(cell, row)
    return read_results(sweep.out / _RESULTS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="sweep TOML file (see simulation/sweeps/)")
    parser.add_argument("--out", default=None, help="output directory (default: [sweep] out)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of each cell (default: torch's choice)")
    parser.add_argument("--report", action="store_true", help="build the report (plots + markdown) at the end")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.config, out=args.out)
        run_sweep(sweep, threads=args.threads)
        if args.report:
            from simulation.report import build_report

            build_report(sweep.out / _RESULTS)
    except UirlError as exc:
        print(f"uirl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("uirl: sweep interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
