"""Publisher files -> a converted dataset directory that every run and every method reads.

``OUTPUT_DIR`` holds Parquet tables in the schema of :mod:`uirl.data.schema`:

- ``items.parquet`` (item_id, text, category), ``events.parquet`` (user_id, item_id, timestamp,
  behavior, value, user_text, silo -- the columns the source has);
- ``user_attributes.parquet``: one row per user: ``top_category`` (the item category the user has
  most events with), the source's own attributes (ml-100k/ml-1m gender, age, occupation, zip,
  region; Amazon category) and ``silo`` when events carry one -- the columns natural and
  Dirichlet partitioning use;
- ``split.parquet``: the fixed validation/test targets and candidate lists
  (:mod:`uirl.data.fixed_split`); ``impressions.parquet`` for datasets that ship them (MIND);
  ``social.parquet`` when the source has a social graph;
- ``candidates.parquet``: the fixed candidate lists the source shipped itself
  (:mod:`uirl.data.fixed_lists`), already applied to ``split.parquet`` and kept for ``resplit``;
- ``manifest.json``: format, source, counts, seed, negatives, positive threshold, where the event
  order came from (``event-order``: ``timestamp`` or ``file``), the fixed lists and any warnings.

The directory is built next to ``OUTPUT_DIR`` under a temporary name, ``manifest.json`` is written
last, and only then is it renamed: a failed conversion never leaves a directory that looks done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uirl.atomic import atomic_dir, atomic_file, atomic_write_text
from uirl.data.fixed_lists import STORED, FixedLists, apply_fixed_lists, stored_lists
from uirl.data.fixed_split import impression_split, standard_split, user_codes
from uirl.data.formats import amazon, mind, movielens, recbole, schema_files
from uirl.data.formats.common import Tables
from uirl.errors import DataError

FORMATS: dict[str, Callable[..., Tables]] = {"movielens": movielens.read, "amazon": amazon.read,
                                             "mind": mind.read, "schema": schema_files.read,
                                             "recbole": recbole.read}
MANIFEST = "manifest.json"
DATASET_VERSION = 1
_ROW_GROUP = 1 << 20


@dataclass(frozen=True)
class ConvertOptions:
    positive_threshold: float = 4.0  # a rating >= this is a positive (rate events)
    negatives: int = 19  # sampled negatives per validation/test list (datasets without impressions)
    seed: int = 0
    core: int = 0  # k-core filter: repeatedly drop users and items with fewer than k events (0 = off)
    skip_unknown_items: bool = False  # drop events of items missing from the catalogue instead of failing


def _check_items(items: pa.Table, source: str) -> None:
    ids = items["item_id"]
    if len(ids) == 0:
        raise DataError("no items", file=source)
    empty = pc.or_(pc.is_null(items["text"]), pc.equal(pc.utf8_trim_whitespace(items["text"]), ""))
    empty = empty.to_numpy(zero_copy_only=False)
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise DataError("an item with no text", file=source, row=i, field="item_id", value=ids[i].as_py())
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise DataError("an item id that appears twice in the catalogue", file=source, field="item_id", value=dup)


def _known_items(events: pa.Table, items: pa.Table, skip: bool, source: str) -> pa.Table:
    known = pc.is_in(events["item_id"], value_set=items["item_id"])
    if pc.all(known).as_py():
        return events
    if skip:
        return events.filter(known)
    i = int(np.flatnonzero(~known.to_numpy(zero_copy_only=False))[0])
    raise DataError("an event for an item that is not in the catalogue (pass --skip-unknown-items to drop "
                    "such events)", file=source, row=i, field="item_id", value=events["item_id"][i].as_py())


def _key_codes(column: pa.ChunkedArray) -> np.ndarray:
    """One uint64 per value, equal values equal (strings: dictionary codes; nulls: a code too)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        encoded = pc.dictionary_encode(column, null_encoding="encode").combine_chunks()
        return encoded.indices.to_numpy().astype(np.uint64)
    return pc.fill_null(column, 0).to_numpy().astype(np.int64).view(np.uint64)


def drop_duplicate_events(events: pa.Table) -> tuple[pa.Table, int]:
    """``events`` without exact repeats (rows equal in every column: the first is kept, the order
    is unchanged), and how many were dropped. A 64-bit hash of user, item, timestamp and behaviour
    finds the few candidate rows cheaply; only those are compared on every column."""
    key = np.zeros(len(events), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for name in ("user_id", "item_id", "timestamp", "behavior"):
            if name in events.column_names:
                key = key * np.uint64(0x9E3779B97F4A7C15) + _key_codes(events[name])
    ordered = np.sort(key)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(repeated):
        return events, 0
    rows = np.flatnonzero(np.isin(key, repeated))
    candidates = events.take(pa.array(rows)).append_column("__row", pa.array(rows))
    first = candidates.group_by(events.column_names, use_threads=False).aggregate([("__row", "min")])
    dropped = np.setdiff1d(rows, first["__row_min"].to_numpy())
    keep = np.ones(len(events), dtype=bool)
    keep[dropped] = False
    return events.filter(pa.array(keep)), len(dropped)


def _core(events: pa.Table, k: int) -> pa.Table:
    """Iterated k-core: keep events whose user and item both have >= k events."""
    users, _ = user_codes(events)
    items = pc.dictionary_encode(events["item_id"]).combine_chunks().indices.to_numpy()
    keep = np.ones(len(users), dtype=bool)
    while True:
        user_n = np.bincount(users[keep], minlength=users.max() + 1)
        item_n = np.bincount(items[keep], minlength=items.max() + 1)
        new = keep & (user_n[users] >= k) & (item_n[items] >= k)
        if new.sum() == keep.sum():
            return events.filter(pa.array(keep))
        keep = new


def _users(events: pa.Table, items: pa.Table, attributes: pa.Table | None, source: str) -> pa.Table:
    codes, names = user_codes(events)
    item_code = pc.index_in(events["item_id"], value_set=items["item_id"]).to_numpy(zero_copy_only=False)
    cat_enc = pc.dictionary_encode(pc.fill_null(items["category"].combine_chunks(), "unknown"))
    cat_code = cat_enc.indices.to_numpy()[item_code]
    ncat = len(cat_enc.dictionary)
    pair = codes * ncat + cat_code
    counts = np.bincount(pair, minlength=len(names) * ncat).reshape(len(names), ncat)
    top = cat_enc.dictionary.take(pa.array(counts.argmax(axis=1)))
    table = pa.table({"user_id": pa.array(names, pa.string()), "top_category": top})
    if "silo" in events.column_names:
        pairs = pa.table({"u": codes, "s": events["silo"]}).group_by(["u", "s"]).aggregate([])
        per_user = np.bincount(pairs["u"].to_numpy(), minlength=len(names))
        if (per_user > 1).any():
            user = names[int(np.flatnonzero(per_user > 1)[0])]
            raise DataError("a user with events in more than one silo (a user belongs to one silo)",
                            file=source, field="silo", value=user)
        silo = pairs.sort_by("u")["s"]
        table = table.append_column("silo", silo)
    if attributes is not None:
        attributes = attributes.cast(pa.schema([pa.field("user_id", pa.string())] +
                                               [f for f in attributes.schema if f.name != "user_id"]))
        table = table.join(attributes, "user_id", join_type="left outer").sort_by("user_id")
    return table


def _write(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, row_group_size=_ROW_GROUP, compression="zstd")


def write_manifest(directory: Path, manifest: dict) -> None:
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def make_split(events: pa.Table, items: pa.Table, impressions: pa.Table | None, options: ConvertOptions,
               fixed: FixedLists | None = None) -> pa.Table:
    pool = sorted(items["item_id"].to_pylist())
    if impressions is not None:
        split = impression_split(events, impressions, pool, threshold=options.positive_threshold,
                                 num_negatives=options.negatives, seed=options.seed)
    else:
        split = standard_split(events, pool, threshold=options.positive_threshold, num_negatives=options.negatives,
                               seed=options.seed)
    return split if fixed is None else apply_fixed_lists(split, fixed)


def convert(fmt: str, input_path: str | os.PathLike, output_dir: str | os.PathLike,
            options: ConvertOptions = ConvertOptions(), *, say: Callable[[str], None] = lambda _: None) -> dict:
    """Convert ``input_path`` (files as the publisher ships them) into ``output_dir``; returns the manifest."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format; expected one of {', '.join(FORMATS)}", value=fmt)
    source, output = Path(input_path), Path(output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DataError("output directory already exists and is not empty (remove it or choose another)",
                        file=str(output))
    say(f"reading {fmt} from {source}")
    tables = FORMATS[fmt](source, skip_unknown=options.skip_unknown_items)
    for note in tables.notes:
        say(f"warning: {note}")
    _check_items(tables.items, str(source))
    events = _known_items(tables.events, tables.items, options.skip_unknown_items, str(source))
    events, repeats = drop_duplicate_events(events)
    if repeats:
        tables.notes.append(f"dropped {repeats:,} duplicate events (equal to an earlier event in every column: "
                            "user, item, timestamp, behaviour and the rest)")
        say(f"warning: {tables.notes[-1]}")
    if options.core:
        events = _core(events, options.core)
    if len(events) == 0:
        raise DataError("no events left to convert", file=str(source))
    say(f"{len(events):,} events, {len(tables.items):,} items; computing the fixed evaluation lists")
    impressions = tables.impressions
    if impressions is not None and options.core:
        impressions = impressions.filter(pc.is_in(impressions["user_id"], value_set=pc.unique(events["user_id"])))
    split = make_split(events, tables.items, impressions, options, tables.candidates)
    if len(split) == 0:
        raise DataError("no user has enough positive events for a training item, a validation and a test "
                        "target (at least 4 distinct positives)", file=str(source))
    users = _users(events, tables.items, tables.users, str(source))
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(output) as tmp:  # an existing output is empty (checked above)
        _write(tables.items, tmp / "items.parquet")
        _write(events, tmp / "events.parquet")
        _write(users, tmp / "user_attributes.parquet")
        _write(split, tmp / "split.parquet")
        if impressions is not None:
            _write(impressions, tmp / "impressions.parquet")
        if tables.social is not None:
            _write(tables.social, tmp / "social.parquet")
        if tables.candidates is not None:
            _write(tables.candidates.table, tmp / STORED)
        behaviors = pc.value_counts(events["behavior"]).to_pylist()
        manifest = {"uirl-dataset": DATASET_VERSION, "format": fmt, "source": source.name,
                    "options": asdict(options),
                    "counts": {"users": len(users), "items": len(tables.items), "events": len(events),
                               "evaluated-users": len(split),
                               "behaviors": {b["values"]: b["counts"] for b in behaviors}},
                    "user-columns": [c for c in users.column_names if c != "user_id"],
                    "event-order": tables.event_order}
        if tables.candidates is not None:
            manifest["fixed-lists"] = {"file": Path(tables.candidates.file).name, **tables.candidates.counts()}
        if tables.notes:
            manifest["notes"] = list(tables.notes)
        write_manifest(tmp, manifest)
    return manifest


def read_manifest(directory: Path, *, key: str = "dataset") -> dict:
    """The manifest of a converted directory; a ConfigError naming ``key`` if it is not one."""
    from uirl.errors import ConfigError

    path = directory / MANIFEST
    if not path.is_file():
        what = "does not exist" if not directory.exists() else "is not a converted dataset (no manifest.json)"
        expected = ("give 'synthetic' or a directory written by `uirl data convert` (an absolute path)"
                    if key == "dataset" else "expected a directory written by `uirl data convert`")
        raise ConfigError(f"{what}; {expected}", field=key, value=str(directory))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"not valid JSON ({exc})", file=str(path)) from None
    if manifest.get("uirl-dataset") != DATASET_VERSION:
        raise DataError(f"expected uirl-dataset {DATASET_VERSION}", file=str(path), field="uirl-dataset",
                        value=manifest.get("uirl-dataset"))
    return manifest


def resplit(directory: str | os.PathLike, options: ConvertOptions) -> dict:
    """Recompute ``split.parquet`` of a converted directory (other negatives, seed or threshold).
    Fixed lists the source shipped (``candidates.parquet``) are applied again, verbatim.

    The new split is written to a temporary file and renamed over the old one, then the manifest is
    replaced the same way; a failure leaves the previous split and manifest in place."""
    root = Path(directory)
    manifest = read_manifest(root, key="DIR")
    events = pq.read_table(root / "events.parquet")
    items = pq.read_table(root / "items.parquet")
    impressions = pq.read_table(root / "impressions.parquet") if (root / "impressions.parquet").exists() else None
    fixed = stored_lists(root, set(items["item_id"].to_pylist()))
    split = make_split(events, items, impressions, options, fixed)
    if len(split) == 0:
        raise DataError("no user has enough positive events with these options", file=str(root))
    with atomic_file(root / "split.parquet") as tmp:
        _write(split, tmp)
    manifest["options"] = {**manifest.get("options", {}), **asdict(options)}
    manifest["counts"]["evaluated-users"] = len(split)
    write_manifest(root, manifest)
    return manifest
