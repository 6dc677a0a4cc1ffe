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
from uirl.errors import DataError


@dataclass(frozen=True)
class Silo:
    silo_id: int
    item_text: dict[str, str]  # the whole catalogue: item id -> text
    users: tuple[UserData, ...]  # this silo's users, sorted by id, candidates fixed by seed
    touched: dict[str, frozenset]  # user id -> every item the user interacted with (for negatives)
    eval_users: tuple[UserData, ...]  # the users evaluated (all, or a fixed seeded subset)
    heldout: tuple[UserData, ...] = ()  # never trained on or evaluated: the membership audit's non-members


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
    users = tuple(build_users(events, dataset.items, num_negatives=data.eval_negatives, seed=seed))
    if not users:
        raise DataError("silo has no user with enough positive events", field="partition-id",
                        value=silo.partition_id)
    heldout: tuple[UserData, ...] = ()
    if data.holdout_users:
        out = np.random.default_rng([seed, silo.partition_id, 1]).random(len(users)) < data.holdout_users
        heldout = tuple(u for u, o in zip(users, out) if o)
        users = tuple(u for u, o in zip(users, out) if not o)
    eval_users = users
    if data.eval_max_users and len(users) > data.eval_max_users:
        pick = np.random.default_rng([seed, silo.partition_id]).choice(len(users), data.eval_max_users, replace=False)
        eval_users = tuple(users[i] for i in sorted(pick))
    item_text = dict(zip(dataset.items["item_id"], dataset.items["text"]))
    return Silo(silo_id=silo.partition_id, item_text=item_text, users=users,
                touched=touched_items(events), eval_users=eval_users, heldout=heldout)
