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
from uirl.data.views import attach_views
from uirl.errors import DataError


@dataclass(frozen=True)
class Silo:
    silo_id: int
    item_text: dict[str, str]  # the whole catalogue: item id -> text
    users: tuple[UserData, ...]  # this silo's users, sorted by id, candidates fixed by seed
    touched: dict[str, frozenset]  # user id -> every item the user interacted with (for negatives)
    eval_users: tuple[UserData, ...]  # the users evaluated (all, or a fixed seeded subset)
    item_category: dict[str, str] | None = None  # item id -> category (topic), where the items have one
    item_image: dict[str, tuple[float, ...]] | None = None  # item id -> image feature vector, where present
    heldout: tuple[UserData, ...] = ()  # never trained on or evaluated: the membership audit's non-members


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
            item_text: dict[str, str], seed: int, where: str, features: dict) -> Silo:
    if not users:
        raise DataError(f"silo has no user with enough positive events ({where})", field="partition-id",
                        value=silo.partition_id)
    heldout: tuple[UserData, ...] = ()
    if data.holdout_users:
        out = np.random.default_rng([seed, silo.partition_id, 1]).random(len(users)) < data.holdout_users
        heldout = tuple(u for u, o in zip(users, out) if o)
        users = tuple(u for u, o in zip(users, out) if not o)
    eval_users = tuple(users)
    if data.eval_max_users and len(users) > data.eval_max_users:
        pick = np.random.default_rng([seed, silo.partition_id]).choice(len(users), data.eval_max_users, replace=False)
        eval_users = tuple(users[i] for i in sorted(pick))
    return Silo(silo_id=silo.partition_id, item_text=item_text, users=tuple(users), touched=touched,
                eval_users=eval_users, heldout=heldout, **features)


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
    users = attach_views(build_users(events, dataset.items, num_negatives=data.eval_negatives, seed=seed), events)
    item_text = dict(zip(dataset.items["item_id"], dataset.items["text"]))
    return _finish(silo, data, users, touched_items(events), item_text, seed, "synthetic",
                   item_features(dataset.items))


def _converted_silo(data: DataConfig, silo: SiloConfig, seed: int, *, root: Path, own_directory: bool) -> Silo:
    from uirl.data.convert import read_manifest
    from uirl.data.fixed_split import read_split

    manifest = read_manifest(root, key="data-path" if own_directory else "dataset")
    users = pq.read_table(root / "user_attributes.parquet").to_pandas()
    mine = list(users["user_id"]) if own_directory else _silo_users(users, data, silo, seed)
    split = read_split(root / "split.parquet", mine)
    where = f"{len(mine)} users in {root}, none of them evaluable"
    if not split:
        return _finish(silo, data, split, {}, {}, seed, where, {})
    ids = [u.user_id for u in split]
    events = pq.read_table(root / "events.parquet", filters=[("user_id", "in", ids)]).to_pandas()
    social = None
    if (root / "social.parquet").is_file():
        social = pq.read_table(root / "social.parquet", filters=[("user_id", "in", ids)]).to_pandas()
    threshold = float(manifest.get("options", {}).get("positive_threshold", 4.0))
    split = attach_views(split, events, social=social, rating_threshold=threshold)
    items = pq.read_table(root / "items.parquet").to_pandas()
    item_text = dict(zip(items["item_id"], items["text"]))
    return _finish(silo, data, split, touched_items(events), item_text, seed, where, item_features(items))


@functools.lru_cache(maxsize=256)  # an in-process simulation of many silos holds each one's data once
def load_silo(data: DataConfig, silo: SiloConfig, *, seed: int) -> Silo:
    """Load partition ``silo.partition_id`` of ``silo.num_partitions`` (cached per process).

    A node that names its own converted directory (node config ``data-path``: a deployed silo with
    only its own users on disk) holds every user in it; no partitioning is applied."""
    if silo.data_path:
        return _converted_silo(data, silo, seed, root=Path(silo.data_path), own_directory=True)
    if data.dataset == "synthetic":
        return _synthetic_silo(data, silo, seed)
    return _converted_silo(data, silo, seed, root=Path(data.dataset), own_directory=False)


def item_features(items) -> dict:
    """The optional item columns the interest model reads: ``category`` and ``image``."""
    out: dict = {}
    if "category" in items.columns:
        out["item_category"] = {i: c for i, c in zip(items["item_id"], items["category"]) if isinstance(c, str)}
    if "image" in items.columns:
        out["item_image"] = {i: tuple(float(x) for x in v) for i, v in zip(items["item_id"], items["image"])
                             if v is not None and not (isinstance(v, float) and v != v)}
    return out
