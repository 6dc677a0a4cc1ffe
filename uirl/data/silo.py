"""One silo's view of the data: its own users (with fixed candidates), and the item catalogue.

In simulation every silo is a partition of one dataset; a node loads only its own partition. The
item catalogue (texts) is shared public knowledge -- the users' behaviour is what stays local.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

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


@functools.lru_cache(maxsize=4)
def _synthetic(spec: SyntheticSpec) -> SyntheticData:
    return generate(spec)


def synthetic_spec(data: DataConfig, *, num_silos: int, seed: int) -> SyntheticSpec:
    return SyntheticSpec(num_users=data.synthetic_users, num_items=data.synthetic_items,
                         num_silos=num_silos, silo_skew=data.silo_skew, seed=seed)


@functools.lru_cache(maxsize=8)
def load_silo(data: DataConfig, silo: SiloConfig, *, seed: int) -> Silo:
    """Load partition ``silo.partition_id`` of ``silo.num_partitions`` (cached per process)."""
    dataset = _synthetic(synthetic_spec(data, num_silos=silo.num_partitions, seed=seed))
    events = dataset.events[dataset.events["silo"] == str(silo.partition_id)]
    if events.empty:
        raise DataError("silo has no events", field="partition-id", value=silo.partition_id)
    users = tuple(attach_views(build_users(events, dataset.items, num_negatives=data.eval_negatives, seed=seed),
                               events))
    if not users:
        raise DataError("silo has no user with enough positive events", field="partition-id",
                        value=silo.partition_id)
    eval_users = users
    if data.eval_max_users and len(users) > data.eval_max_users:
        pick = np.random.default_rng([seed, silo.partition_id]).choice(len(users), data.eval_max_users, replace=False)
        eval_users = tuple(users[i] for i in sorted(pick))
    item_text = dict(zip(dataset.items["item_id"], dataset.items["text"]))
    return Silo(silo_id=silo.partition_id, item_text=item_text, users=users,
                touched=touched_items(events), eval_users=eval_users, **item_features(dataset.items))


def item_features(items) -> dict:
    """The optional item columns the interest model reads: ``category`` and ``image``."""
    out: dict = {}
    if "category" in items.columns:
        out["item_category"] = {i: c for i, c in zip(items["item_id"], items["category"]) if isinstance(c, str)}
    if "image" in items.columns:
        out["item_image"] = {i: tuple(float(x) for x in v) for i, v in zip(items["item_id"], items["image"])
                             if v is not None and not (isinstance(v, float) and v != v)}
    return out
