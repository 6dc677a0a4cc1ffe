"""Table schema of the two input tables and their validation.

items  : ``item_id`` (str, unique, non-empty), ``text`` (str, non-empty), optional ``category`` (str),
         optional ``image`` (a list of floats: precomputed image features, one width for all items;
         missing for some items is fine).
events : ``user_id`` (str), ``item_id`` (str, present in items), ``timestamp`` (int seconds),
         ``behavior`` (one of :data:`BEHAVIORS`), optional ``value`` (float, e.g. a rating),
         optional ``user_text`` (str), optional ``silo`` (str).

The validators return cleaned copies: only the schema columns, in schema order, with a fresh
0-based index; string columns have the ``"string"`` dtype, ``timestamp`` is int64 and ``value``
float64 (NaN = no value). Errors are :class:`~uirl.errors.DataError` naming the source, the
0-based row position, the field, the bad value and what was expected.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from uirl.errors import DataError

ITEM_REQUIRED = ("item_id", "text")
EVENT_REQUIRED = ("user_id", "item_id", "timestamp", "behavior")
EVENT_OPTIONAL = ("value", "user_text", "silo")

#: Every behaviour an event may carry (lower-case).
BEHAVIORS = frozenset({"click", "like", "purchase", "rate", "review", "search", "share", "view"})
#: Behaviours that count as a positive interaction ("rate" only at or above the rating threshold).
POSITIVE_BEHAVIORS = frozenset(BEHAVIORS - {"view"})

# int64 holds larger values, but timestamps beyond this are surely corrupt (and floats lose
# integer precision above 2**53, so an "integer-valued" float there means nothing).
_MAX_TIMESTAMP = 2**53


def _missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and np.isnan(value))


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _more(mask: np.ndarray) -> str:
    extra = int(mask.sum()) - 1
    return f" ({extra} more such row{'s' if extra != 1 else ''})" if extra > 0 else ""


def _require_columns(df: pd.DataFrame, required: tuple[str, ...], source: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame, got {type(df).__name__}", file=source)
    for name in required:
        if name not in df.columns:
            raise DataError(f"missing required column (columns present: {', '.join(map(str, df.columns))})",
                            file=source, field=name)


def _strings(col: pd.Series, *, source: str, field: str, required: bool) -> pd.Series:
    """Column -> "string" dtype. Required: no nulls and no blank strings. Non-strings are rejected
    (an id read as a number usually means a parsing problem, not an id)."""
    values = col.to_numpy(dtype=object)
    null = pd.isna(col).to_numpy()
    if required and null.any():
        i = _first_bad(null)
        raise DataError(f"expected a non-empty string, got a missing value{_more(null)}",
                        file=source, row=i, field=field)
    not_str = np.array([not (n or isinstance(v, str)) for v, n in zip(values, null)], dtype=bool)
    if not_str.any():
        i = _first_bad(not_str)
        raise DataError(f"expected a string, got {type(values[i]).__name__}{_more(not_str)}",
                        file=source, row=i, field=field, value=values[i])
    blank = np.array([(not n) and not v.strip() for v, n in zip(values, null)], dtype=bool)
    if required and blank.any():
        i = _first_bad(blank)
        raise DataError(f"expected a non-empty string{_more(blank)}", file=source, row=i, field=field,
                        value=values[i])
    return pd.Series(values, dtype="string")


def _timestamps(col: pd.Series, *, source: str) -> pd.Series:
    """Column -> int64 seconds. Accepts ints, integer-valued floats and digit strings."""
    if pd.api.types.is_bool_dtype(col.dtype):
        raise DataError("expected an integer timestamp, got a boolean", file=source, row=0,
                        field="timestamp", value=bool(col.iloc[0]) if len(col) else None)
    values = col.to_numpy(dtype=object)
    if pd.api.types.is_integer_dtype(col.dtype) and not col.isna().any():
        out = col.to_numpy(dtype=np.int64)
    else:
        num = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
        boolean = np.array([isinstance(v, (bool, np.bool_)) for v in values], dtype=bool)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(num) | (np.floor(num) != num) | (np.abs(num) > _MAX_TIMESTAMP) | boolean
        if bad.any():
            i = _first_bad(bad)
            got = ", got a missing value" if _missing(values[i]) else ""
            raise DataError(f"expected an integer timestamp in seconds{got}{_more(bad)}", file=source,
                            row=i, field="timestamp", value=None if got else values[i])
        # Given ints are kept as they are; the others are integer-valued floats below 2**53 (exact).
        out = np.array([int(v) if isinstance(v, (int, np.integer)) else int(n) for v, n in zip(values, num)],
                       dtype=np.int64)
    return pd.Series(out, dtype=np.int64)


def _floats(col: pd.Series, *, source: str, field: str) -> pd.Series:
    """Optional numeric column -> float64 (NaN = missing). Non-numbers and +-inf are rejected."""
    values = col.to_numpy(dtype=object)
    null = pd.isna(col).to_numpy()
    num = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
    boolean = np.array([isinstance(v, (bool, np.bool_)) for v in values], dtype=bool)
    bad = (~null & np.isnan(num)) | boolean
    if bad.any():
        i = _first_bad(bad)
        raise DataError(f"expected a number{_more(bad)}", file=source, row=i, field=field, value=values[i])
    inf = np.isinf(num)
    if inf.any():
        i = _first_bad(inf)
        raise DataError(f"expected a finite number{_more(inf)}", file=source, row=i, field=field,
                        value=values[i])
    return pd.Series(num, dtype=np.float64)


def _vectors(col: pd.Series, *, source: str, field: str) -> pd.Series:
    """Optional column of float vectors (lists/arrays), all of one width -> tuples (None = missing)."""
    out, width = [], None
    for i, v in enumerate(col.to_numpy(dtype=object)):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out.append(None)
            continue
        try:
            vec = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            vec = None
        if vec is None or vec.ndim != 1 or vec.size == 0 or not np.isfinite(vec).all():
            raise DataError("expected a non-empty list of finite numbers", file=source, row=i, field=field, value=v)
        if width is not None and vec.size != width:
            raise DataError(f"expected {width} numbers (the width of the first vector)", file=source, row=i,
                            field=field, value=v)
        width = vec.size
        out.append(tuple(float(x) for x in vec))
    return pd.Series(out, dtype=object)


def validate_items(df: pd.DataFrame, *, source: str = "items") -> pd.DataFrame:
    """Check an items table and return a cleaned copy (see module docstring)."""
    _require_columns(df, ITEM_REQUIRED, source)
    out = {name: _strings(df[name], source=source, field=name, required=True) for name in ITEM_REQUIRED}
    if "category" in df.columns:
        out["category"] = _strings(df["category"], source=source, field="category", required=False)
    if "image" in df.columns:
        out["image"] = _vectors(df["image"], source=source, field="image")
    dup = out["item_id"].duplicated().to_numpy()
    if dup.any():
        i = _first_bad(dup)
        first = int(np.flatnonzero((out["item_id"] == out["item_id"].iloc[i]).to_numpy())[0])
        raise DataError(f"expected a unique item_id (first seen at row {first}){_more(dup)}",
                        file=source, row=i, field="item_id", value=out["item_id"].iloc[i])
    return pd.DataFrame(out)


def validate_events(df: pd.DataFrame, items: pd.DataFrame, *, source: str = "events") -> pd.DataFrame:
    """Check an events table against ``items`` (a validated items table) and return a cleaned copy.

    ``behavior`` is matched after stripping blanks and lower-casing (``" Click"`` -> ``"click"``).
    """
    _require_columns(df, EVENT_REQUIRED, source)
    out = {name: _strings(df[name], source=source, field=name, required=True)
           for name in ("user_id", "item_id", "behavior")}
    out["timestamp"] = _timestamps(df["timestamp"], source=source)
    behavior = out["behavior"].str.strip().str.lower()
    unknown = (~behavior.isin(BEHAVIORS)).to_numpy()
    if unknown.any():
        i = _first_bad(unknown)
        raise DataError(f"expected one of {', '.join(sorted(BEHAVIORS))}{_more(unknown)}",
                        file=source, row=i, field="behavior", value=out["behavior"].iloc[i])
    out["behavior"] = behavior.astype("string")
    known_items = pd.Index(items["item_id"].astype("string"))
    missing = (~out["item_id"].isin(known_items)).to_numpy()
    if missing.any():
        i = _first_bad(missing)
        raise DataError(f"expected an item_id present in the items table{_more(missing)}",
                        file=source, row=i, field="item_id", value=out["item_id"].iloc[i])
    if "value" in df.columns:
        out["value"] = _floats(df["value"], source=source, field="value")
    if "user_text" in df.columns:
        out["user_text"] = _strings(df["user_text"], source=source, field="user_text", required=False)
    if "silo" in df.columns:
        # A row without a silo could not be placed in any client, so the column is all-or-nothing.
        out["silo"] = _strings(df["silo"], source=source, field="silo", required=True)
    order = [c for c in EVENT_REQUIRED + EVENT_OPTIONAL if c in out]
    return pd.DataFrame({c: out[c] for c in order})


def positive_mask(events: pd.DataFrame, *, rating_threshold: float = 4.0) -> pd.Series:
    """Boolean Series (aligned with ``events.index``): True for positive interactions.

    Every behaviour in :data:`POSITIVE_BEHAVIORS` is positive, except that a ``rate`` event is
    positive only when ``value >= rating_threshold`` (a missing value is not positive). ``view``
    is never positive.
    """
    behavior = events["behavior"].astype("string")
    positive = behavior.isin(POSITIVE_BEHAVIORS).to_numpy(dtype=bool)
    is_rate = (behavior == "rate").to_numpy(dtype=bool, na_value=False)
    if "value" in events.columns:
        value = pd.to_numeric(events["value"], errors="coerce").to_numpy(dtype=np.float64)
        with np.errstate(invalid="ignore"):
            high = value >= rating_threshold
    else:
        high = np.zeros(len(events), dtype=bool)
    return pd.Series(positive & (~is_rate | high), index=events.index, dtype=bool)
