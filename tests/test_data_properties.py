"""Properties of the data validators and readers behind ``uirl data convert``, on generated files:
small tables of random columns, types, NaN, empty strings, duplicated ids and unknown users either
convert or fail with one :class:`~uirl.errors.DataError` that names the file (and, for a bad value,
the field) -- never another exception -- and a refused conversion leaves no output directory."""

from __future__ import annotations

import contextlib

import csv
import json
import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from uirl.data.convert import MANIFEST, ConvertOptions, convert
from uirl.errors import DataError, UirlError

#: Each conversion is a few tens of milliseconds; these budgets keep the file well under a minute.
PROPERTY = settings(max_examples=50, deadline=None, database=None)
OPTIONS = ConvertOptions(negatives=2)
FORMATS = ("jsonl", "csv", "parquet")

ITEMS = [f"i{k}" for k in range(10)]
USERS = ["u0", "u1", "u2"]


# --- writing a table in one of the three file formats ------------------------------------------

def _cell(value) -> str:
    """What a CSV cell holds: the text of the value, nothing for a missing one."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def write_table(root: Path, name: str, records: list[dict], fmt: str) -> Path:
    path = root / f"{name}.{fmt}"
    if fmt == "jsonl":  # NaN and inf as Python's json writes them (NaN, Infinity): what a sloppy writer does
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif fmt == "csv":
        columns = list(dict.fromkeys(k for r in records for k in r))
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([_cell(r.get(c)) for c in columns] for r in records)
    else:
        try:
            table = pa.Table.from_pylist(records)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in a column: Parquet keeps them as text
            table = pa.Table.from_pylist([{k: None if v is None else str(v) for k, v in r.items()} for r in records])
        pq.write_table(table, path)
    return path


# --- a valid dataset and single mutations of it -------------------------------------------------

def valid_records() -> dict[str, list[dict]]:
    """Three users with six clicks each on distinct items (enough for a training item, a validation
    and a test target), and a candidate list for u0's test target."""
    items = [{"item_id": i, "text": f"title of {i}", "category": "c" + i[-1:]} for i in ITEMS]
    events = [{"user_id": u, "item_id": ITEMS[(3 * k + j) % len(ITEMS)], "timestamp": 1000 + 10 * j,
               "behavior": "click", "value": 4.0} for k, u in enumerate(USERS) for j in range(6)]
    last = events[5]["item_id"]  # u0's last positive: the test target
    candidates = [{"user_id": "u0", "split": "test", "candidates": [last, ITEMS[9], ITEMS[8]]}]
    return {"items": items, "events": events, "candidates": candidates}


def test_the_valid_dataset_converts_in_every_format(tmp_path):
    for fmt in FORMATS:
        src = tmp_path / fmt
        src.mkdir()
        _write_all(src, valid_records(), fmt)
        manifest = convert("schema", src, tmp_path / f"out-{fmt}", OPTIONS)
        assert manifest["counts"]["evaluated-users"] == len(USERS) and manifest["fixed-lists"]["test"] == 1


#: (file, field, bad value, formats in which the value is bad): one value in one row of a valid
#: dataset that every conversion must refuse, naming that file and field. (A number where a string
#: is expected is text in a CSV cell, so only JSONL and Parquet can carry it.)
MUTATIONS = [
    ("items", "item_id", None, FORMATS), ("items", "item_id", "", FORMATS), ("items", "item_id", "  ", FORMATS),
    ("items", "item_id", 5, ("jsonl",)), ("items", "item_id", "i0", FORMATS),  # i0 twice
    ("items", "text", None, FORMATS), ("items", "text", " ", FORMATS), ("items", "category", 3, ("jsonl",)),
    ("events", "user_id", None, FORMATS), ("events", "user_id", "", FORMATS), ("events", "user_id", 7, ("jsonl",)),
    ("events", "item_id", "not-an-item", FORMATS), ("events", "item_id", None, FORMATS),
    ("events", "timestamp", "abc", FORMATS), ("events", "timestamp", 1.5, FORMATS),
    ("events", "timestamp", None, FORMATS), ("events", "timestamp", float("nan"), ("jsonl",)),
    ("events", "timestamp", 1e300, FORMATS), ("events", "timestamp", True, ("jsonl",)),
    ("events", "behavior", "hover", FORMATS), ("events", "behavior", None, FORMATS),
    ("events", "value", "x", FORMATS), ("events", "value", float("inf"), ("jsonl", "parquet")),
    ("candidates", "user_id", "ghost", FORMATS), ("candidates", "user_id", None, ("jsonl", "parquet")),
    ("candidates", "split", "train", FORMATS), ("candidates", "candidates", ["i9"], FORMATS),
    ("candidates", "candidates", ["i9", "ghost-item"], FORMATS), ("candidates", "candidates", ["i9", "i9"], FORMATS),
    ("candidates", "candidates", ["i9", "i8"], FORMATS),  # i9 is not u0's test target
]


@st.composite
def mutated(draw):
    file, field, value, formats = draw(st.sampled_from(MUTATIONS))
    fmt = draw(st.sampled_from(formats))
    records = valid_records()
    rows = records[file]
    row = draw(st.integers(0, len(rows) - 1))
    if (file, field, value) == ("items", "item_id", "i0"):
        row = draw(st.integers(1, len(rows) - 1))  # a second i0, wherever it is
    rows[row] = {**rows[row], field: value}
    return records, fmt, file, field


def _write_all(src: Path, records: dict[str, list[dict]], fmt: str) -> None:
    for name, rows in records.items():
        if name == "candidates" and fmt == "csv":
            rows = [{**r, "candidates": " ".join(map(str, r["candidates"]))}  # one cell of space-separated ids
                    if isinstance(r.get("candidates"), list) else r for r in rows]
        write_table(src, name, rows, fmt)


@contextlib.contextmanager
def _sources(records, fmt):
    """A temporary work directory holding ``records`` as schema files in ``src/``: (work, src, out)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src, out = work / "src", work / "out"
        src.mkdir()
        _write_all(src, records, fmt)
        yield work, src, out


def _refused_cleanly(work: Path, out: Path) -> None:
    """A refused conversion leaves no output directory and no temporary one next to it."""
    assert not out.exists()
    assert not [p.name for p in work.iterdir() if p.name.startswith(f".{out.name}.")]


@PROPERTY
@given(mutated())
def test_one_bad_value_is_refused_naming_its_file_and_field(case):
    records, fmt, file, field = case
    with _sources(records, fmt) as (work, src, out):
        try:
            convert("schema", src, out, OPTIONS)
        except DataError as error:
            assert error.file == str(src / f"{file}.{fmt}"), str(error)
            assert error.field == field, str(error)
            assert "\n" not in str(error) and str(error).startswith(str(src / f"{file}.{fmt}"))
            _refused_cleanly(work, out)
        else:
            raise AssertionError(f"{file}.{fmt} with a bad {field} converted")


# --- arbitrary small tables ---------------------------------------------------------------------

_STRINGS = st.one_of(st.sampled_from(ITEMS + USERS + ["click", "view", "rate", "purchase", "", " ", "0", "1.5", "ghost"]),
                     st.text(max_size=4))
_VALUES = {"str": _STRINGS, "int": st.integers(-5, 2000), "float": st.floats(allow_nan=True, allow_infinity=True),
           "bool": st.booleans(), "list": st.lists(st.one_of(st.sampled_from(ITEMS), st.integers(0, 3)), max_size=3)}


@st.composite
def table(draw, columns: tuple[str, ...]):
    """A few rows over a random subset of ``columns`` (plus maybe a stray one), each column of one
    random type, with missing values."""
    names = draw(st.lists(st.sampled_from(columns + ("extra",)), unique=True, max_size=len(columns) + 1))
    kinds = {name: draw(st.sampled_from(sorted(_VALUES))) for name in names}
    rows = draw(st.integers(0, 7))
    return [{name: draw(st.one_of(st.none(), _VALUES[kinds[name]]) if draw(st.booleans()) else _VALUES[kinds[name]])
             for name in names} for _ in range(rows)]


_ANY = st.one_of(st.none(), *_VALUES.values())


@st.composite
def perturbed(draw, rows: list[dict]):
    """``rows`` with a few changes: a cell set to anything, a column dropped, a row dropped or repeated."""
    rows = [dict(r) for r in rows]
    for _ in range(draw(st.integers(0, 3))):
        change = draw(st.sampled_from(["cell", "cell", "drop-column", "drop-row", "repeat-row"]))
        if not rows:
            break
        i = draw(st.integers(0, len(rows) - 1))
        column = draw(st.sampled_from(sorted(rows[i]))) if rows[i] else None
        if change == "cell" and column is not None:
            rows[i][column] = draw(_ANY)
        elif change == "drop-column" and column is not None:
            rows = [{k: v for k, v in r.items() if k != column} for r in rows]
        elif change == "drop-row":
            del rows[i]
        elif change == "repeat-row":
            rows.insert(draw(st.integers(0, len(rows))), dict(rows[i]))
    return rows


#: The valid tables (:func:`valid_records`) plus the optional ones, to perturb.
_BASE = {**valid_records(), "users": [{"user_id": u, "age": 20 + k} for k, u in enumerate(USERS)],
         "social": [{"user_id": "u0", "other_user_id": "u1"}]}
_COLUMNS = {"items": ("item_id", "text", "category", "image"),
            "events": ("user_id", "item_id", "timestamp", "behavior", "value", "user_text", "silo"),
            "users": ("user_id", "age"), "social": ("user_id", "other_user_id"),
            "candidates": ("user_id", "split", "candidates")}


@st.composite
def datasets(draw):
    """Each table either the valid one, a little changed, or made up; the optional tables maybe left out."""
    records = {}
    for name, columns in _COLUMNS.items():
        if name in ("items", "events") or draw(st.booleans()):
            records[name] = draw(st.one_of(perturbed(_BASE[name]), perturbed(_BASE[name]), table(columns)))
    return records, draw(st.sampled_from(FORMATS))


@PROPERTY
@given(datasets())
def test_arbitrary_small_tables_convert_or_fail_naming_the_file(case):
    records, fmt = case
    with _sources(records, fmt) as (work, src, out):
        try:
            convert("schema", src, out, OPTIONS)
        except UirlError as error:
            assert str(src) in str(error) and "\n" not in str(error), str(error)
            _refused_cleanly(work, out)
        else:
            assert (out / MANIFEST).is_file()


# --- RecBole atomic files -----------------------------------------------------------------------

_FIELDS = st.sampled_from(["user_id", "session_id", "item_id", "rating", "timestamp", "item_id_list", "title",
                           "genre", "x", "", "user_id:", "a:b:c"])
_TYPES = st.sampled_from(["token", "token_seq", "float", "float_seq", "int", ""])
_TOKENS = st.one_of(st.sampled_from(ITEMS + USERS + ["", " ", "1", "4.5", "nan", "inf", "1e999", "i1 i2", "-3"]),
                    st.text(st.characters(blacklist_characters="\t\n\r", blacklist_categories=("Cs",)), max_size=4))


@st.composite
def atomic_files(draw):
    header = draw(st.lists(st.tuples(_FIELDS, _TYPES), min_size=1, max_size=5))
    if draw(st.booleans()):  # often a plausible layout, so that the readers get past the header
        header = [("user_id", "token"), ("item_id", "token")] + draw(st.lists(
            st.sampled_from([("rating", "float"), ("timestamp", "float"), ("item_id_list", "token_seq")]),
            unique=True, max_size=2))
    width = len(header) + draw(st.sampled_from([0, 0, 0, 1, -1]))
    rows = draw(st.lists(st.lists(_TOKENS, min_size=max(width, 0), max_size=max(width, 0)), max_size=8))
    item_rows = draw(st.lists(st.tuples(st.sampled_from(ITEMS + [""]), _TOKENS), max_size=4))
    return header, rows, item_rows if draw(st.booleans()) else None


@PROPERTY
@given(atomic_files())
def test_arbitrary_recbole_files_convert_or_fail_naming_the_file(case):
    header, rows, item_rows = case
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src, out = work / "ml", work / "out"
        src.mkdir()
        lines = ["\t".join(f"{name}:{kind}" for name, kind in header)] + ["\t".join(row) for row in rows]
        (src / "ml.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
        if item_rows is not None:
            items = ["item_id:token\ttitle:token_seq"] + [f"{i}\t{t}" for i, t in item_rows]
            (src / "ml.item").write_text("\n".join(items) + "\n", encoding="utf-8")
        try:
            convert("recbole", src, out, OPTIONS)
        except UirlError as error:
            assert str(src) in str(error) and "\n" not in str(error), str(error)
            _refused_cleanly(work, out)
        else:
            assert (out / MANIFEST).is_file()


def test_a_users_file_with_a_mixed_column_or_a_missing_id_is_one_error(tmp_path):
    """Found by the property above: a users.jsonl attribute column holding numbers and text stopped
    the conversion with a raw Arrow error, and a missing user id became a user called 'nan'."""
    for users, field, message in (([{"user_id": "u0", "age": 20}, {"user_id": "u1", "age": "old"}], "age",
                                   "of one type for all users"),
                                  ([{"user_id": "u0"}, {"user_id": None}], "user_id", "expected a user id"),
                                  ([{"user_id": "u0"}, {"user_id": "u0"}], "user_id", "appears twice")):
        src = tmp_path / field / message.replace(" ", "-")
        src.mkdir(parents=True)
        _write_all(src, {**valid_records(), "users": users}, "jsonl")
        out = src.parent / "out"
        try:
            convert("schema", src, out, OPTIONS)
        except DataError as error:
            assert error.file == str(src / "users.jsonl") and error.field == field and message in str(error)
        else:
            raise AssertionError(f"users.jsonl {users} converted")
        assert not out.exists()
    # A column of one type is kept as a user attribute (natural partitioning reads it).
    src = tmp_path / "fine"
    src.mkdir()
    _write_all(src, {**valid_records(), "users": [{"user_id": u, "age": 20 + k} for k, u in enumerate(USERS)]}, "jsonl")
    assert "age" in convert("schema", src, tmp_path / "fine-out", OPTIONS)["user-columns"]
