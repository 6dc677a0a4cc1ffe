"""Reading files exactly as publishers ship them, with errors that name the file and the line.

Publishers' files are plain or gzip-compressed text in UTF-8 or latin-1, with a fixed separator.
Everything here turns the ways such a file can be wrong (missing, cut short, wrong separator,
undecodable byte, wrong field count) into one :class:`~uirl.errors.DataError` that says where.
Large delimited files are parsed by Arrow (multi-threaded, in blocks); when Arrow rejects one, a
slow line-by-line scan finds the line to name, so the fast path costs nothing extra.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from uirl.errors import DataError

if TYPE_CHECKING:
    from uirl.data.fixed_lists import FixedLists

#: Arrow types of the schema's event columns, in schema order.
EVENT_TYPES = {"user_id": pa.string(), "item_id": pa.string(), "timestamp": pa.int64(),
               "behavior": pa.string(), "value": pa.float64(), "user_text": pa.string(), "silo": pa.string()}
ITEM_TYPES = {"item_id": pa.string(), "text": pa.string(), "category": pa.string()}
#: Longest CSV field read, in characters: Python's csv module stops at 131,072 by default, and a
#: review (or a long candidate list) can be longer. 2**31 - 1 fits a C long on every platform.
CSV_FIELD_LIMIT = 2**31 - 1


@dataclass
class Tables:
    """What a format reader returns: the schema's tables as Arrow tables.

    ``users``: one row per user (``user_id`` + attributes such as gender/occupation/region), used
    by natural partitioning. ``impressions`` (MIND): ``user_id``, ``impression`` (int, file order),
    ``timestamp``, ``item_id``, ``clicked`` -- the candidate lists a dataset ships itself.
    ``candidates``: fixed candidate lists per user and split, used verbatim (schema files).
    ``event_order``: ``"timestamp"``, or ``"file"`` when the source has no times and ``timestamp``
    holds each event's position in the file (its order is the time order). ``notes``: warnings
    for the user (printed, and kept in the manifest).
    """

    items: pa.Table
    events: pa.Table
    users: pa.Table | None = None
    social: pa.Table | None = None
    impressions: pa.Table | None = None
    candidates: FixedLists | None = None
    event_order: str = "timestamp"
    notes: list[str] = field(default_factory=list)


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "expected a file, found a directory",
                        file=str(path))
    return path


def require_items(count: int, path: Path, what: str, *, unit: str = "line") -> None:
    """An item file without one item is said to be empty, rather than every event later naming
    an item that is "not in the catalogue"."""
    if count == 0:
        raise DataError(f"the item file is empty (expected one {what} per {unit})", file=str(path))


def _gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def text_lines(path: Path, *, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its line break) of a plain or gzip text file.

    A byte that does not decode, or a gzip stream cut short, is a DataError naming the line.
    """
    require_file(path)
    raw = gzip.open(path, "rb") if _gzip(path) else open(path, "rb")
    number = 0
    try:
        with raw:
            for number, line in enumerate(raw, start=1):
                try:
                    text = line.decode(encoding)
                except UnicodeDecodeError as exc:
                    raise DataError(f"byte 0x{line[exc.start]:02x} at column {exc.start + 1} is not valid "
                                    f"{encoding.upper()} (the file must be {encoding.upper()}-encoded)",
                                    file=str(path), line=number) from None
                yield number, text.rstrip("\r\n")
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"truncated or corrupt gzip file after line {number} ({exc})", file=str(path)) from None


def json_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file, plain or gzip; blank lines skipped. A line that
    is not a JSON object is a DataError naming the line."""
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON ({exc.msg})", file=str(path), line=number) from None
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, found a {type(record).__name__}", file=str(path), line=number)
        yield number, record


def split_lines(path: Path, sep: str, num_fields: int | Sequence[int], *, encoding: str
                ) -> Iterator[tuple[int, list[str]]]:
    """Lines split on ``sep`` with the expected field count checked (blank lines skipped)."""
    allowed = (num_fields,) if isinstance(num_fields, int) else tuple(num_fields)
    for number, line in text_lines(path, encoding=encoding):
        if not line.strip():
            continue
        fields = line.split(sep)
        if len(fields) not in allowed:
            raise DataError(f"expected {allowed[0]} fields separated by {sep!r}, found {len(fields)} "
                            f"(wrong separator or a damaged line?)", file=str(path), line=number,
                            value=line[:60])
        yield number, fields


def csv_rows(lines: Iterable[str], *, delimiter: str = ",") -> Iterator[list[str]]:
    """``csv.reader`` over ``lines``, with fields up to :data:`CSV_FIELD_LIMIT` characters (the
    limit is process-wide in the csv module; it is only ever raised here). A csv reader, so
    ``line_num`` gives the line of the last row."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    return csv.reader(lines, delimiter=delimiter)


def _first_line(path: Path, encoding: str) -> str:
    for _, line in text_lines(path, encoding=encoding):
        return line
    raise DataError("file is empty", file=str(path))


def _locate(path: Path, *, delimiter: str, names: Sequence[str], types: dict, encoding: str,
            skip: int, detail: str) -> DataError:
    """The first line Arrow could not take (slow scan; only runs after Arrow reported a problem)."""
    numeric = {n for n, t in types.items() if pa.types.is_integer(t) or pa.types.is_floating(t)}
    lines = (line for _, line in text_lines(path, encoding=encoding))
    for number, fields in enumerate(csv_rows(lines, delimiter=delimiter), start=1):
        if number <= skip or not fields:
            continue
        if len(fields) != len(names):
            return DataError(f"expected {len(names)} fields separated by {delimiter!r}, found {len(fields)} "
                             f"(wrong separator or a damaged line?)", file=str(path), line=number)
        for name, value in zip(names, fields):
            if name in numeric:
                try:
                    float(value)
                except ValueError:
                    return DataError("expected a number", file=str(path), line=number, field=name, value=value)
    return DataError(f"could not be parsed ({detail})", file=str(path))


def read_delimited(path: Path, *, delimiter: str, names: Sequence[str], types: dict,
                   header: Sequence[str] | None = None, encoding: str = "utf-8",
                   block_mib: int = 16) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Stream a delimited file as Arrow batches: (1-based line of the batch's first row, batch).

    ``header``: the exact header the publisher writes (checked); None for files without one.
    Only the columns in ``types`` are kept, with those Arrow types.
    """
    require_file(path)
    first = _first_line(path, encoding)
    if header is not None:
        got = next(csv_rows([first], delimiter=delimiter))
        if [g.strip() for g in got] != list(header):
            raise DataError(f"expected the header {delimiter.join(header)!r} (wrong file or separator?)",
                            file=str(path), line=1, value=first[:80])
    elif len(first.split(delimiter)) != len(names):
        raise DataError(f"expected {len(names)} fields separated by {delimiter!r}, found "
                        f"{len(first.split(delimiter))} (wrong separator?)", file=str(path), line=1,
                        value=first[:60])
    skip = 1 if header is not None else 0
    read = pacsv.ReadOptions(column_names=list(names), skip_rows=skip, block_size=block_mib << 20,
                             encoding="utf8" if encoding == "utf-8" else encoding)
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=False)
    convert = pacsv.ConvertOptions(column_types=types, include_columns=list(types), strings_can_be_null=False)
    source = gzip.open(path, "rb") if _gzip(path) else str(path)
    line = skip + 1
    try:
        reader = pacsv.open_csv(source, read_options=read, parse_options=parse, convert_options=convert)
        for batch in reader:
            yield line, batch
            line += batch.num_rows
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise _locate(path, delimiter=delimiter, names=names, types=types, encoding=encoding, skip=skip,
                      detail=str(exc).splitlines()[0][:200]) from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"truncated or corrupt file ({exc})", file=str(path)) from None


def check_range(values: np.ndarray, lo: float, hi: float, *, path: Path, first_line: int, field: str) -> None:
    """Every value in [lo, hi] (NaN is out of range); the error names the line of the first bad one."""
    with np.errstate(invalid="ignore"):
        bad = ~((values >= lo) & (values <= hi))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"expected a value in [{lo:g}, {hi:g}]", file=str(path), line=first_line + i,
                        field=field, value=float(values[i]))


def events_table(columns: dict[str, pa.Array | list]) -> pa.Table:
    """An events table with the schema's Arrow types (columns absent from ``columns`` are left out)."""
    names = [n for n in EVENT_TYPES if n in columns]
    return pa.table({n: pa.array(columns[n], type=EVENT_TYPES[n]) if not isinstance(columns[n], (pa.Array, pa.ChunkedArray))
                     else columns[n].cast(EVENT_TYPES[n]) for n in names})


def items_table(item_id: list, text: list, category: list) -> pa.Table:
    return pa.table({"item_id": pa.array(item_id, pa.string()), "text": pa.array(text, pa.string()),
                     "category": pa.array(category, pa.string())})

