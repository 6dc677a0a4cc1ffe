"""``uirl data convert|split|stats``: turn published datasets into uirl's format and inspect silos."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from uirl.errors import ConfigError


def _options(args: argparse.Namespace):
    from uirl.data.convert import ConvertOptions

    if args.negatives < 1:
        raise ConfigError("expected an integer >= 1", field="--negatives", value=args.negatives)
    return ConvertOptions(positive_threshold=args.positive_threshold, negatives=args.negatives, seed=args.seed,
                          core=getattr(args, "core", 0),
                          skip_unknown_items=getattr(args, "skip_unknown_items", False))


def _print_counts(manifest: dict, where: str) -> None:
    c = manifest["counts"]
    behaviors = ", ".join(f"{k} {v:,}" for k, v in sorted(c["behaviors"].items()))
    print(f"{where}: {c['users']:,} users ({c['evaluated-users']:,} with fixed validation/test lists), "
          f"{c['items']:,} items, {c['events']:,} events ({behaviors})")


def _uirl_executable() -> str:
    """How to call ``uirl`` from here: this environment's executable, relative when below the
    working directory (``.venv/bin/uirl``)."""
    exe = Path(sys.executable).parent / "uirl"
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def _convert(args: argparse.Namespace) -> int:
    from uirl.data.convert import convert

    if args.core < 0:
        raise ConfigError("expected an integer >= 0", field="--core", value=args.core)
    manifest = convert(args.format, args.input_path, args.output_dir, _options(args),
                       say=lambda line: print(line, flush=True))
    _print_counts(manifest, args.output_dir)
    if "fixed-lists" in manifest:
        fixed = manifest["fixed-lists"]
        print(f"fixed lists from {fixed['file']}: {fixed['test']:,} test, {fixed['valid']:,} validation "
              f"(the other users' lists are sampled)")
    print(f"train on it: {_uirl_executable()} run --run-config \"dataset='{Path(args.output_dir).resolve()}'\"")
    return 0


def _split(args: argparse.Namespace) -> int:
    from uirl.data.convert import resplit

    _print_counts(resplit(args.dir, _options(args)), args.dir)
    return 0


def _stats(args: argparse.Namespace) -> int:
    from uirl.config import DataConfig
    from uirl.data.convert import read_manifest
    from uirl.data.stats import silo_stats

    if args.silos < 1:
        raise ConfigError("expected an integer >= 1 (the number of silos)", field="--silos", value=args.silos)
    manifest = read_manifest(Path(args.dir), key="DIR")
    data = DataConfig(dataset=args.dir, partitioning=args.partitioning, partition_by=args.partition_by,
                      dirichlet_alpha=args.dirichlet_alpha)
    rows = silo_stats(args.dir, data, num_silos=args.silos, seed=args.seed)
    _print_counts(manifest, args.dir)
    print(f"user columns for partition-by: {', '.join(manifest.get('user-columns', [])) or 'none'}")
    table = Table(title=f"{args.silos} silo(s), partitioning {args.partitioning}")
    for name in rows[0]:
        table.add_column(name, justify="left" if name == "behaviors" else "right")
    for row in rows:
        table.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()))
    Console(width=140).print(table)
    print("history = training items per evaluated user (min/median/max); candidates = test list length")
    return 0


def _split_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--negatives", type=int, default=19,
                        help="sampled negatives per validation/test list (default 19; MIND uses its impressions)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled negatives (default 0)")
    parser.add_argument("--positive-threshold", type=float, default=4.0,
                        help="a rating at or above this is a positive (default 4.0)")


def register(sub: argparse._SubParsersAction) -> None:
    from uirl.data.partition import PARTITIONINGS

    data = sub.add_parser("data", help="convert published datasets, fix evaluation lists, show silo stats")
    cmds = data.add_subparsers(dest="data_command", required=True)
    convert = cmds.add_parser("convert", help="publisher files -> a uirl dataset directory (Parquet)")
    convert.add_argument("--format", required=True, choices=("movielens", "amazon", "mind", "schema", "recbole"))
    convert.add_argument("input_path", help="the unzipped download (a directory, one Amazon review file, or one "
                                            "RecBole .inter file)")
    convert.add_argument("output_dir", help="a new directory for the converted dataset")
    _split_options(convert)
    convert.add_argument("--core", type=int, default=0,
                         help="k-core filter: drop users and items with fewer than k events, repeatedly (5 = 5-core)")
    convert.add_argument("--skip-unknown-items", action="store_true",
                         help="drop events of items missing from the catalogue instead of failing")
    convert.set_defaults(func=_convert)
    split = cmds.add_parser("split", help="recompute the fixed validation/test lists of a converted directory")
    split.add_argument("dir")
    _split_options(split)
    split.set_defaults(func=_split)
    stats = cmds.add_parser("stats", help="users/items/events, history lengths and behaviour mix per silo")
    stats.add_argument("dir")
    stats.add_argument("--silos", type=int, default=1, help="number of silos (default 1: the whole dataset)")
    stats.add_argument("--partitioning", default="auto", choices=PARTITIONINGS)
    stats.add_argument("--partition-by", default="", help="user column for natural/dirichlet partitioning")
    stats.add_argument("--dirichlet-alpha", type=float, default=0.5)
    stats.add_argument("--seed", type=int, default=0, help="the run's seed (it fixes the iid/dirichlet assignment)")
    stats.set_defaults(func=_stats)
