"""Side data of each user for the richer interest model: behaviour labels, own texts, neighbours' items.

:func:`attach_views` fills the optional fields of :class:`~uirl.data.split.UserData` from the same
events table the split was built from. Everything here is the user's own record (their behaviours,
the texts they wrote), except ``social_items``: the items that the user's neighbours (a social
table ``user_id, other_user_id``) interacted with, as the silo sees them. That is other users'
data; see the README ("Social view and the privacy guarantee") for what it does to the guarantee.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from uirl.data.schema import positive_mask
from uirl.data.split import UserData

#: Behaviour-type labels of the multi-task head: the behaviours, with ratings as five buckets.
BEHAVIOR_LABELS: tuple[str, ...] = ("click", "like", "purchase", "review", "search", "share", "view",
                                    "rate-1", "rate-2", "rate-3", "rate-4", "rate-5")
_LABEL_INDEX = {name: k for k, name in enumerate(BEHAVIOR_LABELS)}

#: At most this many neighbour items per user (the most recent training items of each neighbour).
SOCIAL_ITEMS_PER_NEIGHBOR = 5
MAX_SOCIAL_ITEMS = 20


def behavior_label(behavior: str, value: float | None) -> str:
    """``"rate"`` with a value -> ``"rate-1"`` .. ``"rate-5"`` (rounded, clipped); others unchanged."""
    if behavior != "rate":
        return behavior
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "rate-3"
    return f"rate-{int(min(5, max(1, round(float(value)))))}"


def label_index(label: str) -> int:
    """Index into :data:`BEHAVIOR_LABELS`, or -1 for an unknown label (ignored by the loss)."""
    return _LABEL_INDEX.get(label, -1)


def attach_views(users: Sequence[UserData], events: pd.DataFrame, *, social: pd.DataFrame | None = None,
                 rating_threshold: float = 4.0) -> list[UserData]:
    """Users with ``behaviors``, ``texts``/``text_pos`` and (given ``social``) ``social_items`` filled.

    ``behaviors[j]`` labels the first positive event of ``train_items[j]``. A text written at an
    event gets ``text_pos`` = the number of the user's positive items (train, valid, test in
    order) at or before that event, so it may be used to predict the item at position p only
    when ``text_pos <= p`` (never the item it was written about, nor anything earlier).
    """
    frame = pd.DataFrame({"user_id": events["user_id"].to_numpy(dtype=object),
                          "item_id": events["item_id"].to_numpy(dtype=object),
                          "timestamp": events["timestamp"].to_numpy(dtype=np.int64),
                          "behavior": events["behavior"].to_numpy(dtype=object),
                          "value": (pd.to_numeric(events["value"], errors="coerce").to_numpy(dtype=np.float64)
                                    if "value" in events.columns else np.full(len(events), np.nan)),
                          "user_text": (events["user_text"].to_numpy(dtype=object) if "user_text" in events.columns
                                        else np.full(len(events), None, dtype=object)),
                          "positive": positive_mask(events, rating_threshold=rating_threshold).to_numpy(),
                          "order": np.arange(len(events))})
    frame = frame.sort_values(["user_id", "timestamp", "order"], kind="stable")
    wanted = {u.user_id: u for u in users}
    label_of: dict[str, dict[str, str]] = {}
    texts: dict[str, list[tuple[str, int]]] = {}
    for user, rows in frame[frame["user_id"].isin(list(wanted))].groupby("user_id", sort=False):
        seen: dict[str, str] = {}
        own: list[tuple[str, int]] = []
        for item, behavior, value, text, positive in zip(rows["item_id"], rows["behavior"], rows["value"],
                                                         rows["user_text"], rows["positive"]):
            if positive and item not in seen:
                seen[item] = behavior_label(str(behavior), float(value))
            if isinstance(text, str) and text.strip():
                own.append((text.strip(), len(seen)))
        label_of[user], texts[user] = seen, own
    neighbours: dict[str, list[str]] = {}
    if social is not None:
        for a, b in zip(social["user_id"].astype(str), social["other_user_id"].astype(str)):
            if a in wanted and b in wanted and a != b:
                neighbours.setdefault(a, []).append(b)
    out = []
    for u in users:
        labels = label_of.get(u.user_id, {})
        own = texts.get(u.user_id, [])
        social_items: list[str] = []
        for other in neighbours.get(u.user_id, []):
            social_items.extend(wanted[other].train_items[-SOCIAL_ITEMS_PER_NEIGHBOR:])
        out.append(dataclasses.replace(
            u, behaviors=tuple(labels.get(i, "") for i in u.train_items),
            texts=tuple(t for t, _ in own), text_pos=tuple(p for _, p in own),
            social_items=tuple(dict.fromkeys(social_items))[-MAX_SOCIAL_ITEMS:]))
    return out
