"""Distributed noise for the popularity release (``popularity-noise-shares`` > 1).

Each silo adds 1/sqrt(k) of the planned noise as a discrete Gaussian on integer counts, and only
the sum is seen (SecAgg+). What must hold: one user moves a silo's integer counts by at most the
scale in L2; the sampler draws the discrete Gaussian; the sum of k shares carries the planned noise;
the ledger records the Gaussian mechanism of the sum (the same epsilon as a silo's own release at
that noise), and the config refuses the combinations in which a share could be seen alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from helpers import tiny_config
from test_cached_path import CACHED, _gaussian_epsilon
from uirl.config import SiloConfig
from uirl.engine import run_federated
from uirl.errors import ConfigError, RunFailed
from uirl.federated import local_release
from uirl.privacy import PrivacyError, PrivacyLedger
from uirl.privacy.popularity import (SECAGG_INTEGER_RANGE, discrete_gaussian, distributed_release, integer_counts,
                                     release_scale, sum_of_shares_excess)

DISTRIBUTED = {**CACHED, "secagg": True, "min-nodes": 3, "popularity-noise-shares": 3}


def test_integer_counts_bound_one_users_influence_by_the_scale():
    index = {f"i{k}": k for k in range(6)}
    users = [["i0", "i1", "i1", "i2", "i3"], ["i0"], ["i5", "i9"], ["i1", "i2", "i4"]]  # i9: not in the catalogue
    counts = integer_counts(users, index, 1024)
    # floor(1024 / sqrt(4)) = 512, floor(1024 / sqrt(1)) = 1024, floor(1024 / sqrt(3)) = 591
    np.testing.assert_array_equal(counts, [512 + 1024, 512 + 591, 512 + 591, 512, 591, 1024])
    assert counts.dtype == np.int64
    for k in range(len(users)):
        without = integer_counts(users[:k] + users[k + 1:], index, 1024)
        assert np.linalg.norm(counts - without) <= 1024


def test_release_scale_fits_the_largest_silo_in_half_of_secaggs_range():
    assert release_scale(1000) == 1024 and release_scale(1024) == 1024 and release_scale(1025) == 512
    assert release_scale(2 ** 21) == 1
    for users in (1, 7, 1000, 5000, 2 ** 20):
        assert users * release_scale(users) <= SECAGG_INTEGER_RANGE // 2


@pytest.mark.parametrize("sigma", [0.7, 2.5, 40.0])
def test_discrete_gaussian_draws_the_discrete_gaussian(sigma):
    rng = np.random.default_rng(0)
    draws = discrete_gaussian(sigma, 200_000, rng)
    assert draws.dtype == np.int64
    support = np.arange(-int(12 * sigma) - 2, int(12 * sigma) + 3)
    pmf = np.exp(-support.astype(float) ** 2 / (2 * sigma ** 2))
    pmf /= pmf.sum()
    empirical = np.bincount(draws - support[0], minlength=len(support))[:len(support)] / len(draws)
    assert np.abs(draws).max() < support[-1]
    assert np.abs(np.cumsum(empirical) - np.cumsum(pmf)).max() < 0.005  # Kolmogorov-Smirnov distance
    assert draws.var() == pytest.approx(float((pmf * support ** 2).sum()), rel=0.02)
    assert abs(draws.mean()) < 5 * sigma / math.sqrt(len(draws)) + 1e-9
    with pytest.raises(PrivacyError):
        discrete_gaussian(0.0, 3, rng)


def test_sum_of_shares_excess_is_kairouz_liu_steinkes_tau_times_d():
    assert sum_of_shares_excess(1.0, 1, 100) == 0.0  # one share is a discrete Gaussian itself
    assert sum_of_shares_excess(1.0, 2, 100) == pytest.approx(100 * 10 * math.exp(-math.pi ** 2))
    three = 10 * (math.exp(-2 * math.pi ** 2 * 0.8 ** 2 / 2) + math.exp(-2 * math.pi ** 2 * 0.8 ** 2 * 2 / 3))
    assert sum_of_shares_excess(0.8, 3, 7) == pytest.approx(7 * three)
    assert sum_of_shares_excess(0.4, 2, 1) == math.inf  # outside the proposition's sigma >= 1/2
    assert sum_of_shares_excess(400.0, 3, 10 ** 6) == 0.0  # what a real release meets: below float range


def test_three_shares_add_up_to_the_planned_noise():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 50_000, size=40_000)
    shares = [distributed_release(counts, noise_multiplier=0.8, shares=3, scale=1024, rng=rng) for _ in range(3)]
    for share in shares:  # count units, exact multiples of 1/scale
        np.testing.assert_array_equal(share * 1024, np.round(share * 1024))
        assert np.std(share - counts / 1024) == pytest.approx(0.8 / math.sqrt(3), rel=0.02)
    noise = sum(shares) - 3 * counts / 1024
    assert np.std(noise) == pytest.approx(0.8, rel=0.02) and abs(noise.mean()) < 0.02


def test_a_share_too_small_or_a_count_out_of_range_is_refused():
    rng = np.random.default_rng(2)
    with pytest.raises(PrivacyError, match="too small"):
        distributed_release(np.zeros(10, dtype=np.int64), noise_multiplier=0.3, shares=3, scale=1, rng=rng)
    with pytest.raises(PrivacyError, match="secagg-max-users"):
        distributed_release(np.full(10, SECAGG_INTEGER_RANGE, dtype=np.int64), noise_multiplier=1.0, shares=3,
                            scale=1024, rng=rng)


def test_a_silos_share_is_recorded_as_the_gaussian_mechanism_of_the_sum(tiny_bert):
    local = tiny_config(tiny_bert, **CACHED)
    cfg = tiny_config(tiny_bert, **DISTRIBUTED)
    silo = SiloConfig(0, 3)
    counts, metrics, ledger_json = local_release(cfg, silo, ledger_json=None)
    _, own, _ = local_release(local, silo, ledger_json=None)
    sigma = own["release-noise"]  # what the silo adds alone (popularity-noise-shares = 1)
    assert metrics["release-noise"] == pytest.approx(sigma / math.sqrt(3))
    ledger = PrivacyLedger.from_json(ledger_json)
    assert ledger.history[0] == [pytest.approx(sigma), 1.0, 1]  # the sum's mechanism, not the share's
    assert metrics["epsilon"] == pytest.approx(own["epsilon"]) == pytest.approx(
        _gaussian_epsilon(sigma, cfg.privacy.target_delta), rel=1e-9)
    scale = release_scale(cfg.federation.secagg_max_users)
    np.testing.assert_array_equal(counts * scale, np.round(counts * scale))


@pytest.mark.parametrize("overrides, why", [
    ({"secagg": False}, "secagg = true"),
    ({"min-nodes": 2}, "at most min-nodes = 2"),
    ({"popularity-prior": False}, "popularity-prior = true"),
    ({"popularity-noise-shares": 0}, "an integer >= 1"),
])
def test_config_refuses_shares_that_could_be_seen_alone(tiny_bert, overrides, why):
    with pytest.raises(ConfigError, match="popularity-noise-shares") as info:
        tiny_config(tiny_bert, **{**DISTRIBUTED, **overrides})
    assert why in str(info.value)


def test_the_engine_refuses_a_sum_of_fewer_shares_than_planned(tiny_bert):
    cfg = tiny_config(tiny_bert, **{**DISTRIBUTED, "num-server-rounds": 1})
    with pytest.raises(RunFailed, match="only 2 silo"):
        run_federated(cfg, 2)


def test_the_model_card_says_what_the_distributed_release_assumes():
    from uirl.privacy.guarantee import guarantee_text, released_text

    cfg = {"popularity-prior": True, "popularity-noise-shares": 3}
    assert "at least 3 silos' releases were in it" in guarantee_text(cfg, 1)
    assert "masked by SecAgg+" in released_text(cfg) and "1/sqrt(3)" in released_text(cfg)
    assert "Distributed noise" not in guarantee_text({"popularity-prior": True}, 1)
    assert "Gaussian noise, composed into the same accountant" in released_text({"popularity-prior": True})
