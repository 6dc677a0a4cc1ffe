"""Server-side aggregation of silo updates, without Flower: validation and FedAvg.

The ServerApp's strategy (``server/strategy.py``) and the in-process federation
(:mod:`uirl.engine`) both call these, so a sweep run in one process validates and averages exactly
as ``flwr run`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class UpdateRejected(ValueError):
    pass


def check_update(update: dict[str, np.ndarray], current: dict[str, np.ndarray], trainable: set[str],
                 max_norm: float) -> None:
    """Raise :class:`UpdateRejected` naming the problem if ``update`` is not a sane adapter update."""
    if set(update) != trainable:
        extra, missing = sorted(set(update) - trainable), sorted(trainable - set(update))
        raise UpdateRejected(f"array names differ from the trainable set (extra {extra[:3]}, missing {missing[:3]})")
    total = 0.0
    for name, value in update.items():
        ref = current[name]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise UpdateRejected(f"{name}: {value.dtype}{list(value.shape)} != {ref.dtype}{list(ref.shape)}")
        if not np.isfinite(value).all():
            raise UpdateRejected(f"{name}: non-finite values")
        total += float(np.sum((value.astype(np.float64) - ref) ** 2))
    if total ** 0.5 > max_norm:
        raise UpdateRejected(f"update L2 norm {total ** 0.5:.3g} exceeds max-update-norm {max_norm:g}")


def fedavg(updates: Sequence[dict[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Weighted mean of the silos' arrays (weights = their ``num-examples``), as Flower's FedAvg."""
    if not updates or len(updates) != len(weights):
        raise ValueError("fedavg needs one weight per update and at least one update")
    total = float(sum(weights))
    return {name: sum(np.asarray(u[name], dtype=np.float64) * (w / total) for u, w in zip(updates, weights)
                  ).astype(updates[0][name].dtype)
            for name in updates[0]}
