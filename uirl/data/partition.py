"""Users -> silos: IID, natural (by a user column) or Dirichlet non-IID, with numpy and pandas only.

The assignment depends only on the users table (its rows in order), the partitioning settings
and the seed, so every silo computes the same assignment on its own and then loads only its own
users. Nothing here touches Flower or any dataset library.

- ``iid``: the users are permuted with ``numpy.random.default_rng(seed).permutation`` and cut
  into ``n = num_partitions`` contiguous shards of equal size, the first ``len % n`` shards one
  user larger (shard i starts at ``i * (len // n) + min(i, len % n)``).
- ``natural``: one silo per distinct value of ``partition_by``, silo i = the i-th value in sorted
  order; the federation must have exactly that many silos.
- ``dirichlet``: label skew. For each value of ``partition_by`` (default ``top_category``, the
  category a user interacts with most), in sorted order, that value's users are shuffled and cut
  into ``num_partitions`` pieces at the cumulative proportions p ~ Dirichlet(alpha, ..., alpha),
  piece i going to silo i: small alpha = very skewed silos. One generator seeded with ``seed``
  draws everything; if a silo ends up empty the whole draw is repeated (the generator going on),
  at most ``DIRICHLET_TRIES`` times.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from uirl.errors import ConfigError, DataError

PARTITIONINGS = ("auto", "iid", "natural", "dirichlet")
DEFAULT_DIRICHLET_BY = "top_category"
DIRICHLET_TRIES = 10


def _column(users: pd.DataFrame, by: str, partitioning: str) -> pd.Series:
    if by not in users.columns:
        choices = ", ".join(c for c in users.columns if c != "user_id") or "none"
        raise ConfigError(f"{partitioning} partitioning needs a user column; this dataset has: {choices}",
                          field="partition-by", value=by)
    return users[by].astype("string").fillna("unknown")


def _iid(ids: list[str], num_partitions: int, seed: int) -> list[list[str]]:
    order = np.random.default_rng(seed).permutation(len(ids))
    div, mod = divmod(len(ids), num_partitions)
    parts = []
    for i in range(num_partitions):
        start = div * i + min(i, mod)
        stop = start + div + (1 if i < mod else 0)
        parts.append([ids[j] for j in order[start:stop]])
    return parts


def _natural(ids: list[str], values: pd.Series, found: list[str]) -> list[list[str]]:
    silo_of = {value: i for i, value in enumerate(found)}
    parts: list[list[str]] = [[] for _ in found]
    for user, value in zip(ids, values.tolist(), strict=True):
        parts[silo_of[value]].append(user)
    return parts


def _dirichlet(ids: list[str], values: pd.Series, alpha: float, num_partitions: int,
               seed: int) -> list[list[str]] | None:
    """One silo list per silo, or None when every one of ``DIRICHLET_TRIES`` draws left a silo empty."""
    groups = pd.Series(np.arange(len(ids))).groupby(values.to_numpy(), sort=True)
    members = [group.to_numpy() for _, group in groups]
    rng = np.random.default_rng(seed)
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for rows in members:
            shuffled = rng.permutation(rows)
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(int)
            for i, piece in enumerate(np.split(shuffled, cuts)):
                parts[i].extend(piece.tolist())
        if all(parts):
            return [[ids[j] for j in part] for part in parts]
    return None


def assign(users: pd.DataFrame, *, partitioning: str, partition_by: str, alpha: float, num_partitions: int,
           seed: int) -> list[list[str]]:
    """User ids of each of ``num_partitions`` silos (each list sorted). ``users`` has ``user_id``
    and the attribute columns; ``partitioning`` is iid, natural or dirichlet."""
    if num_partitions < 1:
        raise ConfigError("expected an integer >= 1", field="num-partitions", value=num_partitions)
    ids = users["user_id"].astype(str).tolist()
    if partitioning == "iid":
        if num_partitions > len(ids):
            raise DataError(f"{len(ids)} users cannot fill {num_partitions} silos (an empty silo)",
                            field="num-partitions", value=num_partitions)
        parts = _iid(ids, num_partitions, seed)
    elif partitioning == "natural":
        by = partition_by or "silo"
        values = _column(users, by, partitioning)
        found = sorted(set(values))
        if len(found) != num_partitions:
            shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "")
            raise ConfigError(f"natural partitioning gives one silo per value: {len(found)} values ({shown}), "
                              f"but the federation has {num_partitions} silos (set num-supernodes={len(found)})",
                              field="partition-by", value=by)
        parts = _natural(ids, values, found)
    elif partitioning == "dirichlet":
        by = partition_by or DEFAULT_DIRICHLET_BY
        values = _column(users, by, partitioning)
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError("expected a finite number > 0", field="dirichlet-alpha", value=alpha)
        drawn = _dirichlet(ids, values, float(alpha), num_partitions, seed) if num_partitions <= len(ids) else None
        if drawn is None:
            raise DataError(f"{partitioning} partitioning left a silo empty ({len(ids)} users, {num_partitions} "
                            f"silos, {DIRICHLET_TRIES} draws); use fewer silos or a larger dirichlet-alpha",
                            field="num-partitions", value=num_partitions)
        parts = drawn
    else:
        raise ConfigError(f"expected one of {', '.join(PARTITIONINGS)}", field="partitioning", value=partitioning)
    parts = [sorted(part) for part in parts]
    for i, part in enumerate(parts):
        if not part:
            raise DataError(f"{partitioning} partitioning left silo {i} empty", field="partition-id", value=i)
    return parts
