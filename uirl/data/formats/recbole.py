"""RecBole atomic files (https://recbole.io/docs/user_guide/data/atomic_files.html), as its
benchmark datasets ship them: tab-separated, UTF-8, a header of ``name:type`` fields (types
``token``, ``token_seq``, ``float``, ``float_seq``; a ``token_seq`` is space-separated).

INPUT_PATH is a directory with ``NAME.inter`` (or the benchmark split ``NAME.train.inter``,
``NAME.valid.inter``, ``NAME.test.inter``, read in that order), or one ``.inter`` file; the
optional ``NAME.item`` and ``NAME.user`` are found next to it. The user field is ``user_id``
(or ``session_id``), the item field ``item_id``; both are ``token``s.

- General layout ``user_id:token item_id:token [rating:float] [timestamp:float] ...``: one event
  per line. With a rating it is a ``rate`` event (positive at or above ``--positive-threshold``),
  without one a ``click`` (a positive). Without a timestamp the file order is the time order.
  Fractional timestamps are replaced by their rank (same order). Other fields are ignored.
- Sequential layout ``user_id:token item_id_list:token_seq item_id:token``: a history and the next
  item. A user's rows are chained in file order into one sequence: each row's history must end
  with the sequence built so far (a longer history extends it to the left, so histories cut to a
  window work too) and its item is appended; a row that only restates a part of the sequence is
  checked and skipped. A row that fits neither is an error naming both lines. Events are
  ``click``s in sequence order (``event-order: file``).

Item text from ``NAME.item``: the title (the first ``token``/``token_seq`` field whose name is or
ends with ``title`` or ``name``: ``movie_title``, ``title``, ``book_title``, ``item_name``), then
``Label: value`` for each of the fields in :data:`DESCRIBED` the file has (list-like ones such as
``genre`` and ``categories`` as comma-separated tokens), joined by ``". "``; ``category`` = the
first token of the first of ``genre``, ``genres``, ``class``, ``categories``, ``category``. An item
without a ``.item`` row (or without any text there) gets its id as text, and a warning says how
many. ``NAME.user`` fields become user attributes (for natural partitioning).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from uirl.data.formats.common import Tables, events_table, items_table, require_file, split_lines, text_lines
from uirl.errors import DataError

TYPES = ("token", "token_seq", "float", "float_seq")
USER_FIELDS = ("user_id", "session_id")
#: Descriptive ``.item`` fields that go into the item text, in the file's column order.
DESCRIBED = ("genre", "genres", "class", "categories", "category", "tags", "brand", "author", "book_author",
             "publisher", "developer", "description")
_LIST_LIKE = ("genre", "genres", "class", "categories", "category", "tags")
_LABELS = {"genre": "Genres", "class": "Genres", "book_author": "Author"}  # else the capitalised name
_MAX_EXAMPLES = 3


def read(path: Path, *, skip_unknown: bool = False) -> Tables:
    """Read RecBole atomic files (``skip_unknown`` is unused: unknown items get their id as text)."""
    inters, stem = _inputs(path)
    root = inters[0].parent
    headers = [_header(p) for p in inters]
    for p, h in zip(inters[1:], headers[1:]):
        if list(h.items()) != list(headers[0].items()):
            raise DataError(f"expected the same header as {inters[0].name}", file=str(p), line=1)
    header = headers[0]
    user_field = next((f for f in USER_FIELDS if f in header), None)
    if user_field is None:
        raise DataError(f"expected a user_id:token (or session_id:token) field; found {', '.join(header)}",
                        file=str(inters[0]), line=1)
    _expect(header, user_field, "token", inters[0])
    _expect(header, "item_id", "token", inters[0])
    if "item_id_list" in header:
        _expect(header, "item_id_list", "token_seq", inters[0])
        events, order = _sequential(inters, header, user_field), "file"
    else:
        events, order = _general(inters, header, user_field)
    items, notes = _catalogue(root / f"{stem}.item", events)
    user_path = root / f"{stem}.user"
    users = _users(user_path, user_field) if user_path.is_file() else None
    return Tables(items=items, events=events, users=users, event_order=order, notes=notes)


def _catalogue(item_path: Path, events: pa.Table) -> tuple[pa.Table, list[str]]:
    """Items of the ``.item`` file plus those only the events name (their id as text), and a
    warning when any item's text is its id."""
    if not item_path.is_file():
        ids = list(dict.fromkeys(events["item_id"].to_pylist()))
        return items_table(ids, ids, [None] * len(ids)), [
            f"no {item_path.name}: every item's text is its id (a text encoder learns nothing from it)"]
    ids, texts, cats = _items(item_path)
    known = set(ids)
    missing = [i for i in dict.fromkeys(events["item_id"].to_pylist()) if i not in known]
    no_text = [i for i, t in zip(ids, texts) if not t] + missing
    notes = []
    if no_text:
        examples = ", ".join(repr(i) for i in no_text[:_MAX_EXAMPLES])
        notes.append(f"items without text in {item_path.name} (no row, or no text field): {len(no_text):,}; "
                     f"their text is their id (e.g. {examples})")
    texts = [t or i for i, t in zip(ids, texts)]
    return items_table(ids + missing, texts + missing, cats + [None] * len(missing)), notes


def _inputs(path: Path) -> tuple[list[Path], str]:
    """The .inter files to read, in order, and the dataset's NAME."""
    if path.is_file() or path.suffix == ".inter":
        name = require_file(path).name.removesuffix(".inter")
        for part in (".train", ".valid", ".test"):
            name = name.removesuffix(part)
        return [path], name
    if not path.is_dir():
        raise DataError("no such directory", file=str(path))
    found = sorted(path.glob("*.inter"))
    plain = [p for p in found if p.name.count(".") == 1]
    if len(plain) == 1:
        return plain, plain[0].name.removesuffix(".inter")
    stems = {p.name.split(".")[0] for p in found}
    if len(stems) == 1 and not plain:
        stem = stems.pop()
        parts = [path / f"{stem}.{part}.inter" for part in ("train", "valid", "test")]
        if all(p.is_file() for p in parts):
            return parts, stem
    what = ", ".join(p.name for p in found) if found else "none"
    raise DataError(f"expected one NAME.inter, or NAME.train.inter + NAME.valid.inter + NAME.test.inter "
                    f"(found: {what}); give the .inter file to read", file=str(path))


def _header(path: Path) -> dict[str, str]:
    """Field name -> type, in file order (line 1 of an atomic file)."""
    for _, line in text_lines(path):
        fields: dict[str, str] = {}
        for raw in line.split("\t"):
            name, sep, kind = raw.strip().partition(":")
            if not sep or not name:
                raise DataError("expected a name:type header field, e.g. user_id:token (RecBole atomic files "
                                "name each column's type)", file=str(path), line=1, field=raw.strip() or None,
                                value=line[:80])
            if kind not in TYPES:
                raise DataError(f"unknown type {kind!r} (expected {', '.join(TYPES)})", file=str(path), line=1,
                                field=name, value=raw.strip())
            if name in fields:
                raise DataError("a field name that appears twice in the header", file=str(path), line=1, field=name)
            fields[name] = kind
        return fields
    raise DataError("file is empty", file=str(path))


def _expect(header: dict[str, str], name: str, kind: str, path: Path) -> None:
    if name not in header:
        raise DataError(f"expected a {name}:{kind} field; found {', '.join(header)}", file=str(path), line=1)
    if header[name] != kind:
        raise DataError(f"expected type {kind}, found {header[name]}", file=str(path), line=1, field=name)


def _rows(path: Path, header: dict[str, str]) -> Iterator[tuple[int, list[str]]]:
    for number, fields in split_lines(path, "\t", len(header), encoding="utf-8"):
        if number > 1:
            yield number, fields


def _token(value: str, path: Path, line: int, field: str) -> str:
    value = value.strip()
    if not value:
        raise DataError("expected a non-empty token", file=str(path), line=line, field=field)
    return value


def _number(value: str, path: Path, line: int, field: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not np.isfinite(number):
        raise DataError("expected a number", file=str(path), line=line, field=field, value=value)
    return number


def _general(inters: list[Path], header: dict[str, str], user_field: str) -> tuple[pa.Table, str]:
    at = {name: k for k, name in enumerate(header)}
    has_rating, has_time = "rating" in at, "timestamp" in at
    cols: dict[str, list] = {"user_id": [], "item_id": [], "value": [], "timestamp": []}
    for path in inters:
        for line, f in _rows(path, header):
            cols["user_id"].append(_token(f[at[user_field]], path, line, user_field))
            cols["item_id"].append(_token(f[at["item_id"]], path, line, "item_id"))
            if has_rating:
                cols["value"].append(_number(f[at["rating"]], path, line, "rating"))
            if has_time:
                cols["timestamp"].append(_number(f[at["timestamp"]], path, line, "timestamp"))
    if not cols["user_id"]:
        raise DataError("no interactions in the file", file=str(inters[0]))
    n = len(cols["user_id"])
    if has_time:
        stamps = np.array(cols["timestamp"], dtype=np.float64)
        whole = (np.floor(stamps) == stamps).all() and (np.abs(stamps) < 2**53).all()
        # Fractional times: their rank keeps the order exactly (seconds would merge some).
        cols["timestamp"] = stamps.astype(np.int64) if whole else np.unique(stamps, return_inverse=True)[1]
    else:
        cols["timestamp"] = np.arange(n)
    columns = {"user_id": cols["user_id"], "item_id": cols["item_id"],
               "timestamp": pa.array(cols["timestamp"], pa.int64()),
               "behavior": ["rate" if has_rating else "click"] * n}
    if has_rating:
        columns["value"] = cols["value"]
    return events_table(columns), "timestamp" if has_time else "file"


def _sequential(inters: list[Path], header: dict[str, str], user_field: str) -> pa.Table:
    """Chain each user's rows into one sequence (see the module docstring)."""
    at = {name: k for k, name in enumerate(header)}
    sequences: dict[str, list[str]] = {}
    last_row: dict[str, str] = {}
    for path in inters:
        for line, f in _rows(path, header):
            user = _token(f[at[user_field]], path, line, user_field)
            history = f[at["item_id_list"]].split()
            target = _token(f[at["item_id"]], path, line, "item_id")
            seq = sequences.get(user)
            if seq is None:
                sequences[user] = history + [target]
            elif _extends(seq, history):
                if len(history) > len(seq):
                    seq[:0] = history[:len(history) - len(seq)]
                seq.append(target)
            elif not _restates(seq, history, target):
                raise DataError(f"rows of {user_field} {user!r} disagree: this row's history does not continue the "
                                f"sequence built from the earlier rows (last at {last_row[user]}), nor restate a "
                                f"part of it", file=str(path), line=line, field="item_id_list",
                                value=" ".join(history[-_MAX_EXAMPLES:]))
            last_row[user] = f"{path.name} line {line}"
    if not sequences:
        raise DataError("no interactions in the file", file=str(inters[0]))
    users = [u for u, seq in sequences.items() for _ in seq]
    items = [i for seq in sequences.values() for i in seq]
    return events_table({"user_id": users, "item_id": items, "timestamp": np.arange(len(items)),
                         "behavior": ["click"] * len(items)})


def _extends(seq: list[str], history: list[str]) -> bool:
    """The history ends with the sequence so far (or the sequence ends with the whole history)."""
    m = min(len(seq), len(history))
    return seq[len(seq) - m:] == history[len(history) - m:]


def _restates(seq: list[str], history: list[str], target: str) -> bool:
    """``history + [target]`` is a contiguous part of ``seq``."""
    row = history + [target]
    return any(seq[p - len(history):p + 1] == row for p in range(len(history), len(seq)) if seq[p] == target)


def _items(path: Path) -> tuple[list[str], list[str], list[str | None]]:
    header = kinds = _header(path)
    _expect(header, "item_id", "token", path)
    textual = {n for n, k in kinds.items() if k in ("token", "token_seq")}
    title = next((n for n in header if n in textual and n != "item_id" and (n.endswith("title") or n.endswith("name"))),
                 None)
    described = [n for n in header if n in textual and n in DESCRIBED and n != title]
    category = next((n for n in ("genre", "genres", "class", "categories", "category") if n in described), None)
    at = {name: k for k, name in enumerate(header)}
    ids, texts, cats = [], [], []
    first_line: dict[str, int] = {}
    for line, f in _rows(path, header):
        item = _token(f[at["item_id"]], path, line, "item_id")
        if item in first_line:
            raise DataError(f"an item id that appears twice (first at line {first_line[item]})", file=str(path),
                            line=line, field="item_id", value=item)
        first_line[item] = line
        parts = [" ".join(f[at[title]].split())] if title else []
        for name in described:
            value = f[at[name]].split()
            if value:
                shown = ", ".join(value) if name in _LIST_LIKE and kinds[name] == "token_seq" else " ".join(value)
                parts.append(f"{_LABELS.get(name, name.replace('_', ' ').capitalize())}: {shown}")
        ids.append(item)
        texts.append(". ".join(p for p in parts if p))
        cats.append((f[at[category]].split() or [None])[0] if category else None)
    return ids, texts, cats


def _users(path: Path, user_field: str) -> pa.Table:
    header = _header(path)
    if user_field not in header:
        raise DataError(f"expected a {user_field}:token field, as in the .inter file", file=str(path), line=1)
    at = {name: k for k, name in enumerate(header)}
    kinds = header
    keep = [n for n in header if n != user_field and kinds[n] in ("token", "token_seq", "float")]
    cols: dict[str, list] = {"user_id": [], **{n: [] for n in keep}}
    for line, f in _rows(path, header):
        cols["user_id"].append(_token(f[at[user_field]], path, line, user_field))
        for n in keep:
            value = f[at[n]].strip()
            cols[n].append((_number(value, path, line, n) if value else None) if kinds[n] == "float" else value or None)
    types = {n: pa.float64() if kinds[n] == "float" else pa.string() for n in keep}
    return pa.table({"user_id": pa.array(cols["user_id"], pa.string()),
                     **{n: pa.array(cols[n], types[n]) for n in keep}})
