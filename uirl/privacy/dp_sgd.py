"""Privatising a step: per-user clipping + Gaussian noise with Opacus's DPOptimizer.

Gradients reach the wrapped optimizer as ``(sum_u clip(g_u) + N(0, (sigma*C)^2 I)) / E[B]``, the
standard DP-SGD average over the *expected* number of sampled users (Poisson sampling makes the
real count random, and dividing by it would leak it).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from opacus.optimizers import DPOptimizer


def secure_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS entropy pool. DP noise must never come from a seed written in
    a public config: whoever knows the seed could subtract the noise."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def secure_sampling_rng() -> np.random.Generator:
    """A generator for the Poisson sampling of users, seeded from the OS entropy pool: the
    amplification-by-sampling argument needs the sampled set to stay secret."""
    return np.random.default_rng(int.from_bytes(os.urandom(16), "little"))


def make_dp_optimizer(optimizer: torch.optim.Optimizer, *, noise_multiplier: float, clip_norm: float,
                      expected_batch_users: float, device: torch.device | str = "cpu") -> DPOptimizer:
    """Wrap ``optimizer``: each ``step()`` clips every user's gradient (``p.grad_sample``, one row per
    user, see :mod:`uirl.privacy.per_user`) to L2 norm ``clip_norm`` over all parameters jointly, sums,
    adds N(0, (noise_multiplier*clip_norm)^2) per coordinate, and divides by ``expected_batch_users``."""
    return DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                       expected_batch_size=expected_batch_users, loss_reduction="mean",
                       generator=secure_generator(device))
