"""Benchmark: convert and load a MovieLens-25M-sized dataset; write time and peak memory to JSON.

``python -m simulation.bench_data --events 25000000 [--out bench_data.json]`` writes a dataset in
the exact ml-25m layout (``movies.csv``, ``ratings.csv``; ratings sorted by user, as GroupLens
ships them) with ``--events`` ratings, then runs, each in its own process so that its peak
memory (max RSS, from ``wait4``) is its own:

1. ``uirl data convert --format movielens`` (read + validate + fixed lists + Parquet);
2. loading one of 3 IID silos from the converted directory, as a client does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from simulation.bench.measure import run_child

_RATINGS = np.array(["0.5", "1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0", "4.5", "5.0"])
_RATING_P = np.array([0.016, 0.032, 0.016, 0.066, 0.05, 0.196, 0.132, 0.266, 0.085, 0.141])
_GENRES = ("Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
           "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
_STRIDE = 104_729  # a prime: user u's k-th movie (u * 7919 + k * stride) % movies never repeats for k < movies


def write_ml25m(root: Path, *, events: int, users: int, movies: int, seed: int = 0) -> None:
    """movies.csv + ratings.csv in ml-25m's format (header, quoting, 'x.0' ratings, seconds)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "movies.csv", "w", encoding="utf-8") as f:
        f.write("movieId,title,genres\n")
        for m in range(1, movies + 1):
            genres = "|".join(sorted(set(rng.choice(_GENRES, size=rng.integers(1, 4)).tolist())))
            f.write(f'{m},"Movie {m}, The ({1950 + m % 70})",{genres}\n' if m % 5 == 0 else
                    f"{m},Movie {m} ({1950 + m % 70}),{genres}\n")
    counts = rng.multinomial(events, np.full(users, 1.0 / users))
    counts = np.minimum(counts, movies)
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with open(root / "ratings.csv", "wb") as f:
        f.write(b"userId,movieId,rating,timestamp\n")
        start = 0
        while start < users:
            stop = min(users, start + 20_000)
            user = np.repeat(np.arange(start, stop), counts[start:stop])
            k = np.arange(len(user)) - np.repeat(np.cumsum(counts[start:stop]) - counts[start:stop], counts[start:stop])
            movie = (user * 7919 + k * _STRIDE) % movies + 1
            when = 1_000_000_000 + user * 1000 + k * 60 + rng.integers(0, 60, size=len(user))
            table = pa.table({"userId": pa.array(user + 1), "movieId": pa.array(movie),
                              "rating": pa.array(rng.choice(_RATINGS, size=len(user), p=_RATING_P / _RATING_P.sum())),
                              "timestamp": pa.array(when)})
            pacsv.write_csv(table, f, write_options=options)
            start = stop


def _measure(args: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, stdout) of one child process."""
    child = run_child(args, env={"OMP_NUM_THREADS": "1"})
    if child.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}")
    return child.seconds, child.peak_rss_mib, child.stdout


_LOAD = """
import json, sys
from uirl.config import SiloConfig, from_run_config
from uirl.data.silo import load_silo
silo = load_silo(from_run_config({"dataset": sys.argv[1], "partitioning": "iid"}).data,
                 SiloConfig(partition_id=0, num_partitions=3), seed=0)
print(json.dumps({"silo_users": len(silo.users), "silo_events": sum(len(t) for t in silo.touched.values())}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=0, help="default: events / 154 (ml-25m's ratio)")
    parser.add_argument("--movies", type=int, default=62_423, help="default: ml-25m's movie count")
    parser.add_argument("--out", default="bench_data.json")
    parser.add_argument("--workdir", default="", help="where to build the files (default: a temp dir, removed)")
    args = parser.parse_args()
    users = args.users or max(10, args.events // 154)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="uirl-bench-"))
    try:
        began = time.perf_counter()
        write_ml25m(work / "ml-25m", events=args.events, users=users, movies=args.movies)
        generated = time.perf_counter() - began
        size_mb = (work / "ml-25m" / "ratings.csv").stat().st_size / 2**20
        print(f"wrote {args.events:,} ratings of {users:,} users ({size_mb:.0f} MiB) in {generated:.0f} s", flush=True)
        convert_s, convert_rss, _ = _measure(["-m", "uirl.cli", "data", "convert", "--format", "movielens",
                                              str(work / "ml-25m"), str(work / "converted")])
        print(f"convert: {convert_s:.0f} s, peak RSS {convert_rss:.0f} MiB", flush=True)
        load_s, load_rss, out = _measure(["-c", _LOAD, str(work / "converted")])
        print(f"load silo 0 of 3: {load_s:.0f} s, peak RSS {load_rss:.0f} MiB", flush=True)
        manifest = json.loads((work / "converted" / "manifest.json").read_text())
        result = {"events": args.events, "users": users, "movies": args.movies, "ratings_csv_mib": round(size_mb, 1),
                  "convert_s": round(convert_s, 1), "convert_peak_rss_mib": round(convert_rss),
                  "load_silo_s": round(load_s, 1), "load_silo_peak_rss_mib": round(load_rss),
                  "evaluated_users": manifest["counts"]["evaluated-users"], **json.loads(out.strip().splitlines()[-1]),
                  "cpus": os.cpu_count()}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(result))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
