"""The project's own schema (:mod:`uirl.data.schema`) as JSONL, CSV or Parquet files.

INPUT_PATH is a directory with ``items.<ext>`` and ``events.<ext>`` (ext: jsonl, csv or parquet),
and optionally ``social.<ext>`` (user_id, other_user_id), ``users.<ext>`` (user_id + attribute
columns for natural partitioning) and ``candidates.<ext>`` (fixed evaluation lists, see
:mod:`uirl.data.fixed_lists`). Tables are checked by the schema validators, whose errors name the
file, the row and the field.

Sequence-only data is accepted: without a ``timestamp`` column the file order is the time order
(``timestamp`` becomes the event's position, 0, 1, ...; the manifest says ``event-order: file``),
and without a ``behavior`` column every event is a positive interaction (``click``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from uirl.data.fixed_lists import read_fixed_lists
from uirl.data.formats.common import EVENT_TYPES, ITEM_TYPES, Tables, json_records, require_items, text_lines
from uirl.data.schema import validate_events, validate_items
from uirl.errors import DataError

_EXTENSIONS = ("jsonl", "csv", "parquet")


def _find(root: Path, name: str, required: bool) -> Path | None:
    found = [root / f"{name}.{ext}" for ext in _EXTENSIONS if (root / f"{name}.{ext}").is_file()]
    if not found and required:
        raise DataError(f"file not found (expected {name}.jsonl, {name}.csv or {name}.parquet)",
                        file=str(root / f"{name}.*"))
    return found[0] if found else None


def _frame(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path).to_pandas()
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"not a readable Parquet file ({exc})", file=str(path)) from None
    if path.suffix == ".jsonl":
        records = [record for _, record in json_records(path)]
        return pd.DataFrame.from_records(records)
    for _ in text_lines(path):  # decode check first: names the line of a bad byte
        pass
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except pd.errors.ParserError as exc:
        raise DataError(f"not valid CSV ({' '.join(str(exc).split())})", file=str(path)) from None


def read(path: Path, *, skip_unknown: bool = False) -> Tables:
    root = path if path.is_dir() else path.parent
    if not root.exists():
        raise DataError("no such directory", file=str(path))
    items_path, events_path = _find(root, "items", True), _find(root, "events", True)
    frame = _frame(items_path)
    require_items(len(frame), items_path, "item", unit="row")
    items = validate_items(frame, source=str(items_path))
    raw = _frame(events_path)
    if raw.empty:
        raise DataError("the events file is empty (expected one event per row)", file=str(events_path))
    order = "timestamp" if "timestamp" in raw.columns else "file"
    if {"user_id", "item_id"} <= set(raw.columns):  # else the validator names the missing column
        if order == "file":
            raw = raw.assign(timestamp=range(len(raw)))
        if "behavior" not in raw.columns:
            raw = raw.assign(behavior="click")
    if skip_unknown and "item_id" in raw.columns:
        raw = raw[raw["item_id"].astype(str).isin(set(items["item_id"]))].reset_index(drop=True)
    events = validate_events(raw, items, source=str(events_path))
    social = users = None
    if (social_path := _find(root, "social", False)) is not None:
        frame = _frame(social_path)
        social = pa.table({c: pa.array(_user_ids(frame, c, social_path), pa.string())
                           for c in ("user_id", "other_user_id")})
    if (users_path := _find(root, "users", False)) is not None:
        users = _user_table(_frame(users_path), users_path)
    candidates = None
    if (candidates_path := _find(root, "candidates", False)) is not None:
        candidates = read_fixed_lists(candidates_path, set(items["item_id"]))
    item_table = pa.table({c: pa.array(items[c].astype(object).where(items[c].notna(), None).tolist(), t)
                           for c, t in ITEM_TYPES.items() if c in items.columns})
    if "category" not in item_table.column_names:
        item_table = item_table.append_column("category", pa.nulls(len(item_table), pa.string()))
    event_table = pa.table({c: pa.array(events[c].astype(object).where(events[c].notna(), None).tolist(), t)
                            for c, t in EVENT_TYPES.items() if c in events.columns})
    return Tables(items=item_table, events=event_table, users=users, social=social, candidates=candidates,
                  event_order=order)


def _user_ids(frame: pd.DataFrame, column: str, path: Path) -> list[str]:
    """A column of user ids as text (a number such as 196 is an id too); a missing or blank id, or a
    value that is no id at all (true/false, a list), names its row."""
    if column not in frame.columns:
        raise DataError("missing required column", file=str(path), field=column)
    values = frame[column].tolist()
    for row, value in enumerate(values):
        if (value is None or value is pd.NA or isinstance(value, (bool, list, dict, np.ndarray))
                or (isinstance(value, float) and not math.isfinite(value)) or not str(value).strip()):
            raise DataError("expected a user id (text or a whole number)", file=str(path), row=row, field=column,
                            value=value)
    return [str(value) for value in values]


def _user_table(frame: pd.DataFrame, path: Path) -> pa.Table:
    """``users.<ext>``: one row per user id, each attribute column of one type (numbers or text)."""
    ids = _user_ids(frame, "user_id", path)
    first: dict[str, int] = {}
    for row, user in enumerate(ids):
        if user in first:
            raise DataError(f"a user_id that appears twice (first at row {first[user]})", file=str(path), row=row,
                            field="user_id", value=user)
        first[user] = row
    columns = {"user_id": pa.array(ids, pa.string())}
    for name in frame.columns:
        if name == "user_id":
            continue
        values = [None if isinstance(v, float) and math.isnan(v) else v for v in frame[name].tolist()]
        try:
            column = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            column = None
        if column is None or not (pa.types.is_string(column.type) or pa.types.is_integer(column.type)
                                  or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)
                                  or pa.types.is_null(column.type)):
            raise DataError("expected one number, true/false or text per user in this column (of one type for "
                            "all users)", file=str(path), field=str(name))
        columns[str(name)] = column
    return pa.table(columns)
