"""Amazon Reviews as McAuley Lab ships them, one file per category, plain or gzip JSON lines.

- 2018 (https://nijianmo.github.io/amazon/): reviews ``<Category>.json.gz`` or the 5-core
  ``<Category>_5.json.gz`` (``reviewerID``, ``asin``, ``overall``, ``unixReviewTime``,
  ``reviewText``, ``summary``) and ``meta_<Category>.json.gz`` (``asin``, ``title``, ``category``,
  ``description``, ``main_cat``).
- 2023 (https://amazon-reviews-2023.github.io/): ``<Category>.jsonl.gz`` (``user_id``,
  ``parent_asin``, ``rating``, ``timestamp`` in ms, ``title``, ``text``) and
  ``meta_<Category>.jsonl.gz`` (``parent_asin``, ``title``, ``main_category``, ``categories``,
  ``description``).

INPUT_PATH is one review file (its ``meta_`` file is looked up next to it) or a directory of them.
Every review is a ``review`` event (an implicit positive, as usual for this dataset) with the star
rating as ``value`` and the review's summary + text as the user's own text (``user_text``). Item
text = title + category path + the start of the description. Each user gets the attribute
``category``: the category file they reviewed in most (ties: first in name order), for natural
silos by category.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa

from uirl.data.formats.common import Tables, events_table, items_table, json_records, require_items
from uirl.errors import DataError

_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json")
_DESCRIPTION_CHARS = 300


def _category(path: Path) -> str | None:
    """``meta_Books.json.gz`` / ``Books_5.json.gz`` / ``Books.jsonl`` -> ``Books``; None if not JSON."""
    name = path.name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            stem = stem[len("meta_"):] if stem.startswith("meta_") else stem
            return stem[:-2] if stem.endswith("_5") else stem
    return None


def _files(path: Path) -> tuple[list[Path], dict[str, list[Path]]]:
    if not path.exists():
        raise DataError("file or directory not found", file=str(path))
    folder = path if path.is_dir() else path.parent
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and _category(p) is not None)
    reviews = [path] if path.is_file() else [p for p in candidates if not p.name.startswith("meta_")]
    if not reviews or _category(reviews[0]) is None:
        raise DataError("no Amazon review file (<Category>.json(.gz) or <Category>.jsonl(.gz))", file=str(path))
    meta: dict[str, list[Path]] = {}
    for p in candidates:
        if p.name.startswith("meta_"):
            meta.setdefault(_category(p), []).append(p)
    for review in reviews:
        if _category(review) not in meta:
            raise DataError(f"no metadata file meta_{_category(review)}.json(l)(.gz) next to it (item titles "
                            f"come from there)", file=str(review))
    return reviews, meta


def _need(record: dict, keys: tuple[str, ...], path: Path, line: int):
    for key in keys:
        if record.get(key) not in (None, ""):
            return record[key]
    raise DataError("missing field", file=str(path), line=line, field=keys[0])


def _text(value) -> str:
    if isinstance(value, list):
        value = " ".join(str(v) for v in value if v)
    return " ".join(str(value or "").split())


def _sentences(parts) -> str:
    """Non-empty parts joined as sentences (no doubled full stop after a part that ends one)."""
    out = ""
    for part in (p for p in parts if p):
        out = f"{out}{'' if not out else ' ' if out[-1] in '.!?' else '. '}{part}"
    return out


def _item_text(record: dict) -> str:
    title = _text(record.get("title"))
    cats = record.get("categories") or record.get("category") or []
    path = " > ".join(str(c) for c in cats) if isinstance(cats, list) else _text(cats)
    description = _text(record.get("description"))[:_DESCRIPTION_CHARS]
    return _sentences((title, f"Category: {path}" if path else "", description))


def read(path: Path, *, skip_unknown: bool = False) -> Tables:
    reviews, meta = _files(path)
    cols: dict[str, list] = {k: [] for k in ("user_id", "item_id", "timestamp", "behavior", "value", "user_text")}
    wanted: set[str] = set()
    where: list[tuple[Path, int]] = []  # (file, line) of each event, for errors
    user_cats: dict[str, Counter] = {}
    for review_file in reviews:
        category = _category(review_file)
        for line, r in json_records(review_file):
            new = "user_id" in r
            user = str(_need(r, ("user_id",) if new else ("reviewerID",), review_file, line))
            item = str(_need(r, ("parent_asin", "asin") if new else ("asin",), review_file, line))
            raw_rating = _need(r, ("rating",) if new else ("overall",), review_file, line)
            raw_time = _need(r, ("timestamp",) if new else ("unixReviewTime",), review_file, line)
            try:
                rating, stamp = float(raw_rating), int(raw_time)
            except (TypeError, ValueError):
                raise DataError("expected a numeric rating and timestamp", file=str(review_file), line=line,
                                value=f"{raw_rating!r}, {raw_time!r}") from None
            if not 1 <= rating <= 5:
                raise DataError("expected a star rating in [1, 5]", file=str(review_file), line=line,
                                field="rating" if new else "overall", value=rating)
            text = _sentences((_text(r.get("title" if new else "summary")),
                               _text(r.get("text" if new else "reviewText"))))
            for key, value in (("user_id", user), ("item_id", item), ("timestamp", stamp // 1000 if new else stamp),
                               ("behavior", "review"), ("value", rating), ("user_text", text or None)):
                cols[key].append(value)
            wanted.add(item)
            where.append((review_file, line))
            user_cats.setdefault(user, Counter())[category] += 1
    if not cols["user_id"]:
        raise DataError("no reviews in the file(s)", file=str(path))
    items: dict[str, tuple[str, str | None]] = {}
    for category in sorted({_category(r) for r in reviews}):
        products = 0
        for meta_file in meta[category]:
            for line, m in json_records(meta_file):
                products += 1
                item = str(_need(m, ("parent_asin", "asin"), meta_file, line))
                if item in wanted and item not in items:
                    main = m.get("main_category") or m.get("main_cat") or category
                    items[item] = (_item_text(m) or item, _text(main) or category)
        require_items(products, meta[category][0], "product")
    missing = [k for k, item in enumerate(cols["item_id"]) if item not in items]
    if missing and not skip_unknown:
        file, line = where[missing[0]]
        raise DataError(f"a review of an item that is not in meta_{_category(file)} (pass --skip-unknown-items "
                        f"to drop such reviews)", file=str(file), line=line, field="asin",
                        value=cols["item_id"][missing[0]])
    ids = sorted(items)
    users = sorted(user_cats)
    return Tables(items=items_table(ids, [items[i][0] for i in ids], [items[i][1] for i in ids]),
                  events=events_table(cols),
                  users=pa.table({"user_id": users,
                                  "category": [max(sorted(user_cats[u]), key=user_cats[u].__getitem__)
                                               for u in users]}))
