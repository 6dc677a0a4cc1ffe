"""Item popularity as a private signal: per-silo item counts released with the Gaussian mechanism.

Each user of a silo contributes the vector x_u with 1/sqrt(n_u) on each of their n_u distinct
training items and 0 elsewhere, so ||x_u||_2 = 1: adding or removing one user (all of their
events) moves the silo's count vector by at most 1 in L2 norm. The silo releases
``sum_u x_u + N(0, sigma^2 I)`` once per run. That is the Gaussian mechanism with L2 sensitivity 1,
which in Opacus's RDP/PRV accountants is exactly one step of the sampled Gaussian mechanism with
sample rate 1 and noise multiplier sigma (clip norm 1): the release enters the silo's privacy
ledger as that one step, and its cost composes with the DP-SGD steps in the same accountant.

Budget split (``popularity-budget`` = share s): sigma is the smallest noise for which the release
ALONE costs at most s x target-epsilon; the DP-SGD noise is then planned for the rest of the run so
that the composition of both stays within the target. Composition in RDP is cheaper than adding
epsilons, so the release costs less than s x target of the final total.

The server sums the silos' noisy vectors and turns the sum into the prior each model scores with
(:func:`prior_from_counts`) -- post-processing, no further privacy cost. Most catalogue items have
true counts near zero, and Gaussian noise of a few units pushes many of them above moderately
popular items; the prior is therefore the empirical-Bayes posterior mean of ``log(1 + count)``
given the noisy count, with the distribution of true counts estimated from the released vector
itself (a nonparametric maximum-likelihood mixture on a grid, fitted by EM), which shrinks the
noise-made "hits" back towards zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from opacus.accountants import create_accountant

from uirl.privacy.accountant import PrivacyError, _epsilon_kwargs, plan_noise_multiplier


def user_normalised_counts(user_items: Sequence[Sequence[str]], item_index: Mapping[str, int]) -> np.ndarray:
    """(N,) sum over users of x_u (1/sqrt(n_u) on each of the user's distinct items in the index)."""
    counts = np.zeros(len(item_index), dtype=np.float64)
    for items in user_items:
        rows = sorted({item_index[i] for i in items if i in item_index})
        if rows:
            counts[rows] += 1.0 / math.sqrt(len(rows))
    return counts


def gaussian_release(counts: np.ndarray, *, noise_multiplier: float, rng: np.random.Generator) -> np.ndarray:
    """``counts + N(0, noise_multiplier^2)`` per item (sensitivity 1, so sigma = noise multiplier)."""
    return counts + rng.normal(0.0, noise_multiplier, size=counts.shape)


def prior_from_counts(counts: np.ndarray, noise_std: float = 0.0, *, iterations: int = 200) -> np.ndarray:
    """The score prior (float32): ``log(1 + max(count, 0))`` for exact counts (``noise_std`` 0),
    else E[log(1 + c) | noisy count] under N(c, noise_std^2) noise and a grid prior on c >= 0
    estimated from ``counts`` by EM (Kiefer-Wolfowitz NPMLE)."""
    y = np.asarray(counts, dtype=np.float64)
    if noise_std <= 0:
        return np.log1p(np.maximum(y, 0.0)).astype(np.float32)
    top = max(float(y.max()), 6.0 * noise_std, 1.0)
    grid = np.unique(np.concatenate([np.linspace(0.0, 3.0 * noise_std, 60), np.geomspace(0.1, top, 140)]))
    log_like = -0.5 * ((y[:, None] - grid[None, :]) / noise_std) ** 2
    like = np.exp(log_like - log_like.max(axis=1, keepdims=True))
    weights = np.full(len(grid), 1.0 / len(grid))
    for _ in range(iterations):
        post = like * weights
        post /= post.sum(axis=1, keepdims=True)
        weights = post.mean(axis=0)
    post = like * weights
    post /= post.sum(axis=1, keepdims=True)
    return (post @ np.log1p(grid)).astype(np.float32)


def release_noise(*, target_epsilon: float, target_delta: float, budget: float, accountant: str) -> float:
    """Noise multiplier of the release so that, alone, it costs at most ``budget * target_epsilon``."""
    return plan_noise_multiplier(target_epsilon=budget * target_epsilon, target_delta=target_delta,
                                 sample_rate=1.0, steps=1, accountant=accountant)


def composed_epsilon(history: Sequence[tuple[float, float, int]], *, delta: float, accountant: str) -> float:
    """Epsilon of a sequence of (noise multiplier, sample rate, steps) mechanisms, composed."""
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not acc.history:
        return 0.0
    if any(s == 0 for s, _, _ in acc.history):
        return math.inf
    return float(acc.get_epsilon(delta=delta, **_epsilon_kwargs(accountant)))


def plan_sgd_noise_after_release(*, release_noise_multiplier: float, target_epsilon: float, target_delta: float,
                                 sample_rate: float, steps: int, accountant: str, tolerance: float = 0.01) -> float:
    """Smallest DP-SGD noise multiplier (to ``tolerance`` in epsilon) such that the release followed
    by ``steps`` sampled Gaussian steps at ``sample_rate`` stays within the target."""
    release = (release_noise_multiplier, 1.0, 1)

    def eps(sigma: float) -> float:
        return composed_epsilon([release, (sigma, sample_rate, steps)], delta=target_delta, accountant=accountant)

    if composed_epsilon([release], delta=target_delta, accountant=accountant) >= target_epsilon:
        raise PrivacyError(f"the popularity release alone spends epsilon >= {target_epsilon}: lower popularity-budget")
    low, high = 0.0, 10.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise PrivacyError(f"cannot reach epsilon={target_epsilon} at delta={target_delta} over {steps} steps")
    while True:  # eps(high) <= target < eps(low)
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
        if target_epsilon - eps(high) < tolerance or high - low < 1e-4:
            return high
