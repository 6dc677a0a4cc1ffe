"""Candidate lists a dataset ships itself (a benchmark's own test/validation lists), used verbatim.

The file (``candidates.jsonl``, ``.csv`` or ``.parquet`` next to the schema files) has one row per
user and split::

    {"user_id": "u1", "split": "test", "candidates": ["i9", "i3", "i7"]}

``split`` is ``test`` or ``valid``; ``candidates`` lists item ids, the target first (in CSV: one
cell of space-separated ids). The file does not choose the held-out items: the evaluation protocol
does (last positive = test target, the one before = validation target), and each list's first id
must be that item -- a check that the events and the lists describe the same benchmark. Every id
must be in the catalogue, a list holds at least 2 distinct ids, and lists may differ in length.
A user or split without a row keeps its sampled negatives. The lists are kept in the converted
directory (``candidates.parquet``), so ``uirl data split`` applies them again.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uirl.data.formats.common import csv_rows, json_records, text_lines
from uirl.errors import DataError

COLUMNS = ("user_id", "split", "candidates")
SPLITS = ("valid", "test")
STORED = "candidates.parquet"  # the lists as kept in a converted directory


@dataclass(frozen=True)
class FixedLists:
    """Validated lists: ``table`` (user_id, split, candidates: list of ids, target first) and, per
    row, where it came from (``positions``: 1-based lines of a text file, 0-based Parquet rows)."""

    table: pa.Table
    file: str
    positions: tuple[int, ...]
    by_line: bool

    def error(self, i: int, message: str, *, field: str | None = None, value: object = None) -> DataError:
        where = {"line": self.positions[i]} if self.by_line else {"row": self.positions[i]}
        return DataError(message, file=self.file, field=field, value=value, **where)

    def counts(self) -> dict[str, int]:
        splits = self.table["split"].to_pylist()
        return {s: splits.count(s) for s in SPLITS}


def _records(path: Path) -> tuple[list[dict], list[int], bool]:
    """(records, their line or row numbers, numbers are lines)."""
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"not a readable Parquet file ({exc})", file=str(path)) from None
        return table.to_pylist(), list(range(len(table))), False
    if path.suffix == ".jsonl":
        pairs = list(json_records(path))
        return [r for _, r in pairs], [n for n, _ in pairs], True
    reader = csv_rows(line for _, line in text_lines(path))
    header = next(reader, None)
    if header is None:
        raise DataError("file is empty", file=str(path))
    records, lines = [], []
    for fields in reader:
        if not fields:
            continue
        if len(fields) != len(header):
            raise DataError(f"expected {len(header)} comma-separated fields (as in the header), found {len(fields)}",
                            file=str(path), line=reader.line_num)
        record = dict(zip((h.strip() for h in header), fields))
        if isinstance(record.get("candidates"), str):
            record["candidates"] = record["candidates"].split()
        records.append(record)
        lines.append(reader.line_num)
    return records, lines, True


def _first_repeat(ids: list[str]) -> str | None:
    """The first id that appears a second time in ``ids`` (linear: lists may hold a whole catalogue)."""
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


def read_fixed_lists(path: Path, item_ids: Collection[str]) -> FixedLists:
    """Read and check a candidates file against the catalogue ``item_ids`` (see the module docstring)."""
    records, positions, by_line = _records(path)
    name = str(path)
    lists = FixedLists(pa.table({}), name, tuple(positions), by_line)
    seen: dict[tuple[str, str], int] = {}
    out: dict[str, list] = {c: [] for c in COLUMNS}
    for i, record in enumerate(records):
        for column in COLUMNS:
            if column not in record:
                raise lists.error(i, f"missing column (expected {', '.join(COLUMNS)})", field=column)
        user, split, candidates = (record[c] for c in COLUMNS)
        if isinstance(candidates, np.ndarray):
            candidates = candidates.tolist()
        if not isinstance(user, str) or not user.strip():
            raise lists.error(i, "expected a non-empty string", field="user_id", value=user)
        if split not in SPLITS:
            raise lists.error(i, "expected 'test' or 'valid'", field="split", value=split)
        if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
            raise lists.error(i, "expected a list of item ids (strings; in CSV: space-separated), the target first",
                              field="candidates", value=candidates)
        if len(candidates) < 2:
            raise lists.error(i, "expected at least 2 ids (the target and one negative)", field="candidates",
                              value=candidates)
        dup = _first_repeat(candidates)
        if dup is not None:
            raise lists.error(i, "an item id that appears twice in one list", field="candidates", value=dup)
        unknown = next((c for c in candidates if c not in item_ids), None)
        if unknown is not None:
            raise lists.error(i, "an item id that is not in the items table", field="candidates", value=unknown)
        if (user, split) in seen:
            where = f"line {seen[user, split]}" if by_line else f"row {seen[user, split]}"
            raise lists.error(i, f"a second {split} list for this user (the first is at {where})", field="user_id",
                              value=user)
        seen[user, split] = positions[i]
        for column, value in zip(COLUMNS, (user, split, candidates)):
            out[column].append(value)
    if not out["user_id"]:
        raise DataError("no candidate lists in the file", file=name)
    table = pa.table({"user_id": pa.array(out["user_id"], pa.string()), "split": pa.array(out["split"], pa.string()),
                      "candidates": pa.array(out["candidates"], pa.list_(pa.string()))})
    return FixedLists(table, name, tuple(positions), by_line)


def apply_fixed_lists(split: pa.Table, lists: FixedLists) -> pa.Table:
    """``split`` (:mod:`uirl.data.fixed_split`) with its sampled lists replaced by the file's.

    A list for a user who is not evaluated, or whose first id is not the user's held-out item
    under the protocol, is a DataError naming the line of the file."""
    row_of = {u: k for k, u in enumerate(split["user_id"].to_pylist())}
    columns = {s: split[f"{s}_candidates"].to_pylist() for s in SPLITS}
    targets = {s: split[f"{s}_target"].to_pylist() for s in SPLITS}
    for i, (user, which, candidates) in enumerate(zip(*(lists.table[c].to_pylist() for c in COLUMNS))):
        k = row_of.get(user)
        if k is None:
            raise lists.error(i, "a list for a user who is not evaluated (unknown user, or fewer than 4 distinct "
                              "positive items: no validation and test target)", field="user_id", value=user)
        if candidates[0] != targets[which][k]:
            role = "last positive" if which == "test" else "positive before the test target"
            raise lists.error(i, f"the first candidate must be the user's held-out {which} item "
                              f"{targets[which][k]!r} (the {role}; the events decide it)", field="candidates",
                              value=candidates[0])
        columns[which][k] = candidates
    for which in SPLITS:
        name = f"{which}_candidates"
        split = split.set_column(split.column_names.index(name), name, pa.array(columns[which], pa.list_(pa.string())))
    return split


def stored_lists(directory: Path, item_ids: Collection[str]) -> FixedLists | None:
    """The lists kept in a converted directory, or None."""
    path = directory / STORED
    return read_fixed_lists(path, item_ids) if path.is_file() else None
