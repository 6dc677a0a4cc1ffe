"""MovieLens as GroupLens ships it (https://grouplens.org/datasets/movielens/), unzipped.

- ``ml-100k``: ``u.data`` (user, item, rating, timestamp; tab-separated), ``u.item`` (latin-1,
  ``|``-separated, 19 genre flags), ``u.user`` (age, gender, occupation, zip code).
- ``ml-1m`` (and ``ml-10m``): ``ratings.dat``, ``movies.dat``, ``users.dat`` (``::``-separated,
  latin-1; ``users.dat`` only in ml-1m, ``tags.dat`` only in ml-10m).
- ``ml-latest-small``, ``ml-latest``, ``ml-25m``, ``ml-32m``: ``ratings.csv``, ``movies.csv``,
  ``tags.csv`` (UTF-8 CSV with a header).

Every rating becomes a ``rate`` event with the rating as ``value`` (positive at or above the
threshold chosen at conversion). Item text = title + genres; a user's own tags on a movie become
the ``user_text`` of that user's rating of it (the user's text view). ``ratings.csv`` is streamed
through Arrow, so ml-25m/ml-32m convert in a few GB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from uirl.data.formats.common import (Tables, check_range, events_table, items_table, read_delimited,
                                      require_file, require_items, split_lines)
from uirl.errors import DataError

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
                 "Sci-Fi", "Thriller", "War", "Western")
# ml-1m README: occupation codes of users.dat.
ML1M_OCCUPATIONS = ("other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
                    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
                    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer")
_NO_GENRES = "(no genres listed)"


def _item_text(title: str, genres: list[str]) -> str:
    return f"{title}. Genres: {', '.join(genres)}" if genres else title


def _region(zip_code: str) -> str:
    """US zip codes: their first digit is a postal region (0 = north-east ... 9 = west coast)."""
    zip_code = zip_code.strip()
    return f"zip-{zip_code[0]}" if zip_code[:1].isdigit() and len(zip_code) >= 5 else "non-us"


def read(path: Path, *, skip_unknown: bool = False) -> Tables:
    root = path if path.is_dir() else path.parent
    if not root.exists():
        raise DataError("no such directory", file=str(path))
    if (root / "u.data").exists():
        return _ml100k(root, skip_unknown)
    if (root / "ratings.dat").exists():
        return _ml1m(root, skip_unknown)
    if (root / "ratings.csv").exists():
        return _csv(root, skip_unknown)
    raise DataError("no MovieLens ratings file here (expected u.data, ratings.dat or ratings.csv)",
                    file=str(root))


def _ratings(batches, path: Path, lo: float, hi: float) -> dict[str, pa.ChunkedArray]:
    """(line, batch of user/item/rating/timestamp) -> event columns, ratings range-checked."""
    chunks = []
    for line, batch in batches:
        check_range(batch.column("rating").to_numpy(zero_copy_only=False), lo, hi, path=path, first_line=line,
                    field="rating")
        chunks.append(batch)
    if not chunks or not sum(b.num_rows for b in chunks):
        raise DataError("no ratings in the file", file=str(path))
    table = pa.Table.from_batches(chunks)
    return {"user": table["user"], "item": table["item"], "rating": table["rating"], "timestamp": table["timestamp"]}


def _events(r: dict, tags: dict[tuple[int, int], str] | None = None) -> pa.Table:
    columns = {"user_id": pc.cast(r["user"], pa.string()), "item_id": pc.cast(r["item"], pa.string()),
               "timestamp": pc.cast(r["timestamp"], pa.int64()),
               "behavior": pa.repeat(pa.scalar("rate"), sum(len(c) for c in r["user"].chunks)),
               "value": pc.cast(r["rating"], pa.float64())}
    if tags:
        columns["user_text"] = _attach_tags(r, tags)
    return events_table(columns)


def _attach_tags(r: dict, tags: dict[tuple[int, int], str]) -> pa.Array:
    """A user's tags on a movie as the user_text of their rating of it (sorted-key lookup, no join)."""
    keys = np.array(sorted(tags), dtype=np.int64).reshape(-1, 2)
    packed = (keys[:, 0] << 32) | keys[:, 1]
    texts = np.array([tags[(int(u), int(i))] for u, i in keys], dtype=object)
    user = r["user"].to_numpy().astype(np.int64)
    item = r["item"].to_numpy().astype(np.int64)
    want = (user << 32) | item
    pos = np.clip(np.searchsorted(packed, want), 0, len(packed) - 1)
    hit = packed[pos] == want
    out = np.full(len(want), None, dtype=object)
    out[hit] = texts[pos[hit]]
    return pa.array(out, type=pa.string())


def _known(r: dict, known: pa.Array, path: Path, first_line: int, skip: bool) -> dict:
    """Ratings of movies missing from the movies file: an error naming the line, or dropped."""
    found = pc.is_in(r["item"], value_set=known)
    if pc.all(found).as_py():
        return r
    if skip:
        return {k: v.filter(found) for k, v in r.items()}
    i = int(np.flatnonzero(~found.to_numpy())[0])
    raise DataError("a rating of a movie that is not in the movies file (pass --skip-unknown-items to drop "
                    "such ratings)", file=str(path), line=first_line + i, field="movie",
                    value=int(r["item"].to_numpy()[i]))


# --- ml-100k -------------------------------------------------------------------------------------

def _ml100k(root: Path, skip_unknown: bool) -> Tables:
    ids, texts, cats = [], [], []
    for _, f in split_lines(require_file(root / "u.item"), "|", 5 + len(ML100K_GENRES), encoding="latin-1"):
        flags = f[5:]
        genres = [g for g, flag in zip(ML100K_GENRES, flags) if flag == "1"]
        ids.append(int(f[0]))
        texts.append(_item_text(f[1], genres))
        cats.append(genres[0] if genres else None)
    require_items(len(ids), root / "u.item", "movie")
    items = items_table([str(i) for i in ids], texts, cats)
    path = root / "u.data"
    types = {"user": pa.int32(), "item": pa.int32(), "rating": pa.float32(), "timestamp": pa.int64()}
    r = _ratings(read_delimited(path, delimiter="\t", names=list(types), types=types), path, 1, 5)
    r = _known(r, pa.array(ids, pa.int32()), path, 1, skip_unknown)
    users = None
    if (root / "u.user").exists():
        rows = [f for _, f in split_lines(root / "u.user", "|", 5, encoding="latin-1")]
        users = pa.table({"user_id": [f[0] for f in rows], "age": [int(f[1]) for f in rows],
                          "gender": [f[2] for f in rows], "occupation": [f[3] for f in rows],
                          "zip": [f[4] for f in rows], "region": [_region(f[4]) for f in rows]})
    return Tables(items=items, events=_events(r), users=users)


# --- ml-1m / ml-10m ------------------------------------------------------------------------------

def _ml1m(root: Path, skip_unknown: bool) -> Tables:
    ids, texts, cats = [], [], []
    for _, f in split_lines(require_file(root / "movies.dat"), "::", 3, encoding="latin-1"):
        genres = [g for g in f[2].split("|") if g and g != _NO_GENRES]
        ids.append(int(f[0]))
        texts.append(_item_text(f[1], genres))
        cats.append(genres[0] if genres else None)
    require_items(len(ids), root / "movies.dat", "movie")
    items = items_table([str(i) for i in ids], texts, cats)
    path = root / "ratings.dat"
    cols: dict[str, list] = {"user": [], "item": [], "rating": [], "timestamp": []}
    for line, f in split_lines(path, "::", 4, encoding="latin-1"):
        try:
            values = int(f[0]), int(f[1]), float(f[2]), int(f[3])
        except ValueError:
            raise DataError("expected UserID::MovieID::Rating::Timestamp numbers", file=str(path), line=line,
                            value="::".join(f)) from None
        for key, v in zip(cols, values):
            cols[key].append(v)
    if not cols["user"]:
        raise DataError("no ratings in the file", file=str(path))
    check_range(np.array(cols["rating"]), 0.5, 5, path=path, first_line=1, field="rating")
    r = {"user": pa.chunked_array([pa.array(cols["user"], pa.int32())]),
         "item": pa.chunked_array([pa.array(cols["item"], pa.int32())]),
         "rating": pa.chunked_array([pa.array(cols["rating"], pa.float32())]),
         "timestamp": pa.chunked_array([pa.array(cols["timestamp"], pa.int64())])}
    r = _known(r, pa.array(ids, pa.int32()), path, 1, skip_unknown)
    users = None
    if (root / "users.dat").exists():
        rows = [f for _, f in split_lines(root / "users.dat", "::", 5, encoding="latin-1")]
        occ = [ML1M_OCCUPATIONS[int(f[3])] if f[3].isdigit() and int(f[3]) < len(ML1M_OCCUPATIONS) else f[3]
               for f in rows]
        users = pa.table({"user_id": [f[0] for f in rows], "gender": [f[1] for f in rows],
                          "age": [int(f[2]) for f in rows], "occupation": occ, "zip": [f[4] for f in rows],
                          "region": [_region(f[4]) for f in rows]})
    tags = None
    if (root / "tags.dat").exists():
        tags = _collect_tags((int(f[0]), int(f[1]), f[2])
                             for _, f in split_lines(root / "tags.dat", "::", 4, encoding="latin-1"))
    return Tables(items=items, events=_events(r, tags), users=users)


# --- ml-latest(-small), ml-25m, ml-32m -----------------------------------------------------------

def _csv(root: Path, skip_unknown: bool) -> Tables:
    movie_types = {"movieId": pa.int32(), "title": pa.string(), "genres": pa.string()}
    path = require_file(root / "movies.csv")
    batches = [b for _, b in read_delimited(path, delimiter=",", names=list(movie_types), types=movie_types,
                                            header=list(movie_types))]
    require_items(sum(b.num_rows for b in batches), path, "movie")
    movies = pa.Table.from_batches(batches)
    ids = movies["movieId"].to_pylist()
    texts, cats = [], []
    for title, genre_field in zip(movies["title"].to_pylist(), movies["genres"].to_pylist()):
        genres = [g for g in genre_field.split("|") if g and g != _NO_GENRES]
        texts.append(_item_text(title, genres))
        cats.append(genres[0] if genres else None)
    items = items_table([str(i) for i in ids], texts, cats)
    path = root / "ratings.csv"
    types = {"user": pa.int32(), "item": pa.int32(), "rating": pa.float32(), "timestamp": pa.int64()}
    r = _ratings(read_delimited(path, delimiter=",", names=list(types), types=types,
                                header=["userId", "movieId", "rating", "timestamp"]), path, 0.5, 5)
    r = _known(r, pa.array(ids, pa.int32()), path, 2, skip_unknown)
    tags = None
    if (root / "tags.csv").exists():
        tag_types = {"user": pa.int32(), "item": pa.int32(), "tag": pa.string(), "timestamp": pa.int64()}
        batches = read_delimited(root / "tags.csv", delimiter=",", names=list(tag_types), types=tag_types,
                                 header=["userId", "movieId", "tag", "timestamp"])
        tags = _collect_tags(row for _, b in batches
                             for row in zip(b["user"].to_pylist(), b["item"].to_pylist(), b["tag"].to_pylist()))
    return Tables(items=items, events=_events(r, tags))


def _collect_tags(rows) -> dict[tuple[int, int], str]:
    """(user, movie) -> that user's distinct tags on the movie, comma-separated, in file order."""
    tags: dict[tuple[int, int], dict[str, None]] = {}
    for user, item, tag in rows:
        if tag and tag.strip():
            tags.setdefault((user, item), {})[tag.strip()] = None
    return {key: ", ".join(values) for key, values in tags.items()}
