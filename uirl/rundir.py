"""The run directory ``runs/<run>/``: everything a run produced that a person or script reads later.

- ``config.json``            the full run config (flat, kebab-case) and what it resolved to
- ``metrics.jsonl``/``.csv``   one row per round: training loss, evaluation metrics, max epsilon
- ``privacy.jsonl``           one row per reply per round, by node id: epsilon, delta, noise, sample rate,
                              steps, status, the silo label; or why the server rejected the reply
- ``privacy_ledger.json``     the latest privacy state of every node (what an auditor checks)
- ``popularity_prior.npy``    the popularity prior built from the silos' releases (``popularity-prior``),
                              what a resumed run sends again instead of asking the silos twice
- ``popularity_release.npz``  the released sum it was built from and its noise (``local-prior`` sends it)
- ``checkpoints/round-<r>/``  the last rounds' checkpoints (see :mod:`uirl.checkpoint`)
- ``final/``                  the final global adapter in PEFT format + the interest head
- ``flower.log``              Flower's output of the run (written by ``uirl run`` / ``uirl deploy``)

Every file is written atomically (temporary file + rename) or appended line by line, so a crash
never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from uirl.atomic import atomic_write_bytes, atomic_write_text
from uirl.errors import DataError, UirlError


#: Environment variable naming a file in which the ServerApp records the run directory it writes
#: (set by ``uirl run`` / ``uirl deploy``, which read it back rather than parse printed output).
RUN_INFO_ENV = "UIRL_RUN_INFO"


def announce(path: Path, *, run_id: int | None = None) -> None:
    """Record ``path`` (absolute) as this run's directory in the file named by ``$UIRL_RUN_INFO``,
    if that is set: ``{"run-dir": ..., "run-id": ...}``."""
    target = os.environ.get(RUN_INFO_ENV)
    if target:
        atomic_write_text(Path(target), json.dumps({"run-dir": str(Path(path).resolve()), "run-id": run_id}) + "\n")


#: The popularity prior of a run (``popularity-prior``), in the run directory and in every saved
#: model that scores with it (``final/``, checkpoints, exports): one value per catalogue item, in
#: sorted item-id order (:func:`uirl.federated.catalogue_ids`).
PRIOR_FILE = "popularity_prior.npy"
#: The released popularity sum and its noise standard deviation (what ``local-prior`` sends silos).
RELEASE_FILE = "popularity_release.npz"


def write_release(path: Path, counts: np.ndarray, noise_std: float) -> None:
    """Write :data:`RELEASE_FILE` (atomically): the released sum (float64) and its noise."""
    buf = io.BytesIO()
    np.savez(buf, counts=np.asarray(counts, dtype=np.float64), noise=np.asarray([noise_std], dtype=np.float64))
    atomic_write_bytes(path, buf.getvalue())


def read_release(path: Path) -> tuple[np.ndarray, float]:
    """(sum, noise standard deviation) from a :func:`write_release` file; ValueError saying what is
    wrong if it is missing, unreadable or not one finite count per item and a noise >= 0."""
    try:
        with np.load(path, allow_pickle=False) as f:
            counts, noise = np.asarray(f["counts"], dtype=np.float64), float(f["noise"][0])
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    if counts.ndim != 1 or not np.isfinite(counts).all() or not (math.isfinite(noise) and noise >= 0):
        raise ValueError("expected one finite count per catalogue item and a noise >= 0")
    return counts, noise


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding one object (``config.json``, ``privacy_ledger.json``, a model's
    ``uirl_model.json``); anything else is a DataError naming the file (and line)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON (column {exc.colno}: {exc.msg})", file=str(path), line=exc.lineno) from None
    except UnicodeDecodeError:
        raise DataError("not valid JSON (not UTF-8 text)", file=str(path)) from None
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, found a {type(value).__name__}", file=str(path))
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file of the run directory (``metrics.jsonl``, ``privacy.jsonl``),
    blank lines skipped; a line that is not a JSON object is a DataError naming the file and line."""
    from uirl.data.formats.common import json_records

    return [row for _, row in json_records(Path(path))]


def read_ledger(path: Path) -> dict[str, dict[str, Any]]:
    """``privacy_ledger.json``: node id -> that node's latest entry (a JSON object). Whether an
    entry has the numbers a reader needs is the reader's to check (an entry may lack them)."""
    ledger = read_json_object(path)
    for node, entry in ledger.items():
        if not isinstance(entry, dict):
            raise DataError(f"expected a JSON object per node, found a {type(entry).__name__}", file=str(path),
                            field=node)
    return ledger


def new_run_name() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rounds: list[dict[str, Any]] = []
        self.ledger: dict[str, dict[str, Any]] = {}

    @classmethod
    def create(cls, base: str | Path, name: str, config: dict[str, Any]) -> "RunDirectory":
        path = Path(base) / (name or new_run_name())
        if (path / "metrics.jsonl").exists():
            raise FileExistsError(f"{path} already holds a run; choose another run-name")
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        return cls(path)

    @classmethod
    def reopen(cls, path: Path, *, upto_round: int, rounds: list[dict[str, Any]],
               ledger: dict[str, dict[str, Any]]) -> "RunDirectory":
        """Continue a run from its checkpoint of round ``upto_round``: rows of later (lost) rounds
        are dropped from every file, so no round is ever counted twice."""
        run = cls(path)
        run.rounds = [dict(r) for r in rounds]
        run.ledger = {k: dict(v) for k, v in ledger.items()}
        privacy = run.path / "privacy.jsonl"
        kept = read_jsonl(privacy) if privacy.is_file() else []  # read first: a damaged file changes nothing
        run._rewrite("metrics.jsonl", run.rounds)
        run._rewrite_csv()
        run._rewrite("privacy.jsonl", [row for row in kept if row.get("round", 0) <= upto_round])
        atomic_write_text(run.path / "privacy_ledger.json", json.dumps(run.ledger, indent=2, sort_keys=True) + "\n")
        return run

    def _rewrite(self, name: str, rows: list[dict[str, Any]]) -> None:
        atomic_write_text(self.path / name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def _rewrite_csv(self) -> None:
        columns = list(dict.fromkeys(k for r in self.rounds for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rounds)
        atomic_write_text(self.path / "metrics.csv", buf.getvalue())

    def _append(self, name: str, row: dict[str, Any]) -> None:
        with open(self.path / name, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

    def record_round(self, row: dict[str, Any]) -> None:
        """One row per round (round 0 = before training). Rewrites the CSV with every row so far."""
        self.rounds.append(row)
        self._append("metrics.jsonl", row)
        self._rewrite_csv()

    def record_privacy(self, server_round: int, node: str, row: dict[str, Any]) -> None:
        """A checked reply of node ``node`` (Flower's node id; ``row["silo"]`` is only its label):
        a row in ``privacy.jsonl``, and the node's entry in the ledger."""
        self._append("privacy.jsonl", {"round": server_round, "node-id": node, **row})
        self.ledger[node] = {"round": server_round, **row}
        atomic_write_text(self.path / "privacy_ledger.json", json.dumps(self.ledger, indent=2, sort_keys=True) + "\n")

    def save_prior(self, prior: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(prior, dtype=np.float32), allow_pickle=False)
        atomic_write_bytes(self.path / PRIOR_FILE, buf.getvalue())

    def load_prior(self) -> np.ndarray:
        """The prior saved by :meth:`save_prior` (a resumed run sends the same one)."""
        path = self.path / PRIOR_FILE
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UirlError(f"{path}: cannot read the run's popularity prior ({exc}); "
                            "a run with popularity-prior resumes only with it") from None

    def save_release(self, counts: np.ndarray, noise_std: float) -> None:
        """The released popularity sum and its noise standard deviation (``local-prior`` sends them)."""
        write_release(self.path / RELEASE_FILE, counts, noise_std)

    def load_release(self) -> tuple[np.ndarray, float]:
        """(sum, noise standard deviation) saved by :meth:`save_release`."""
        path = self.path / RELEASE_FILE
        try:
            return read_release(path)
        except ValueError as exc:
            raise UirlError(f"{path}: cannot read the run's released popularity sum ({exc}); "
                            "a run with local-prior resumes only with it") from None

    def record_rejected(self, server_round: int, node: str, row: dict[str, Any]) -> None:
        """A reply the server dropped: a row in ``privacy.jsonl`` with the reason, never in the
        ledger (nothing a rejected reply said is taken as the silo's state)."""
        self._append("privacy.jsonl", {"round": server_round, "node-id": node, **row})
