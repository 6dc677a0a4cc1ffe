"""Per-round checkpoints of a run, and finding the one to resume from.

After every round the server writes ``runs/<run>/checkpoints/round-<r>/``:

- ``adapter/``            the global adapter in PEFT format + the interest head (what a person loads)
- ``arrays.safetensors``  the exact global arrays the next round starts from (what a resume loads)
- ``state.json``          the round number, the strategy's name and state, every metrics row so far,
                          and each silo's privacy ledger as the server last saw it

A checkpoint is built in a hidden temporary directory and renamed into place only when complete,
so a crash never leaves a half checkpoint that looks like a whole one; hidden leftovers are ignored
and cleaned up. Only the last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from uirl.atomic import atomic_dir
from uirl.errors import UirlError

CHECKPOINTS = "checkpoints"
ARRAYS_FILE = "arrays.safetensors"
STATE_FILE = "state.json"
_ROUND_DIR = re.compile(r"^round-(\d+)$")


class CheckpointError(UirlError):
    """No usable checkpoint where one was asked for."""


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    strategy: dict[str, Any]
    rounds: list[dict[str, Any]]
    ledger: dict[str, dict[str, Any]]
    path: Path


def save_checkpoint(run_path: Path, server_round: int, arrays: dict[str, np.ndarray], *,
                    strategy: dict[str, Any], rounds: list[dict[str, Any]], ledger: dict[str, dict[str, Any]],
                    write_adapter: Callable[[Path], None], keep: int = 2) -> Path:
    """Write checkpoint ``round-<server_round>`` atomically and prune all but the last ``keep``."""
    base = Path(run_path) / CHECKPOINTS
    base.mkdir(parents=True, exist_ok=True)
    final = base / f"round-{server_round}"
    # replace: a re-run of a round after a resume replaces the old copy
    with atomic_dir(final, replace=True) as tmp:
        write_adapter(tmp / "adapter")
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, str(tmp / ARRAYS_FILE))
        state = {"round": server_round, "strategy": strategy, "rounds": rounds, "ledger": ledger}
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2, sort_keys=True, allow_nan=True)
            fh.flush()
            os.fsync(fh.fileno())
    for old in complete_rounds(run_path)[:-keep]:
        shutil.rmtree(base / f"round-{old}", ignore_errors=True)
    for leftover in base.glob(".round-*.tmp"):
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def complete_rounds(run_path: Path) -> list[int]:
    """Rounds with a complete checkpoint, ascending (hidden temporary directories never count)."""
    base = Path(run_path) / CHECKPOINTS
    if not base.is_dir():
        return []
    found = [int(m.group(1)) for p in base.iterdir() if p.is_dir() and (m := _ROUND_DIR.match(p.name))]
    return sorted(r for r in found if (base / f"round-{r}" / STATE_FILE).is_file())


def load_checkpoint(run_path: Path) -> Checkpoint:
    """The newest readable checkpoint of ``run_path``; an unreadable one falls back to the one before."""
    rounds = complete_rounds(run_path)
    if not rounds:
        raise CheckpointError(f"{run_path}: no complete checkpoint to resume from")
    problems = []
    for r in reversed(rounds):
        path = Path(run_path) / CHECKPOINTS / f"round-{r}"
        try:
            state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
            arrays = {k: v.numpy() for k, v in load_file(str(path / ARRAYS_FILE)).items()}
            if int(state["round"]) != r:
                raise ValueError(f"state.json says round {state['round']}")
            return Checkpoint(round=r, arrays=arrays, strategy=state["strategy"], rounds=state["rounds"],
                              ledger=state["ledger"], path=path)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            problems.append(f"round-{r}: {exc}")
    raise CheckpointError(f"{run_path}: no readable checkpoint ({'; '.join(problems)})")


def resolve_resume(run_dir: str | Path, resume: str) -> Path:
    """The run directory named by run-config ``resume``: a path, or ``latest`` (the most recently
    checkpointed run under ``run_dir``)."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"resume = {resume!r}: no such run directory")
        return path
    runs = [p for p in Path(run_dir).glob("*") if p.is_dir() and complete_rounds(p)]
    if not runs:
        raise CheckpointError(f"resume = 'latest': no run under {run_dir} has a checkpoint")
    return max(runs, key=lambda p: (p / CHECKPOINTS / f"round-{complete_rounds(p)[-1]}" / STATE_FILE).stat().st_mtime)
