"""Ranking metrics of one target among a user's candidates, and their average over users.

Everything is derived from the tie-aware rank ``r = 1 + #(scores > target) + 0.5 * #(scores ==
target, other candidates)``, so a model that gives every candidate the same score gets the
expected rank of a random order, (C + 1) / 2, instead of a flattering rank 1. With C candidates:

* ``auc = (C - r) / (C - 1)``: the fraction of negatives scored below the target (ties half);
  1 = target first, 0 = target last, 0.5 = chance.
* ``mrr = 1 / r``.
* ``ndcg@k = 1 / log2(r + 1)`` if ``r <= k`` else 0 (one relevant item, so the ideal DCG is 1). A
  fractional r (ties) gives the value at that fractional position.
* ``recall@k = 1`` if ``r <= k`` else 0 (a.k.a. hit rate).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def _scores(scores: object, target_index: int) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {arr.shape}")
    if arr.size < 2:
        raise ValueError(f"need at least 2 candidates, got {arr.size}")
    if not np.isfinite(arr).all():
        raise ValueError("scores must be finite")
    if isinstance(target_index, bool) or not isinstance(target_index, (int, np.integer)) \
            or not 0 <= target_index < arr.size:
        raise ValueError(f"target_index must be an integer in [0, {arr.size - 1}], got {target_index!r}")
    return arr


def rank_of_target(scores: Sequence[float] | np.ndarray, target_index: int = 0) -> float:
    """1-based rank of ``scores[target_index]`` among all scores; higher score = better rank; a tie
    with another candidate counts half. In [1, C]."""
    arr = _scores(scores, target_index)
    target = arr[target_index]
    greater = int((arr > target).sum())
    equal = int((arr == target).sum()) - 1  # not the target itself
    return 1.0 + greater + 0.5 * equal


def ranking_metrics(scores: Sequence[float] | np.ndarray, target_index: int = 0,
                    ks: Iterable[int] = (5, 10)) -> dict[str, float]:
    """``auc``, ``mrr``, ``ndcg@k`` and ``recall@k`` (for each k in ``ks``) of one user (see module)."""
    ks = tuple(ks)
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be integers >= 1, got {ks!r}")
    r = rank_of_target(scores, target_index)
    c = len(np.asarray(scores))
    out = {"auc": (c - r) / (c - 1), "mrr": 1.0 / r}
    for k in ks:
        out[f"ndcg@{k}"] = 1.0 / math.log2(r + 1.0) if r <= k else 0.0
        out[f"recall@{k}"] = 1.0 if r <= k else 0.0
    return out


def mean_metrics(per_user: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Average of per-user metric dicts (every user weighs the same). All dicts need the same keys."""
    rows = list(per_user)
    if not rows:
        raise ValueError("no per-user metrics to average")
    keys = list(rows[0])
    for i, row in enumerate(rows):
        if set(row) != set(keys):
            raise ValueError(f"per-user metrics {i} has keys {sorted(row)}, expected {sorted(keys)}")
    return {key: float(np.mean([row[key] for row in rows])) for key in keys}


#: Cut-offs of the full-catalogue metrics (``full/recall@k``, ``full/ndcg@k``).
FULL_KS = (10, 20)


def full_catalogue_metrics(scores: np.ndarray, target_index: int, excluded: np.ndarray | Sequence[int] = (),
                           ks: Iterable[int] = FULL_KS) -> dict[str, float]:
    """Metrics of one user's target ranked against the WHOLE catalogue, not a sampled list.

    ``scores`` (N,) scores every catalogue item; ``target_index`` is the test target's position;
    ``excluded`` are positions never ranked (the items the user touched before: their history),
    the target itself is never excluded. Rank ``r`` is computed as in :func:`rank_of_target` over
    the remaining items (ties count half). Returns ``full/recall@k`` (1 if r <= k) and
    ``full/ndcg@k`` (1/log2(r+1) if r <= k) for each k, and ``full/rank``.
    """
    arr = _scores(scores, target_index)
    keep = np.ones(arr.size, dtype=bool)
    excluded = np.asarray(excluded, dtype=np.int64)
    if excluded.size:
        if excluded.min() < 0 or excluded.max() >= arr.size:
            raise ValueError(f"excluded positions must lie in [0, {arr.size - 1}]")
        keep[excluded] = False
    keep[target_index] = True
    target = arr[target_index]
    others = arr[keep]
    r = 1.0 + float((others > target).sum()) + 0.5 * float((others == target).sum() - 1)
    out = {"full/rank": r}
    for k in ks:
        out[f"full/recall@{k}"] = 1.0 if r <= k else 0.0
        out[f"full/ndcg@{k}"] = 1.0 / math.log2(r + 1.0) if r <= k else 0.0
    return out
