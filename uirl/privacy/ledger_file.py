"""A silo's privacy ledger on its own disk: what it has spent, and the last update it released.

The file (node config ``ledger-path``) outlives runs and SuperNode restarts; it is the silo's own
record, independent of anything the server says. It holds

- ``ledger``   the :class:`~uirl.privacy.accountant.PrivacyLedger` (accountant history, target);
- ``release``  which update was released last: run name, round, a digest of the global model it
               was computed from, its metrics, and the file holding its arrays
               (``<ledger-path>.release.safetensors``, next to the ledger);
- ``popularity`` (when the run has the private popularity prior) which popularity release was made
               last: run name, a digest of the noised counts, its metrics, and the file holding the
               counts (``<ledger-path>.popularity.safetensors``);
- ``checksum`` a SHA-256 of these, so a damaged file is detected rather than believed.

Ordering is what makes a crash harmless: the released arrays are written first, then the ledger
(each atomically, temp file + rename), and only then does the update leave the silo. So the ledger
always covers every update that was ever released. If the server asks again for a round this silo
already released in the same run (it crashed and resumed), the silo **replays** the stored update
when the global model is the same, and **refuses** otherwise: the same round is never paid for twice
and never answered with two different updates. The popularity release follows the same rule: asked
again in the same run, the silo sends the stored counts (the same noise: no new cost); a new run
releases anew, and the ledger composes both. A ledger that is corrupt, or missing while the
released-update file next to it shows it existed, makes the silo refuse to train (fail closed).
Every read -> spend -> write runs under the silo's exclusive lock on the file (:meth:`LedgerFile.locked`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from uirl.atomic import atomic_file, atomic_write_text
from uirl.privacy.accountant import PrivacyError, PrivacyLedger

FORMAT = "uirl-ledger/1"


def digest_arrays(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: identifies the global model of a round."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Release:
    run: str
    round: int
    input_digest: str  # digest of the global model the update was computed from
    update_digest: str  # digest of the released arrays
    metrics: dict[str, float]


@dataclass(frozen=True)
class PopularityRelease:
    run: str
    counts_digest: str  # digest of the released (noised) counts
    metrics: dict[str, float]


@dataclass(frozen=True)
class StoredLedger:
    ledger_json: str
    rounds: int
    release: Release | None
    popularity: PopularityRelease | None = None


_COUNTS = "counts"


def _body(ledger_json: str, release: Release | None, popularity: PopularityRelease | None) -> dict:
    body = {"ledger": json.loads(ledger_json),
            "release": None if release is None else {
                "run": release.run, "round": release.round, "input-digest": release.input_digest,
                "update-digest": release.update_digest, "metrics": release.metrics}}
    if popularity is not None:  # absent, not null, so that files written before it keep their checksum
        body["popularity"] = {"run": popularity.run, "counts-digest": popularity.counts_digest,
                              "metrics": popularity.metrics}
    return body


class LedgerFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.release_path = self.path.with_name(self.path.name + ".release.safetensors")
        self.popularity_path = self.path.with_name(self.path.name + ".popularity.safetensors")
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the silo's exclusive lock on this ledger (an advisory ``flock`` on ``<ledger-path>.lock``)
        for a whole read -> spend -> write. Two ClientApp processes of one silo (two runs, or two
        messages at once) would otherwise both read the same ledger, both spend, and the second write
        would drop the first spend. The other process waits until the lock is released."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read(self) -> StoredLedger | None:
        """The stored ledger, or None for a silo that never released anything.

        Raises :class:`PrivacyError` (fail closed) if the file is damaged, or missing although a
        released update next to it shows that it existed."""
        if not self.path.exists():
            for shown in (self.release_path, self.popularity_path):
                if shown.exists():
                    raise PrivacyError(f"{self.path}: privacy ledger missing although {shown.name} "
                                       "shows this silo released data; refusing to train")
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            body = {"ledger": data["ledger"], "release": data["release"]}
            if "popularity" in data:
                body["popularity"] = data["popularity"]
            if data.get("checksum") != _checksum(body):
                raise ValueError("checksum mismatch")
            ledger_json = json.dumps(data["ledger"], sort_keys=True)
            ledger = PrivacyLedger.from_json(ledger_json, source=str(self.path))
            rel = data["release"]
            release = None if rel is None else Release(
                run=str(rel["run"]), round=int(rel["round"]), input_digest=str(rel["input-digest"]),
                update_digest=str(rel["update-digest"]), metrics={k: float(v) for k, v in rel["metrics"].items()})
            pop = data.get("popularity")
            popularity = None if pop is None else PopularityRelease(
                run=str(pop["run"]), counts_digest=str(pop["counts-digest"]),
                metrics={k: float(v) for k, v in pop["metrics"].items()})
        except PrivacyError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PrivacyError(f"{self.path}: corrupt privacy ledger ({exc}); refusing to train") from None
        return StoredLedger(ledger_json=ledger_json, rounds=ledger.rounds, release=release, popularity=popularity)

    def write(self, ledger_json: str, release: Release, arrays: dict[str, np.ndarray], *,
              popularity: PopularityRelease | None = None) -> None:
        """Record a release: arrays first, then the ledger that accounts for them (both atomic).
        ``popularity``: the popularity release the file already records, kept."""
        with atomic_file(self.release_path) as tmp:
            save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, str(tmp))
        self._write_ledger(_body(ledger_json, release, popularity))

    def write_popularity(self, ledger_json: str, popularity: PopularityRelease, counts: np.ndarray, *,
                         release: Release | None) -> None:
        """Record a popularity release: the counts first, then the ledger that accounts for them.
        ``release``: the update release the file already records, kept."""
        with atomic_file(self.popularity_path) as tmp:
            save_file({_COUNTS: torch.from_numpy(np.ascontiguousarray(counts))}, str(tmp))
        self._write_ledger(_body(ledger_json, release, popularity))

    def _write_ledger(self, body: dict) -> None:
        atomic_write_text(self.path, json.dumps({"format": FORMAT, **body, "checksum": _checksum(body)},
                                                indent=2, sort_keys=True) + "\n")

    def released_counts(self, popularity: PopularityRelease) -> np.ndarray:
        """The counts of ``popularity``, checked against its digest."""
        try:
            counts = load_file(str(self.popularity_path))[_COUNTS].numpy()
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise PrivacyError(f"{self.popularity_path}: unreadable released counts ({exc}); refusing") from None
        if digest_arrays({_COUNTS: counts}) != popularity.counts_digest:
            raise PrivacyError(f"{self.popularity_path}: released counts do not match the ledger; refusing")
        return counts

    def released_arrays(self, release: Release) -> dict[str, np.ndarray]:
        """The arrays of ``release``, checked against its digest."""
        try:
            arrays = {k: v.numpy() for k, v in load_file(str(self.release_path)).items()}
        except (OSError, ValueError, SafetensorError) as exc:
            raise PrivacyError(f"{self.release_path}: unreadable released update ({exc}); refusing to train") from None
        if digest_arrays(arrays) != release.update_digest:
            raise PrivacyError(f"{self.release_path}: released update does not match the ledger; refusing to train")
        return arrays
