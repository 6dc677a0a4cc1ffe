"""A generated dataset in MovieLens 100K's exact layout, with genre-driven tastes, for the ablation.

``python -m simulation.movielens_demo RAW_DIR [--users 300 --movies 500 --seed 0]`` writes
``u.data`` (tab-separated user, item, rating 1-5, unix time), ``u.item`` (latin-1, ``|``-separated,
19 genre flags) and ``u.user`` (age, gender, occupation, zip) as the GroupLens files lay them out.
Convert it with ``uirl data convert --format movielens RAW_DIR OUT_DIR`` like the real download.

The data is not ml-100k (nothing is downloaded here); it is made so that the interest model's parts
have something to find: each user likes a few genres (ratings follow them, so the rating labels
carry signal for the behaviour heads and the genres for the facet heads), and each user's taste
drifts during their history (one liked genre becomes the favourite late on, for the levels).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from uirl.data.formats.movielens import ML100K_GENRES

_OCCUPATIONS = ("administrator", "artist", "educator", "engineer", "entertainment", "executive",
                "healthcare", "librarian", "marketing", "programmer", "retired", "student", "technician",
                "writer", "other")
_WORDS = ("Silent", "River", "Night", "Last", "Summer", "Iron", "Blue", "City", "Ghost", "Heart", "Secret",
          "Wild", "Empire", "Shadow", "Dream", "Road", "Storm", "Little", "Lost", "Golden", "Dark", "Star",
          "Winter", "House", "Fire", "Love", "War", "Stranger", "Island", "Crown", "Mirror", "Garden")


def write_ml100k(root: str | Path, *, users: int = 300, movies: int = 500, min_ratings: int = 20,
                 max_ratings: int = 60, seed: int = 0) -> Path:
    """Write ``u.data``, ``u.item`` and ``u.user`` under ``root``; -> ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    genres = len(ML100K_GENRES) - 1  # "unknown" (flag 0) is never set
    flags = np.zeros((movies, genres), dtype=bool)
    for m in range(movies):
        flags[m, rng.choice(genres, size=rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]), replace=False)] = True
    popularity = rng.pareto(1.5, movies) + 1.0
    item_lines = []
    for m in range(movies):
        title = " ".join(rng.choice(_WORDS, size=rng.integers(1, 4), replace=False))
        year = int(rng.integers(1930, 1998))
        row = [str(m + 1), f"{title} ({year})", f"01-Jan-{year}", "", "http://us.imdb.com/M/title-exact?x",
               "0", *("1" if f else "0" for f in flags[m])]
        item_lines.append("|".join(row) + "\n")
    (root / "u.item").write_bytes("".join(item_lines).encode("latin-1"))

    rating_lines, user_lines = [], []
    for u in range(users):
        liked = rng.choice(genres, size=3, replace=False)
        taste = np.full(genres, -0.5)
        taste[liked] = [1.5, 1.0, 0.6]
        late = taste.copy()
        late[liked[2]] = 2.0  # the third liked genre becomes the favourite in the second half
        n = int(rng.integers(min_ratings, max_ratings + 1))
        start = 874_000_000 + int(rng.integers(0, 20_000_000))
        seen: set[int] = set()
        for j in range(n):
            pref = taste if j < n // 2 else late
            affinity = flags @ pref / flags.sum(axis=1)
            weight = popularity * np.exp(1.5 * affinity)
            weight[list(seen)] = 0.0
            m = int(rng.choice(movies, p=weight / weight.sum()))
            seen.add(m)
            rating = int(np.clip(np.rint(2.8 + 1.4 * affinity[m] + rng.normal(0, 0.7)), 1, 5))
            rating_lines.append(f"{u + 1}\t{m + 1}\t{rating}\t{start + 3600 * j}\n")
        user_lines.append(f"{u + 1}|{int(rng.integers(18, 70))}|{'MF'[int(rng.integers(2))]}|"
                          f"{_OCCUPATIONS[int(rng.integers(len(_OCCUPATIONS)))]}|{int(rng.integers(10000, 99999))}\n")
    (root / "u.data").write_text("".join(rating_lines), encoding="ascii")
    (root / "u.user").write_bytes("".join(user_lines).encode("latin-1"))
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation.movielens_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("raw_dir", help="directory for u.data, u.item, u.user")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--movies", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_ml100k(args.raw_dir, users=args.users, movies=args.movies, seed=args.seed)
    print(f"uirl: ml-100k layout ({args.users} users, {args.movies} movies) in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
