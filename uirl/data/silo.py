"""One silo's view of the data: its own users (with fixed candidates), and the item catalogue.

In simulation every silo is a partition of one dataset; a node loads only its own partition. The
item catalogue (texts) is shared public knowledge -- the users' behaviour is what stays local.

``dataset`` is ``synthetic`` (generated in-process) or a directory written by ``uirl data
convert``. Users are assigned to silos by :mod:`uirl.data.partition`; with ``partitioning=auto``
a dataset that has its own silos keeps them (the synthetic generator's skewed silos, a ``silo``
column) and any other is split IID. From a converted directory a silo reads only its own users'
rows (Arrow filters on ``user_id``) and their fixed lists from ``split.parquet``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from uirl.config import DataConfig, SiloConfig
from uirl.data.split import UserData, build_users, touched_items
from uirl.data.synthetic import SyntheticData, SyntheticSpec, generate
from uirl.errors import DataError


@dataclass(frozen=True)
class Silo:
    silo_id: int
    item_text: dict[str, str]  # the whole catalogue: item id -> text
    users: tuple[UserData, ...]  # this silo's users, sorted by id, candidates fixed by seed
    touched: dict[str, frozenset]  # user id -> every item the user interacted with (for negatives)
    eval_users: tuple[UserData, ...]  # the users evaluated (all, or a fixed seeded subset)


@functools.lru_cache(maxsize=4)
def _synthetic(spec: SyntheticSpec) -> SyntheticData:
    return generate(spec)


def synthetic_spec(data: DataConfig, *, num_silos: int, seed: int) -> SyntheticSpec:
    return SyntheticSpec(num_users=data.synthetic_users, num_items=data.synthetic_items,
                         num_silos=num_silos, silo_skew=data.silo_skew, seed=seed)


def _silo_users(users: pd.DataFrame, data: DataConfig, silo: SiloConfig, seed: int) -> list[str]:
    """User ids of this silo under the configured partitioning (``auto``: own silos, else IID)."""
    from uirl.data.partition import assign

    partitioning, by = data.partitioning, data.partition_by
    if partitioning == "auto":
        partitioning, by = ("natural", "silo") if "silo" in users.columns else ("iid", "")
    parts = assign(users, partitioning=partitioning, partition_by=by, alpha=data.dirichlet_alpha,
                   num_partitions=silo.num_partitions, seed=seed)
    return parts[silo.partition_id]


def _finish(silo: SiloConfig, data: DataConfig, users: list[UserData], touched: dict[str, frozenset],
            item_text: dict[str, str], seed: int, where: str) -> Silo:
    if not users:
        raise DataError(f"silo has no user with enough positive events ({where})", field="partition-id",
                        value=silo.partition_id)
    eval_users = tuple(users)
    if data.eval_max_users and len(users) > data.eval_max_users:
        pick = np.random.default_rng([seed, silo.partition_id]).choice(len(users), data.eval_max_users, replace=False)
        eval_users = tuple(users[i] for i in sorted(pick))
    return Silo(silo_id=silo.partition_id, item_text=item_text, users=tuple(users), touched=touched,
                eval_users=eval_users)


def _synthetic_silo(data: DataConfig, silo: SiloConfig, seed: int) -> Silo:
    dataset = _synthetic(synthetic_spec(data, num_silos=silo.num_partitions, seed=seed))
    if data.partitioning == "auto":  # the generator's own (skewed) silos
        events = dataset.events[dataset.events["silo"] == str(silo.partition_id)]
    else:
        category = dict(zip(dataset.items["item_id"], dataset.items["category"]))
        frame = dataset.events.assign(category=dataset.events["item_id"].map(category))
        users = frame.groupby("user_id").agg(silo=("silo", "first"),
                                             top_category=("category", lambda c: c.value_counts().index[0]))
        mine = _silo_users(users.reset_index(), data, silo, seed)
        events = dataset.events[dataset.events["user_id"].isin(set(mine))]
    if events.empty:
        raise DataError("silo has no events", field="partition-id", value=silo.partition_id)
    users = build_users(events, dataset.items, num_negatives=data.eval_negatives, seed=seed)
    item_text = dict(zip(dataset.items["item_id"], dataset.items["text"]))
    return _finish(silo, data, users, touched_items(events), item_text, seed, "synthetic")


def _converted_silo(data: DataConfig, silo: SiloConfig, seed: int, *, root: Path, own_directory: bool) -> Silo:
    from uirl.data.convert import read_manifest
    from uirl.data.fixed_split import read_split

    read_manifest(root, key="data-path" if own_directory else "dataset")
    users = pq.read_table(root / "user_attributes.parquet").to_pandas()
    mine = list(users["user_id"]) if own_directory else _silo_users(users, data, silo, seed)
    split = read_split(root / "split.parquet", mine)
    where = f"{len(mine)} users in {root}, none of them evaluable"
    if not split:
        return _finish(silo, data, split, {}, {}, seed, where)
    events = pq.read_table(root / "events.parquet", columns=["user_id", "item_id"],
                           filters=[("user_id", "in", [u.user_id for u in split])])
    touched: dict[str, set] = {}
    for user, item in zip(events["user_id"].to_pylist(), events["item_id"].to_pylist()):
        touched.setdefault(user, set()).add(item)
    items = pq.read_table(root / "items.parquet", columns=["item_id", "text"])
    item_text = dict(zip(items["item_id"].to_pylist(), items["text"].to_pylist()))
    return _finish(silo, data, split, {u: frozenset(s) for u, s in touched.items()}, item_text, seed, where)


@functools.lru_cache(maxsize=8)
def load_silo(data: DataConfig, silo: SiloConfig, *, seed: int) -> Silo:
    """Load partition ``silo.partition_id`` of ``silo.num_partitions`` (cached per process).

    A node that names its own converted directory (node config ``data-path``: a deployed silo with
    only its own users on disk) holds every user in it; no partitioning is applied."""
    if silo.data_path:
        return _converted_silo(data, silo, seed, root=Path(silo.data_path), own_directory=True)
    if data.dataset == "synthetic":
        return _synthetic_silo(data, silo, seed)
    return _converted_silo(data, silo, seed, root=Path(data.dataset), own_directory=False)
