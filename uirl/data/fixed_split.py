"""The evaluation protocol at dataset scale: fixed targets and candidate lists, as an Arrow table.

The same protocol as :func:`uirl.data.split.build_users` (and, for the same events, the very same
lists: same positives, same per-user generators, same catalogue order), computed on integer codes
so that tens of millions of events fit in a few GB. Datasets that ship their own candidate lists
(MIND impressions) use :func:`impression_split` instead.

The table (``split.parquet``) has one row per evaluated user: ``user_id``, ``train_items``,
``valid_target``, ``test_target``, ``valid_candidates``, ``test_candidates`` (lists of item ids;
candidates start with the target). Every method reads these lists, so all see the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uirl.data.schema import POSITIVE_BEHAVIORS
from uirl.data.split import _TEST_STREAM, _VALID_STREAM, UserData, _negatives, _user_rng

SPLIT_COLUMNS = ("user_id", "train_items", "valid_target", "test_target", "valid_candidates", "test_candidates")


def positive_events(events: pa.Table, threshold: float) -> np.ndarray:
    """Boolean mask of positive events (:func:`uirl.data.schema.positive_mask`, in Arrow)."""
    behavior = events["behavior"]
    positive = pc.is_in(behavior, value_set=pa.array(sorted(POSITIVE_BEHAVIORS)))
    if "value" in events.column_names:
        high = pc.fill_null(pc.greater_equal(events["value"], threshold), False)
        positive = pc.and_(positive, pc.or_(pc.not_equal(behavior, "rate"), high))
    else:
        positive = pc.and_(positive, pc.not_equal(behavior, "rate"))
    return positive.to_numpy(zero_copy_only=False).astype(bool)


def user_codes(events: pa.Table) -> tuple[np.ndarray, list[str]]:
    """(code per event, user ids) with codes numbered in sorted user-id order."""
    encoded = pc.dictionary_encode(events["user_id"]).combine_chunks()
    names = encoded.dictionary.to_pylist()
    order = np.argsort(np.array(names, dtype=object), kind="stable")
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = np.arange(len(names))
    return rank[encoded.indices.to_numpy()], [names[i] for i in order]


def _table(user_ids: list[str], pool: pa.Array, rows: dict[str, list]) -> pa.Table:
    def lists(parts: list[np.ndarray]) -> pa.Array:
        offsets = np.zeros(len(parts) + 1, dtype=np.int32)
        offsets[1:] = np.cumsum([len(p) for p in parts])
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return pa.ListArray.from_arrays(pa.array(offsets), pool.take(pa.array(flat, pa.int64())))

    return pa.table({"user_id": pa.array(user_ids, pa.string()), "train_items": lists(rows["train"]),
                     "valid_target": pool.take(pa.array(rows["valid"], pa.int64())),
                     "test_target": pool.take(pa.array(rows["test"], pa.int64())),
                     "valid_candidates": lists(rows["valid_c"]), "test_candidates": lists(rows["test_c"])})


def _order(events: pa.Table, pool: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Per event: user code, item code (index in ``pool``), in user / time / file order."""
    users, names = user_codes(events)
    items = pc.index_in(events["item_id"], value_set=pa.array(pool, pa.string())).to_numpy(zero_copy_only=False)
    stamps = events["timestamp"].to_numpy()
    order = np.lexsort((np.arange(len(users)), stamps, users))
    return order, users, items.astype(np.int64), names


def standard_split(events: pa.Table, pool: Sequence[str], *, threshold: float, num_negatives: int, seed: int,
                   min_positives: int = 4) -> pa.Table:
    """Leave-last-out lists for every user with >= ``min_positives`` distinct positive items.

    ``pool``: every item id, sorted (the catalogue negatives are drawn from)."""
    order, users, items, names = _order(events, pool)
    positive = positive_events(events, threshold)[order]
    users, items = users[order], items[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    index = range(len(pool))
    out_users, rows = [], {"train": [], "valid": [], "test": [], "valid_c": [], "test_c": []}
    for s, e in zip(starts, ends):
        own = items[s:e]
        pos = own[positive[s:e]]
        if len(pos) < min_positives:
            continue
        _, first = np.unique(pos, return_index=True)
        seq = pos[np.sort(first)]
        if len(seq) < min_positives:
            continue
        user = names[users[s]]
        touched = set(own.tolist())
        valid_negs, test_negs = (np.array(_negatives(index, touched, num_negatives, _user_rng(seed, user, stream),
                                                     user), dtype=np.int64)
                                 for stream in (_VALID_STREAM, _TEST_STREAM))
        out_users.append(user)
        rows["train"].append(seq[:-2])
        rows["valid"].append(int(seq[-2]))
        rows["test"].append(int(seq[-1]))
        rows["valid_c"].append(np.r_[seq[-2], valid_negs])
        rows["test_c"].append(np.r_[seq[-1], test_negs])
    return _table(out_users, pa.array(pool, pa.string()), rows)


def impression_split(events: pa.Table, impressions: pa.Table, pool: Sequence[str], *, threshold: float,
                     num_negatives: int, seed: int, min_train: int = 2) -> pa.Table:
    """Lists from the dataset's own impressions (MIND benchmark style).

    Per user, impressions with at least one click and one shown-not-clicked news are eligible.
    Test: the last eligible impression; target = its first clicked news, negatives = its news
    shown but not clicked. Validation: the eligible impression before it, or, if there is none,
    the last positive before the test impression with ``num_negatives`` sampled negatives (seeded
    as in the standard protocol). Training items: distinct positives before the validation
    target, which must number at least ``min_train``.
    """
    order, users, items, names = _order(events, pool)
    positive = positive_events(events, threshold)[order]
    users, items, stamps = users[order], items[order], events["timestamp"].to_numpy()[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    lookup = {name: i for i, name in enumerate(pool)}
    shown: dict[str, dict[int, list]] = {}
    for user, imp, when, item, clicked in zip(*(impressions[c].to_pylist() for c in
                                                 ("user_id", "impression", "timestamp", "item_id", "clicked"))):
        shown.setdefault(user, {}).setdefault(imp, [when, [], []])[1 if clicked else 2].append(lookup[item])
    index = range(len(pool))
    out_users, rows = [], {"train": [], "valid": [], "test": [], "valid_c": [], "test_c": []}
    for s, e in zip(starts, ends):
        user = names[users[s]]
        eligible = sorted((when, imp, clicks, negs) for imp, (when, clicks, negs) in shown.get(user, {}).items()
                          if clicks and negs)
        if not eligible:
            continue
        pos_items, pos_times = items[s:e][positive[s:e]], stamps[s:e][positive[s:e]]

        def pick(impression) -> tuple[int, int, np.ndarray]:
            when, _, clicks, negs = impression
            target = clicks[0]
            return when, target, np.array([target] + [n for n in dict.fromkeys(negs) if n != target], np.int64)

        test_time, test, test_c = pick(eligible[-1])
        if len(eligible) >= 2:
            valid_time, valid, valid_c = pick(eligible[-2])
            before = pos_items[pos_times < valid_time]
        else:
            earlier = [i for i in dict.fromkeys(pos_items[pos_times < test_time].tolist()) if i != test]
            if not earlier:
                continue
            valid = earlier[-1]
            negs = _negatives(index, set(items[s:e].tolist()), num_negatives, _user_rng(seed, user, _VALID_STREAM),
                              user)
            valid_c = np.array([valid, *negs], np.int64)
            before = np.array(earlier[:-1], np.int64)
        train = np.array([i for i in dict.fromkeys(before.tolist()) if i not in (valid, test)], np.int64)
        if len(train) < min_train or len(test_c) < 2 or len(valid_c) < 2:
            continue
        out_users.append(user)
        for key, value in (("train", train), ("valid", valid), ("test", test), ("valid_c", valid_c),
                           ("test_c", test_c)):
            rows[key].append(value)
    return _table(out_users, pa.array(pool, pa.string()), rows)


def read_split(path: Path, user_ids: Sequence[str] | None = None) -> list[UserData]:
    """The fixed lists of ``user_ids`` (all users if None), sorted by user id."""
    if user_ids is not None and not user_ids:
        return []
    filters = None if user_ids is None else [("user_id", "in", list(user_ids))]
    table = pq.read_table(path, columns=list(SPLIT_COLUMNS), filters=filters).sort_by("user_id")
    columns = [table[c].to_pylist() for c in SPLIT_COLUMNS]
    return [UserData(**dict(zip(SPLIT_COLUMNS, row))) for row in zip(*columns)]
