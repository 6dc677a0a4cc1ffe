"""Users -> silos: IID, natural (by a user column) or Dirichlet non-IID, with flwr-datasets.

The partitioners of ``flwr_datasets`` run offline on a local ``datasets.Dataset`` with one row
per user (``p.dataset = ds; p.load_partition(i)``). The assignment depends only on the users
table, the partitioning settings and the seed, so every silo computes the same assignment on its
own and then loads only its own users. ``flwr_datasets`` (not Flower itself) is imported here
lazily, keeping ``import uirl`` light.

- ``iid``: users shuffled with the seed, then cut into equal contiguous shards (IidPartitioner).
- ``natural``: one silo per distinct value of ``partition_by`` (NaturalIdPartitioner), silo i =
  the i-th value in sorted order; the federation must have exactly that many silos.
- ``dirichlet``: each value of ``partition_by`` (default ``top_category``, the category a user
  interacts with most) is spread over silos with Dirichlet(alpha) proportions
  (DirichletPartitioner): small alpha = very skewed silos.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import pandas as pd

from uirl.errors import ConfigError, DataError

PARTITIONINGS = ("auto", "iid", "natural", "dirichlet")
DEFAULT_DIRICHLET_BY = "top_category"


def _column(users: pd.DataFrame, by: str, partitioning: str) -> pd.Series:
    if by not in users.columns:
        choices = ", ".join(c for c in users.columns if c != "user_id") or "none"
        raise ConfigError(f"{partitioning} partitioning needs a user column; this dataset has: {choices}",
                          field="partition-by", value=by)
    return users[by].astype("string").fillna("unknown")


def assign(users: pd.DataFrame, *, partitioning: str, partition_by: str, alpha: float, num_partitions: int,
           seed: int) -> list[list[str]]:
    """User ids of each of ``num_partitions`` silos (each list sorted). ``users`` has ``user_id``
    and the attribute columns; ``partitioning`` is iid, natural or dirichlet."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if num_partitions < 1:
        raise ConfigError("expected an integer >= 1", field="num-partitions", value=num_partitions)
    ids = users["user_id"].astype(str).tolist()
    if partitioning == "iid":
        if num_partitions > len(ids):
            raise DataError(f"{len(ids)} users cannot fill {num_partitions} silos (an empty silo)",
                            field="num-partitions", value=num_partitions)
        partitioner = IidPartitioner(num_partitions)
        partitioner.dataset = Dataset.from_dict({"user_id": ids}).shuffle(seed=seed)
    elif partitioning == "natural":
        by = partition_by or "silo"
        values = _column(users, by, partitioning)
        found = sorted(set(values))
        if len(found) != num_partitions:
            shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "")
            raise ConfigError(f"natural partitioning gives one silo per value: {len(found)} values ({shown}), "
                              f"but the federation has {num_partitions} silos (set num-supernodes={len(found)})",
                              field="partition-by", value=by)
        partitioner = NaturalIdPartitioner(partition_by=by)
        partitioner.dataset = Dataset.from_dict({"user_id": ids, by: values.tolist()})
    elif partitioning == "dirichlet":
        by = partition_by or DEFAULT_DIRICHLET_BY
        values = _column(users, by, partitioning)
        partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by=by, alpha=float(alpha),
                                           min_partition_size=1, self_balancing=False, shuffle=True, seed=seed)
        partitioner.dataset = Dataset.from_dict({"user_id": ids, by: values.tolist()})
    else:
        raise ConfigError(f"expected one of {', '.join(PARTITIONINGS)}", field="partitioning", value=partitioning)
    try:
        # Quiet: retry warnings (Dirichlet) and a progress bar (natural ids) are noise here.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            parts = [sorted(partitioner.load_partition(i)["user_id"]) for i in range(num_partitions)]
    except ValueError as exc:  # Dirichlet: some silo stayed empty in every retry
        raise DataError(f"{partitioning} partitioning left a silo empty ({exc}); use fewer silos or a larger "
                        f"dirichlet-alpha", field="num-partitions", value=num_partitions) from None
    for i, part in enumerate(parts):
        if not part:
            raise DataError(f"{partitioning} partitioning left silo {i} empty", field="partition-id", value=i)
    return parts

