"""Server-side aggregation of silo updates, without Flower: validation, bounds and combining rules.

The ServerApp's strategy (``server/strategy.py``) and the in-process federation
(:mod:`uirl.engine`) both call these, so a sweep run in one process validates and averages exactly
as ``flwr run`` does. Replies as a whole (metrics, identity, weights) are checked in
:mod:`uirl.replies`; this module knows only arrays.

Rules (run-config ``aggregation``):

- ``fedavg``: the mean weighted by each silo's (capped) user count, as Flower's FedAvg;
- ``median``: the coordinate-wise median, as Flower's FedMedian;
- ``trimmed-mean``: per coordinate, the mean after dropping the ``int(trim-fraction x k)`` largest
  and smallest of the ``k`` values, as Flower's FedTrimmedAvg (scipy's ``trim_mean``).

The two robust rules are unweighted on purpose: weights are what silos claim about themselves, and
a rule meant to survive one lying silo must not let it count more than once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from uirl.config import Config
from uirl.errors import RunFailed
from uirl.train import sampling_plan

RULES = ("fedavg", "median", "trimmed-mean")

#: ``torch.optim.Adam``'s default betas, the optimizer :func:`uirl.train.train_round` creates afresh
#: every round.
ADAM_BETAS = (0.9, 0.999)

#: Relative slack on the honest bound for float32 rounding of the parameters (never binding otherwise).
_ROUNDING = 1e-3


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
        raise UpdateRejected(f"update L2 norm {total ** 0.5:.3g} exceeds max-update-norm {max_norm:.3g}")


def require_finite(state: dict[str, np.ndarray]) -> None:
    """Raise :class:`~uirl.errors.RunFailed` if the global model has a non-finite value: such a
    model is never checkpointed or written as the run's result."""
    bad = sorted(name for name, value in state.items() if not np.isfinite(value).all())
    if bad:
        raise RunFailed(f"the global model has non-finite values in {len(bad)} array(s), e.g. {bad[0]}: "
                        "not writing it")


def _adam_step_reach(t: int) -> float:
    """The most step ``t`` of a fresh Adam can move one coordinate, in units of lr (epsilon = 0).

    The step is ``m_t / sqrt(v_t)`` (bias-corrected), a ratio of two weighted sums of the same
    gradients; Cauchy-Schwarz bounds it by ``sqrt(sum_i a_i^2 / b_i)`` with ``a_i``, ``b_i`` the
    weights of gradient ``i`` in ``m_t`` and ``v_t``. Step 1 moves at most 1; the bound grows with
    ``t`` towards about 7.3 (it stays below 1.03 for the first 7 steps).
    """
    b1, b2 = ADAM_BETAS
    ratio = b1 * b1 / b2
    total = (1 - ratio ** t) / (1 - ratio)
    return math.sqrt((1 - b1) ** 2 * (1 - b2 ** t) / ((1 - b1 ** t) ** 2 * (1 - b2)) * total)


def adam_reach(steps: int) -> float:
    """The most ``steps`` steps of a freshly created Adam can move one coordinate, in units of lr:
    the sum of the per-step bounds. Exact sum up to 10,000 steps, the limit per step after that."""
    exact = min(steps, 10_000)
    reach = sum(_adam_step_reach(t) for t in range(1, exact + 1))
    b1, b2 = ADAM_BETAS
    limit = math.sqrt((1 - b1) ** 2 / (1 - b2) / (1 - b1 * b1 / b2))
    return reach + (steps - exact) * limit


def honest_update_norm(cfg: Config, num_users: float, num_params: int) -> float:
    """The largest L2 change one round of an honest silo of ``num_users`` users can make to
    ``num_params`` trainable numbers: ``lr x adam_reach(T) x sqrt(num_params)``, with ``T`` the
    local steps of such a silo (:func:`uirl.train.sampling_plan`).

    Every local step is one Adam step with learning rate ``lr`` on every trainable number, whatever
    the gradients (DP noise and clipping only change the gradients), so no honest update can be
    longer. It holds with and without DP; it is a worst case, typical updates are far shorter.
    """
    _, steps = sampling_plan(max(1, int(num_users)), cfg)
    return cfg.train.lr * adam_reach(steps) * math.sqrt(num_params) * (1 + _ROUNDING)


def fedavg(updates: Sequence[dict[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Weighted mean of the silos' arrays (weights = their capped ``num-examples``), as Flower's FedAvg."""
    if not updates or len(updates) != len(weights):
        raise ValueError("fedavg needs one weight per update and at least one update")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"fedavg needs finite positive weights, not {list(weights)}")
    total = float(sum(weights))
    return {name: sum(np.asarray(u[name], dtype=np.float64) * (w / total) for u, w in zip(updates, weights)
                  ).astype(updates[0][name].dtype)
            for name in updates[0]}


def median(updates: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Coordinate-wise median of the silos' arrays (unweighted), as Flower's FedMedian."""
    if not updates:
        raise ValueError("median needs at least one update")
    return {name: np.median(np.stack([np.asarray(u[name], dtype=np.float64) for u in updates]), axis=0
                            ).astype(updates[0][name].dtype)
            for name in updates[0]}


def trimmed_mean(updates: Sequence[dict[str, np.ndarray]], fraction: float) -> dict[str, np.ndarray]:
    """Coordinate-wise mean after dropping the ``int(fraction x k)`` largest and smallest of the ``k``
    values (unweighted), as Flower's FedTrimmedAvg. With ``k < 1 / fraction`` nothing is dropped."""
    if not updates:
        raise ValueError("trimmed_mean needs at least one update")
    if not 0 <= fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), not {fraction}")
    cut = int(fraction * len(updates))
    out = {}
    for name in updates[0]:
        stacked = np.sort(np.stack([np.asarray(u[name], dtype=np.float64) for u in updates]), axis=0)
        out[name] = stacked[cut:len(updates) - cut].mean(axis=0).astype(updates[0][name].dtype)
    return out


def combine(rule: str, updates: Sequence[dict[str, np.ndarray]], weights: Sequence[float], *,
            trim_fraction: float) -> dict[str, np.ndarray]:
    """The new trainable arrays from validated updates by ``rule`` (one of :data:`RULES`)."""
    if rule == "fedavg":
        return fedavg(updates, weights)
    if rule == "median":
        return median(updates)
    if rule == "trimmed-mean":
        return trimmed_mean(updates, trim_fraction)
    raise ValueError(f"unknown aggregation rule {rule!r}; expected one of {', '.join(RULES)}")


def aggregate_bound(rule: str, bounds: Sequence[float]) -> float:
    """How far ``rule`` can move the model, given each combined update's own bound.

    A weighted mean stays within the largest bound. A coordinate-wise rule picks each coordinate
    between that coordinate's extremes, so it can combine the largest coordinates of different
    updates: its L2 change is at most ``sqrt(k)`` times the largest bound.
    """
    largest = max(bounds)
    return largest if rule == "fedavg" else largest * math.sqrt(len(bounds))


def combine_checked(rule: str, current: dict[str, np.ndarray], updates: Sequence[dict[str, np.ndarray]],
                    weights: Sequence[float], bounds: Sequence[float], *, trim_fraction: float
                    ) -> dict[str, np.ndarray]:
    """:func:`combine`, then the result checked like any update against ``current`` (the trainable
    arrays): finite, and no farther than :func:`aggregate_bound` allows. Raises :class:`UpdateRejected`."""
    new = combine(rule, updates, weights, trim_fraction=trim_fraction)
    check_update(new, current, set(current), aggregate_bound(rule, bounds))
    return new
