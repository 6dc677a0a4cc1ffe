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

Distributed noise (``popularity-noise-shares`` = k > 1, runs with ``secagg``). Each silo's own
release then carries only 1/sqrt(k) of the noise: the guarantee rests on the SUM, which is all the
server sees under secure aggregation. The sum of the k honest silos' shares has the planned noise,
so the planned (epsilon, delta) holds per silo provided (1) no one sees a single silo's release
(SecAgg+) and (2) at least k silos' releases are in the sum and those k add their share honestly
(colluding silos that reveal their noise remove it). With 3 silos and k = 3 the prior's noise is
sqrt(3) times smaller than with each silo noising its own release for the worst case.

Secure aggregation sums integers modulo 2^32, so this release is integer-valued and noised with
the *discrete* Gaussian (Canonne, Kamath & Steinke 2020; the distributed form is Kairouz, Liu &
Steinke 2021): each user contributes ``floor(scale / sqrt(n_u))`` to each of their n_u items
(L2 norm <= ``scale``: the sensitivity in integer units), each silo adds N_Z(0, (sigma x scale)^2 / k)
per item (:func:`discrete_gaussian`), and the sum goes through SecAgg+ exactly (no rounding of a
noised value: rounding each silo's noisy value is not a post-processing of the sum). The discrete
Gaussian's Renyi divergences are at most the continuous Gaussian's for integer shifts, and the sum
of k discrete Gaussian shares is within ``tau x d`` of one in every Renyi divergence
(:func:`sum_of_shares_excess`); the release is therefore accounted as one Gaussian step of noise
multiplier sigma, the same entry in the silo's ledger as the local release, after checking that
the excess is below 1e-12 (it is below 1e-100 for every setting the config accepts in practice).
Values travel in count units (the integers divided by ``scale``, a power of two: exact in float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from opacus.accountants import create_accountant

from uirl.privacy.accountant import PrivacyError, _epsilon_kwargs, plan_noise_multiplier


def _per_user_sum(user_items: Sequence[Sequence[str]], item_index: Mapping[str, int],
                  weight: Callable[[int], float | int], dtype: type) -> np.ndarray:
    """(N,) sum over users of ``weight(n_u)`` on each of the user's n_u distinct items in the index."""
    counts = np.zeros(len(item_index), dtype=dtype)
    for items in user_items:
        rows = sorted({item_index[i] for i in items if i in item_index})
        if rows:
            counts[rows] += weight(len(rows))
    return counts


def user_normalised_counts(user_items: Sequence[Sequence[str]], item_index: Mapping[str, int]) -> np.ndarray:
    """(N,) sum over users of x_u (1/sqrt(n_u) on each of the user's distinct items in the index)."""
    return _per_user_sum(user_items, item_index, lambda n: 1.0 / math.sqrt(n), np.float64)


def gaussian_release(counts: np.ndarray, *, noise_multiplier: float, rng: np.random.Generator) -> np.ndarray:
    """``counts + N(0, noise_multiplier^2)`` per item (sensitivity 1, so sigma = noise multiplier)."""
    return counts + rng.normal(0.0, noise_multiplier, size=counts.shape)


#: Integers travel through SecAgg+ exactly when they stay within +-2^21 (its quantization range 2^22
#: at one integer per level); the release scale leaves half of that for the noise.
SECAGG_INTEGER_RANGE = 2 ** 21
#: Largest excess over the Gaussian mechanism's Renyi divergence allowed for a sum of discrete shares.
MAX_SHARE_EXCESS = 1e-12


def release_scale(max_users: int) -> int:
    """The integer scale of a distributed release: the largest power of two with
    ``max_users x scale <= 2^20``, so a silo of up to ``max_users`` users (``secagg-max-users``)
    fits in half of SecAgg+'s exact integer range whatever its counts."""
    return 2 ** max(0, math.floor(math.log2(2 ** 20 / max_users)))


def integer_counts(user_items: Sequence[Sequence[str]], item_index: Mapping[str, int], scale: int) -> np.ndarray:
    """(N,) int64: the sum over users of ``floor(scale / sqrt(n_u))`` on each of the user's n_u distinct
    items in the index. One user's vector has L2 norm ``sqrt(n_u) x floor(scale / sqrt(n_u)) <= scale``."""
    return _per_user_sum(user_items, item_index, lambda n: math.floor(scale / math.sqrt(n)), np.int64)


def discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws (int64) of the discrete Gaussian N_Z(0, sigma^2): P(x) proportional to
    exp(-x^2 / (2 sigma^2)) on the integers. Canonne, Kamath & Steinke's rejection sampler: a
    discrete Laplace proposal of scale t = floor(sigma) + 1 (the difference of two geometric
    variables), accepted with probability exp(-(|x| - sigma^2/t)^2 / (2 sigma^2)). In floating
    point, as every other noise draw here (and Opacus's)."""
    if not sigma > 0:
        raise PrivacyError(f"discrete Gaussian sigma {sigma} must be > 0")
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)  # success probability of each geometric: 1 - exp(-1/t)
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while len(todo):
        x = rng.geometric(p, size=len(todo)) - rng.geometric(p, size=len(todo))
        accept = rng.random(len(todo)) < np.exp(-((np.abs(x) - sigma * sigma / t) ** 2) / (2 * sigma * sigma))
        out[todo[accept]] = x[accept]
        todo = todo[~accept]
    return out


def sum_of_shares_excess(share_sigma: float, shares: int, dimensions: int) -> float:
    """``tau x d``: how far, in every Renyi divergence, the sum of ``shares`` independent
    N_Z(0, share_sigma^2) per coordinate can be from the Gaussian mechanism of variance
    ``shares x share_sigma^2`` (Kairouz, Liu & Steinke 2021, Proposition 14:
    tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 share_sigma^2 k / (k + 1)), for share_sigma >= 1/2)."""
    if shares <= 1:
        return 0.0
    if share_sigma < 0.5:
        return math.inf
    tau = 10 * sum(math.exp(-2 * math.pi ** 2 * share_sigma ** 2 * k / (k + 1)) for k in range(1, shares))
    return tau * dimensions


def distributed_release(counts: np.ndarray, *, noise_multiplier: float, shares: int, scale: int,
                        rng: np.random.Generator) -> np.ndarray:
    """One silo's share of a distributed release, in count units: ``(counts + N_Z(0, (noise_multiplier
    x scale)^2 / shares)) / scale`` for the integer ``counts`` of :func:`integer_counts`. Raises
    :class:`PrivacyError` if the sum of ``shares`` such shares is not within :data:`MAX_SHARE_EXCESS`
    of the Gaussian mechanism the ledger records, or if a value would leave SecAgg+'s exact range."""
    share_sigma = noise_multiplier * scale / math.sqrt(shares)
    excess = sum_of_shares_excess(share_sigma, shares, len(counts))
    if excess > MAX_SHARE_EXCESS:
        raise PrivacyError(f"the popularity release's noise share (sigma {share_sigma:.3g} in integer units) is too "
                           f"small for {shares} shares to add up to a Gaussian mechanism (excess {excess:.2g}); "
                           "lower secagg-max-users or popularity-noise-shares")
    noisy = counts + discrete_gaussian(share_sigma, len(counts), rng)
    if np.abs(noisy).max(initial=0) > SECAGG_INTEGER_RANGE:
        raise PrivacyError(f"a popularity count of this silo is larger than {SECAGG_INTEGER_RANGE} at integer scale "
                           f"{scale}: the silo has more users than secagg-max-users; raise that key")
    return noisy.astype(np.float64) / scale


def prior_from_counts(counts: np.ndarray, noise_std: float = 0.0, *, known: np.ndarray | None = None,
                      iterations: int = 200) -> np.ndarray:
    """The score prior (float32): ``log(1 + known + max(count, 0))`` for exact counts (``noise_std``
    0), else E[log(1 + known + c) | noisy count] under N(c, noise_std^2) noise and a grid prior on
    c >= 0 estimated from ``counts`` by EM (Kiefer-Wolfowitz NPMLE). ``known`` (default 0) is a part
    of each item's count known exactly: a silo's own counts, when ``counts`` is the rest of the
    released sum (``local-prior``)."""
    y = np.asarray(counts, dtype=np.float64)
    add = np.zeros_like(y) if known is None else np.maximum(np.asarray(known, dtype=np.float64), 0.0)
    if add.shape != y.shape:
        raise ValueError(f"known has shape {add.shape}, counts {y.shape}")
    if noise_std <= 0:
        return np.log1p(add + np.maximum(y, 0.0)).astype(np.float32)
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
    if known is None:
        return (post @ np.log1p(grid)).astype(np.float32)
    return (post * np.log1p(add[:, None] + grid[None, :])).sum(axis=1).astype(np.float32)


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
