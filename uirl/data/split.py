"""The evaluation protocol: leave-last-out targets with fixed sampled candidates.

Per user, positive events (:func:`~uirl.data.schema.positive_mask`) in time order (ties keep file
order) with repeats of an item dropped (its first positive counts): the last one is the test
target, the one before it the validation target, the earlier ones the training items.

Candidates are the target at index 0 followed by N items the user never touched (any behaviour,
positive or not). They are drawn from a per-user generator seeded by ``(seed, crc32(user_id),
stream)``, so a user's lists are identical in every process and do not depend on which other users
are loaded (e.g. which silo); validation and test use different streams.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from uirl.atomic import atomic_file
from uirl.data.schema import positive_mask
from uirl.errors import DataError

_VALID_STREAM, _TEST_STREAM = 1, 2


@dataclass(frozen=True)
class UserData:
    """One user's evaluation data. Item ids are strings; ``*_candidates[0]`` is the target."""

    user_id: str
    train_items: tuple[str, ...]  # positive items in time order, before the validation target
    valid_target: str
    test_target: str
    valid_candidates: tuple[str, ...]
    test_candidates: tuple[str, ...]
    # Optional side data for the richer interest model (filled by :func:`uirl.data.views.attach_views`).
    behaviors: tuple[str, ...] = ()  # behaviour label of each train item (same length), or empty
    texts: tuple[str, ...] = ()  # the user's own written texts (reviews, queries), in time order
    text_pos: tuple[int, ...] = ()  # per text: how many of the user's positive items precede or share it
    social_items: tuple[str, ...] = ()  # items the user's neighbours interacted with (social view)

    def __post_init__(self) -> None:
        for name in ("train_items", "valid_candidates", "test_candidates", "behaviors", "texts", "text_pos",
                     "social_items"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists from JSON become tuples
        for target, cands, name in ((self.valid_target, self.valid_candidates, "valid_candidates"),
                                    (self.test_target, self.test_candidates, "test_candidates")):
            if len(cands) < 2 or cands[0] != target or len(set(cands)) != len(cands):
                raise ValueError(f"user {self.user_id!r}: {name} must be distinct ids, the target first, "
                                 f"and at least one negative")

    def valid_history(self, max_history: int) -> tuple[str, ...]:
        """The last ``max_history`` training items (what precedes the validation target)."""
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, not {max_history}")
        return self.train_items[-max_history:]

    def test_history(self, max_history: int) -> tuple[str, ...]:
        """The last ``max_history`` of training items + validation target (what precedes the test target)."""
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, not {max_history}")
        return (self.train_items + (self.valid_target,))[-max_history:]


def touched_items(events: pd.DataFrame) -> dict[str, frozenset]:
    """user id -> every item id the user has an event with (any behaviour): never a negative."""
    out: dict[str, set] = {}
    for user, item in zip(events["user_id"].tolist(), events["item_id"].tolist()):
        out.setdefault(user, set()).add(item)
    return {user: frozenset(items) for user, items in out.items()}


def _user_rng(seed: int, user_id: str, stream: int) -> np.random.Generator:
    # crc32, not hash(): str hashes are salted per process.
    return np.random.default_rng([int(seed), zlib.crc32(user_id.encode("utf-8")), stream])


def _negatives(pool: Sequence[str], exclude: Collection[str], n: int, rng: np.random.Generator,
               user_id: str) -> tuple[str, ...]:
    """n distinct ids of ``pool`` not in ``exclude``, uniformly at random (without replacement).

    Rejection sampling is exact here (each accepted id is uniform over the ids still allowed); when
    the user touched most of the pool it stops and picks from an explicit list of what is left.
    """
    chosen: list[str] = []
    taken: set[str] = set()
    for _ in range(8):
        for i in rng.integers(len(pool), size=2 * (n - len(chosen)) + 4):
            item = pool[int(i)]
            if item not in exclude and item not in taken:
                chosen.append(item)
                taken.add(item)
                if len(chosen) == n:
                    return tuple(chosen)
    left = [item for item in pool if item not in exclude and item not in taken]
    if len(left) < n - len(chosen):
        raise DataError(f"catalogue too small: {n} negatives needed but only {len(chosen) + len(left)} "
                        f"items were never touched by the user", field="user_id", value=user_id)
    chosen.extend(left[int(i)] for i in rng.choice(len(left), size=n - len(chosen), replace=False))
    return tuple(chosen)


def build_users(events: pd.DataFrame, items: pd.DataFrame, *, num_negatives: int, seed: int,
                rating_threshold: float = 4.0, min_positives: int = 4) -> list[UserData]:
    """Validated ``events``/``items`` -> one :class:`UserData` per user with >= ``min_positives``
    distinct positive items, sorted by user id (see the module docstring for the protocol)."""
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, not {num_negatives}")
    if min_positives < 3:
        raise ValueError(f"min_positives must be >= 3 (train, valid, test), not {min_positives}")
    pool = sorted(set(items["item_id"].tolist()))  # sorted: independent of the items file order
    touched = touched_items(events)
    frame = pd.DataFrame({"user_id": events["user_id"].to_numpy(dtype=object),
                          "item_id": events["item_id"].to_numpy(dtype=object),
                          "timestamp": events["timestamp"].to_numpy(dtype=np.int64),
                          "order": np.arange(len(events))})
    frame = frame[positive_mask(events, rating_threshold=rating_threshold).to_numpy()]
    frame = frame.sort_values(["user_id", "timestamp", "order"], kind="stable")  # order: file order on ties
    sequences: dict[str, dict[str, None]] = {}
    for user, item in zip(frame["user_id"].tolist(), frame["item_id"].tolist()):
        sequences.setdefault(user, {}).setdefault(item, None)  # dict keeps the first positive of an item
    users = []
    for user in sorted(sequences):
        positives = tuple(sequences[user])
        if len(positives) < min_positives:
            continue
        valid, test = positives[-2], positives[-1]
        valid_negs, test_negs = (
            _negatives(pool, touched[user], num_negatives, _user_rng(seed, user, stream), user)
            for stream in (_VALID_STREAM, _TEST_STREAM))
        users.append(UserData(user_id=user, train_items=positives[:-2], valid_target=valid, test_target=test,
                              valid_candidates=(valid,) + valid_negs, test_candidates=(test,) + test_negs))
    return users


def sample_training_example(user: UserData, *, max_history: int, num_negatives: int, rng: np.random.Generator,
                            all_item_ids: Sequence[str], touched: Collection[str]
                            ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """One training example from ``user.train_items`` (needs >= 2): target position t uniform in
    [1, len - 1], history = the up to ``max_history`` items before it, candidates = (target, N
    negatives drawn from ``all_item_ids`` that are not in ``touched``, the user's
    :func:`touched_items` set). The user's own train/valid/test items are excluded as well."""
    train = user.train_items
    if len(train) < 2:
        raise ValueError(f"user {user.user_id!r} needs >= 2 training items, has {len(train)}")
    if max_history < 1 or num_negatives < 1:
        raise ValueError("max_history and num_negatives must be >= 1")
    t = int(rng.integers(1, len(train)))
    own = set(train) | {user.valid_target, user.test_target}
    exclude = _Union(touched, own)
    pool = all_item_ids if isinstance(all_item_ids, (list, tuple)) else list(all_item_ids)
    return train[max(0, t - max_history):t], (train[t],) + _negatives(pool, exclude, num_negatives, rng,
                                                                      user.user_id)


class _Union:
    """Membership in either of two collections, without copying the (possibly large) first one."""

    def __init__(self, a: Collection[str], b: Collection[str]) -> None:
        self.a, self.b = a, b

    def __contains__(self, item: object) -> bool:
        return item in self.a or item in self.b


def save_candidates(users: Sequence[UserData], path: str | os.PathLike) -> None:
    """Write users as JSONL (one user per line), atomically: a temp file in the same directory is
    renamed over ``path``, so readers see the old file or the whole new one."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for user in users:
            f.write(json.dumps(asdict(user), ensure_ascii=False) + "\n")


_FIELDS = ("user_id", "train_items", "valid_target", "test_target", "valid_candidates", "test_candidates")
_OPTIONAL_FIELDS = ("behaviors", "texts", "text_pos", "social_items")


def load_candidates(path: str | os.PathLike) -> list[UserData]:
    """Read a :func:`save_candidates` file; DataError names the line (0-based row) and field."""
    users = []
    name = str(path)
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(f):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"expected a JSON object ({exc.msg})", file=name, row=row) from None
            if not isinstance(record, dict):
                raise DataError("expected a JSON object", file=name, row=row, value=record)
            for field in _FIELDS:
                value = record.get(field)
                is_list = field.endswith(("_items", "_candidates"))
                ok = (isinstance(value, list) and all(isinstance(v, str) for v in value)) if is_list \
                    else isinstance(value, str)
                if not ok:
                    raise DataError(f"expected {'a list of strings' if is_list else 'a string'}",
                                    file=name, row=row, field=field, value=value)
            optional = {k: record[k] for k in _OPTIONAL_FIELDS if k in record}
            try:
                users.append(UserData(**{k: record[k] for k in _FIELDS}, **optional))
            except ValueError as exc:
                raise DataError(str(exc), file=name, row=row) from None
    return users
