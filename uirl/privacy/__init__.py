"""User-level DP-SGD: per-user gradients, privatised steps, accounting. Three pieces, three files."""

from uirl.privacy.accountant import PrivacyError, PrivacyLedger, plan_noise_multiplier
from uirl.privacy.dp_sgd import make_dp_optimizer, secure_generator, secure_sampling_rng
from uirl.privacy.per_user import PerUserGradients

__all__ = ["PerUserGradients", "PrivacyError", "PrivacyLedger", "make_dp_optimizer",
           "plan_noise_multiplier", "secure_generator", "secure_sampling_rng"]
