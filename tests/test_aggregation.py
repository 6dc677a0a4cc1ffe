"""Combining rules and update bounds on plain arrays: robust rules against one bad silo, Flower's
own median/trimmed-mean as the oracle, the honest-update bound against torch's Adam, and one short
in-process federated run with a hostile silo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean as flower_trim_mean

from helpers import tiny_config
from uirl.aggregation import (adam_reach, aggregate_bound, check_update, combine, fedavg, honest_update_norm,
                              median, trimmed_mean)
from uirl.config import from_run_config
from uirl.errors import ConfigError

GLOBAL = {"b": np.zeros(400, np.float32), "h": np.zeros((8, 5), np.float32)}


def _silos(attack: float, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Five silos' new arrays: a shared direction plus silo noise; silo 4's delta times ``attack``."""
    rng = np.random.default_rng(seed)
    direction = {n: rng.normal(size=v.shape) for n, v in GLOBAL.items()}
    silos = []
    for k in range(5):
        delta = {n: 0.01 * (d + 0.2 * rng.normal(size=d.shape)) for n, d in direction.items()}
        scale = attack if k == 4 else 1.0
        silos.append({n: (GLOBAL[n] + scale * delta[n]).astype(np.float32) for n in GLOBAL})
    return silos


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(np.sum((a[n].astype(np.float64) - b[n]) ** 2)) for n in a))


@pytest.mark.parametrize("attack", [100.0, -1.0, -100.0])
def test_median_and_trimmed_mean_stay_near_the_clean_aggregate_where_fedavg_moves(attack):
    clean = fedavg(_silos(1.0), [100.0] * 5)
    attacked = _silos(attack)
    step = _distance(clean, GLOBAL)
    for update in attacked:  # the bad update passes a loose norm bound: only the rule can help
        check_update(update, GLOBAL, set(GLOBAL), max_norm=1e6)
    far = _distance(fedavg(attacked, [100.0] * 5), clean)
    for rule in ("median", "trimmed-mean"):
        robust = combine(rule, attacked, [100.0] * 5, trim_fraction=0.2)
        near = _distance(robust, clean)
        assert near < 0.15 * step, (rule, near, step)
        assert near < 0.3 * far, (rule, near, far)
        # The bad silo claiming 1e12 users changes nothing: the robust rules ignore weights.
        claimed = combine(rule, attacked, [100.0] * 4 + [1e12], trim_fraction=0.2)
        assert all(np.array_equal(claimed[n], robust[n]) for n in robust)
    assert _distance(fedavg(attacked, [100.0] * 4 + [1e12]), attacked[4]) < 1e-6 * step  # FedAvg: its update
    if abs(attack) == 100:
        assert far > 10 * step  # one silo replaced the average


def test_median_and_trimmed_mean_equal_flowers_fedmedian_and_fedtrimmedavg():
    silos = _silos(7.0, seed=3)
    for name in GLOBAL:
        stacked = np.stack([s[name] for s in silos])
        np.testing.assert_allclose(median(silos)[name], np.median(stacked, axis=0), rtol=1e-6)
        for fraction in (0.0, 0.2, 0.4):
            np.testing.assert_allclose(trimmed_mean(silos, fraction)[name],
                                       flower_trim_mean(stacked.astype(np.float64), fraction), rtol=1e-6)


def test_fedavg_refuses_weights_that_are_not_finite_and_positive():
    silos = _silos(1.0)
    for bad in (math.nan, math.inf, -100.0, 0.0):
        with pytest.raises(ValueError, match="finite positive"):
            fedavg(silos, [100.0, 100.0, 100.0, 100.0, bad])


def test_aggregate_bound_covers_what_each_rule_can_reach():
    silos = _silos(1.0, seed=5)
    bounds = [_distance(s, GLOBAL) for s in silos]
    for rule in ("fedavg", "median", "trimmed-mean"):
        new = combine(rule, silos, [1.0, 2.0, 3.0, 4.0, 5.0], trim_fraction=0.2)
        check_update(new, GLOBAL, set(GLOBAL), aggregate_bound(rule, bounds))
    # A coordinate-wise rule can pick each silo's largest coordinate: longer than any one update.
    spikes = [{"b": np.array(v, np.float32)} for v in ([1, 1, 0], [0, 1, 1], [1, 0, 1])]
    reach = _distance(median(spikes), {"b": np.zeros(3)})  # (1, 1, 1): sqrt(3) > sqrt(2)
    assert reach > math.sqrt(2) and reach <= aggregate_bound("median", [math.sqrt(2)] * 3)


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_no_sequence_of_gradients_moves_adam_farther_than_its_bound(steps):
    """``adam_reach`` is a bound for every gradient sequence, including the spiky ones a hostile
    data set or DP noise makes: checked with torch's own Adam, the optimizer uirl trains with."""
    gen = torch.Generator().manual_seed(steps)
    lr = 0.01
    for trial in range(20):
        p = torch.nn.Parameter(torch.zeros(2000))
        opt = torch.optim.Adam([p], lr=lr)
        for t in range(steps):
            scale = torch.exp(6 * torch.randn(2000, generator=gen)) if trial % 2 else 10.0 ** (t - steps)
            p.grad = torch.randn(2000, generator=gen) * scale
            opt.step()
        assert p.detach().abs().max().item() <= lr * adam_reach(steps) * (1 + 1e-5)
    # Gradients of one sign and one size: every step moves each value by lr (the bound is reached).
    assert adam_reach(1) == 1.0 and adam_reach(steps) >= steps


def test_the_default_bound_is_an_honest_rounds_reach_not_ten_thousand():
    cfg = from_run_config({})
    assert cfg.federation.max_update_norm is None  # "auto"
    # all-MiniLM-L6-v2 with the default LoRA: 209,408 trainable values; a silo of 200 users takes
    # 7 local steps of lr 0.002: at most 0.002 x 7.06 x sqrt(209408) = 6.5.
    assert honest_update_norm(cfg, 200, 209_408) == pytest.approx(6.46, abs=0.02)
    assert honest_update_norm(cfg, 1000, 209_408) > honest_update_norm(cfg, 200, 209_408)  # more steps
    assert from_run_config({"max-update-norm": 3.0}).federation.max_update_norm == 3.0
    with pytest.raises(ConfigError, match="aggregation"):
        from_run_config({"aggregation": "krum"})
    with pytest.raises(ConfigError, match="aggregation"):
        from_run_config({"aggregation": "median", "central-dp": "fixed"})
    with pytest.raises(ConfigError, match="trim-fraction"):
        from_run_config({"trim-fraction": 0.5})


def test_a_federated_run_with_a_hostile_silo_keeps_the_robust_aggregate_near_the_clean_one(tiny_bert, monkeypatch):
    """In process (uirl.engine), five silos, one round, no DP (so silo updates are reproducible):
    silo 4 multiplies its update delta by 100, within a loose max-update-norm."""
    import uirl.engine as engine

    honest_train = engine.local_train
    honest = {}  # silo -> its honest new arrays (the same in every run: no DP, seeded examples)

    def hostile_train(cfg, silo, state, **kwargs):
        arrays, metrics, ledger = honest_train(cfg, silo, state, **kwargs)
        honest[silo.partition_id] = arrays
        if silo.partition_id == 4:
            arrays = {n: (state[n] + 100.0 * (v - state[n])).astype(v.dtype) for n, v in arrays.items()}
        return arrays, metrics, ledger

    # Evaluation is not what this test measures: a constant keeps the run short.
    monkeypatch.setattr(engine, "local_evaluate", lambda *a, **k: {"num-examples": 1.0, "auc": 0.5})
    overrides = {"num-server-rounds": 1, "dp": False, "synthetic-users": 100, "max-update-norm": 1e6}
    clean = engine.run_federated(tiny_config(tiny_bert, **overrides), 5).state
    monkeypatch.setattr(engine, "local_train", hostile_train)
    moved = {rule: engine.run_federated(tiny_config(tiny_bert, **overrides, aggregation=rule), 5)
             for rule in ("fedavg", "median", "trimmed-mean")}
    # How far the honest silos' own updates lie from their average: the spread a robust rule may use.
    spread = max(_distance(arrays, {n: clean[n] for n in arrays}) for arrays in honest.values())
    far = _distance(moved["fedavg"].state, clean)
    assert far > 10 * spread
    for rule in ("median", "trimmed-mean"):
        near = _distance(moved[rule].state, clean)
        assert near < spread and near < 0.1 * far, (rule, near, spread, far)
        assert moved[rule].rounds[-1]["silos-trained"] == 5
