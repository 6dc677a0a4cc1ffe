"""Client-level central DP: the server clips each silo's update and adds Gaussian noise to the mean.

This is DP-FedAvg with fixed clipping (McMahan et al., 2018), the mechanism of Flower's
``DifferentialPrivacyServerSideFixedClipping``: each update ``Δ_k = w_k - w`` is scaled to L2 norm
at most ``C``; the new model is ``w + mean_k(Δ_k) + N(0, (σ C / m)^2 I)`` with ``m`` the expected
number of silos per round, and silos averaged with equal weights (so one silo moves the mean by at
most ``C / m``). The unit of privacy is a whole silo, and the server must be trusted to add the
noise. Each silo takes part in a round with probability ``q`` (Poisson), so the rounds are
``q``-subsampled Gaussian steps and Opacus's RDP accountant composes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from opacus.accountants import RDPAccountant

from uirl.privacy.accountant import RDP_ORDERS, plan_noise_multiplier

if TYPE_CHECKING:
    from uirl.config import Config


def clip_update(update: dict[str, np.ndarray], current: dict[str, np.ndarray], clip: float
                ) -> dict[str, np.ndarray]:
    """``current + Δ * min(1, clip / ||Δ||)`` with ``Δ = update - current`` over all arrays (L2)."""
    delta = {n: np.asarray(update[n], dtype=np.float64) - current[n] for n in update}
    norm = float(np.sqrt(sum(np.sum(d ** 2) for d in delta.values())))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {n: (current[n] + d * scale).astype(update[n].dtype) for n, d in delta.items()}


def central_dp_aggregate(current: dict[str, np.ndarray], updates: Sequence[dict[str, np.ndarray]], *,
                         clip: float, noise_multiplier: float, expected_silos: float,
                         rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Clipped updates summed, divided by the expected silo count, plus ``N(0, (σ C / m)^2)`` noise.

    Dividing by the fixed ``expected_silos`` (not the number that replied) keeps one silo's
    influence at ``C / m`` whatever the sample; with every silo in every round the two agree.
    """
    names = list(current) if not updates else list(updates[0])
    clipped = [clip_update(u, current, clip) for u in updates]
    std = noise_multiplier * clip / expected_silos
    out = {}
    for name in names:
        total = sum((c[name].astype(np.float64) - current[name] for c in clipped),
                    np.zeros_like(current[name], dtype=np.float64))
        noisy = current[name] + total / expected_silos + rng.normal(0.0, std, size=current[name].shape)
        out[name] = noisy.astype(current[name].dtype)
    return out


def central_epsilon(*, noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Client-level epsilon after ``rounds`` rounds (Opacus RDP accountant, uirl's RDP orders)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, rounds)]
    return float(acc.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))


def plan_central_noise(*, target_epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """Smallest noise multiplier that keeps ``rounds`` rounds within (target_epsilon, delta)."""
    return plan_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                 steps=rounds, accountant="rdp")


def central_noise(cfg: "Config") -> float:
    """The run's central-DP noise multiplier: ``central-noise``, or the smallest that keeps
    ``num-server-rounds`` rounds at sample rate ``fraction-train`` within ``target-epsilon``."""
    fed = cfg.federation
    if fed.central_noise is not None:
        return fed.central_noise
    return plan_central_noise(target_epsilon=cfg.privacy.target_epsilon, delta=cfg.privacy.target_delta,
                              sample_rate=fed.fraction_train, rounds=fed.num_rounds)
