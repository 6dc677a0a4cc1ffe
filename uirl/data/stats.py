"""Per-silo numbers of a converted dataset: what each silo would hold under a partitioning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from uirl.config import DataConfig
from uirl.data.convert import read_manifest


def silo_stats(directory: str | Path, data: DataConfig, *, num_silos: int, seed: int) -> list[dict]:
    """One dict per silo: users, evaluated users, items, events, history lengths (training items
    per evaluated user: min/median/max), candidates per test list, and the behaviour mix."""
    from uirl.data.partition import assign

    root = Path(directory)
    read_manifest(root, key="DIR")
    users = pq.read_table(root / "user_attributes.parquet").to_pandas()
    partitioning, by = data.partitioning, data.partition_by
    if partitioning == "auto":
        partitioning, by = ("natural", "silo") if "silo" in users.columns else ("iid", "")
    parts = assign(users, partitioning=partitioning, partition_by=by, alpha=data.dirichlet_alpha,
                   num_partitions=num_silos, seed=seed)
    silo_of = pd.Series(np.repeat(np.arange(num_silos), [len(p) for p in parts]),
                        index=[u for p in parts for u in p])
    events = pq.read_table(root / "events.parquet", columns=["user_id", "item_id", "behavior"]).to_pandas()
    events["silo"] = events["user_id"].map(silo_of).to_numpy()
    split = pq.read_table(root / "split.parquet", columns=["user_id", "train_items", "test_candidates"]).to_pandas()
    split["silo"] = split["user_id"].map(silo_of).to_numpy()
    split["history"] = split["train_items"].map(len)
    split["candidates"] = split["test_candidates"].map(len)
    rows = []
    for silo, part in enumerate(parts):
        ev = events[events["silo"] == silo]
        sp = split[split["silo"] == silo]
        mix = ev["behavior"].value_counts(normalize=True)
        hist = sp["history"].to_numpy()
        rows.append({"silo": silo, "users": len(part), "evaluated": len(sp), "items": ev["item_id"].nunique(),
                     "events": len(ev),
                     "history": f"{hist.min()}/{int(np.median(hist))}/{hist.max()}" if len(hist) else "-",
                     "candidates": f"{sp['candidates'].min()}-{sp['candidates'].max()}" if len(sp) else "-",
                     "behaviors": ", ".join(f"{b} {p:.0%}" for b, p in mix.items())})
    return rows
