"""Baselines and the in-process federation: same candidates, same aggregation, exact central-DP math."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from helpers import tiny_config
from uirl import baselines
from uirl.aggregation import fedavg
from uirl.config import SiloConfig
from uirl.engine import run_federated
from uirl.federated import local_train
from uirl.model.build import build_model
from uirl.privacy.accountant import RDP_ORDERS
from uirl.privacy.central import central_dp_aggregate, central_epsilon, clip_update, plan_central_noise

FAST = {"num-server-rounds": 1, "synthetic-users": 40, "eval-max-users": 6, "eval-min-users": 5, "local-epochs": 0.5}


def test_every_method_scores_the_same_candidate_lists(tiny_bert, monkeypatch):
    """Each method's evaluation goes through uirl.train.evaluate / ranking_metrics; record what it saw."""
    import uirl.baselines as b
    import uirl.federated as f
    import uirl.train as t

    seen: dict[str, set] = {}
    current = {"method": ""}
    real_evaluate = t.evaluate

    def spy(model, bank, users, cfg, *, split="test", **kw):
        seen.setdefault(current["method"], set()).update((u.user_id, u.test_candidates) for u in users)
        return real_evaluate(model, bank, users, cfg, split=split, **kw)

    monkeypatch.setattr(t, "evaluate", spy)
    monkeypatch.setattr(b, "evaluate", spy)
    monkeypatch.setattr(f, "evaluate", spy)
    cfg = tiny_config(tiny_bert, dp=False, **FAST)
    for name, run in (("zero-shot", lambda: b.zero_shot(cfg, 2)), ("centralized", lambda: b.centralized(cfg, 2)),
                      ("local-only", lambda: b.local_only(cfg, 2)), ("federated", lambda: run_federated(cfg, 2))):
        current["method"] = name
        run()
    expected = {(u.user_id, u.test_candidates) for s in b.load_silos(cfg, 2) for u in s.eval_users}
    assert len(expected) == 12
    assert all(got == expected for got in seen.values()), {k: len(v) for k, v in seen.items()}
    assert set(seen) == {"zero-shot", "centralized", "local-only", "federated"}
    # Popularity ranks the same lists (it scores s.eval_users directly); the fingerprint tells lists apart.
    assert baselines.popularity(cfg, 2)["auc"] > 0.5
    other = tiny_config(tiny_bert, dp=False, **{**FAST, "eval-negatives": 5})
    assert baselines.candidates_fingerprint(b.load_silos(cfg, 2)) != baselines.candidates_fingerprint(
        b.load_silos(other, 2))


def test_in_process_round_is_local_train_plus_fedavg(tiny_bert):
    cfg = tiny_config(tiny_bert, dp=False, **FAST)
    result = run_federated(cfg, 2)
    model, _ = build_model(cfg)
    state = {n: t.numpy().copy() for n, t in model.adapter_state().items()}
    updates, weights = [], []
    for k in range(2):
        arrays, metrics, _ = local_train(cfg, SiloConfig(k, 2), state, ledger_json=None, server_round=1)
        updates.append(arrays)
        weights.append(metrics["num-examples"])
    expected = fedavg(updates, weights)
    for name, value in expected.items():
        np.testing.assert_allclose(result.state[name], value, rtol=1e-6, atol=1e-7)
    assert [r["round"] for r in result.rounds] == [0, 1] and result.privacy["guarantee"] == "none"


def test_central_epsilon_equals_opacus_rdp_analysis():
    for sigma, q, rounds in ((1.1, 1.0, 5), (0.8, 0.3, 40), (2.5, 0.05, 200)):
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=rounds, orders=list(RDP_ORDERS))
        eps, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=1e-5)
        assert central_epsilon(noise_multiplier=sigma, sample_rate=q, rounds=rounds, delta=1e-5) == pytest.approx(eps)
    assert central_epsilon(noise_multiplier=1.0, sample_rate=1.0, rounds=0, delta=1e-5) == 0.0
    sigma = plan_central_noise(target_epsilon=4.0, delta=1e-5, sample_rate=1.0, rounds=3)
    assert 3.9 < central_epsilon(noise_multiplier=sigma, sample_rate=1.0, rounds=3, delta=1e-5) <= 4.0


def test_central_aggregation_clips_each_silo_and_averages_with_equal_weights():
    rng = np.random.default_rng(0)
    current = {"a": np.zeros(3, np.float32), "b": np.ones((2, 2), np.float32)}
    small = {"a": np.array([0.1, 0, 0], np.float32), "b": np.ones((2, 2), np.float32)}
    huge = {"a": np.array([100.0, 0, 0], np.float32), "b": np.ones((2, 2), np.float32)}
    clipped = clip_update(huge, current, 1.0)
    assert math.isclose(float(np.linalg.norm(clipped["a"] - current["a"])), 1.0, rel_tol=1e-6)
    assert clip_update(small, current, 1.0)["a"][0] == pytest.approx(0.1)
    out = central_dp_aggregate(current, [small, huge], clip=1.0, noise_multiplier=0.0, expected_silos=2, rng=rng)
    assert out["a"][0] == pytest.approx((0.1 + 1.0) / 2)  # one silo moves the mean by at most C / m
    assert np.allclose(out["b"], 1.0)
    noisy = [central_dp_aggregate(current, [small], clip=1.0, noise_multiplier=2.0, expected_silos=4,
                                  rng=rng)["b"] - 1.0 for _ in range(2000)]
    assert np.std(noisy) == pytest.approx(2.0 * 1.0 / 4, rel=0.05)


def test_central_dp_run_records_client_level_accounting(tiny_bert):
    cfg = tiny_config(tiny_bert, **{**FAST, "dp": False, "central-dp": "fixed", "target-epsilon": 5.0,
                                    "num-server-rounds": 2})
    result = run_federated(cfg, 2)
    acc = result.privacy
    assert acc["guarantee"] == "client-level" and acc["sample-rate"] == 1.0 and acc["steps"] == 2
    assert acc["epsilon"] == pytest.approx(central_epsilon(noise_multiplier=acc["noise-multiplier"], sample_rate=1.0,
                                                           rounds=2, delta=1e-5))
    assert 4.9 < acc["epsilon"] <= 5.0
    assert result.rounds[1]["epsilon"] < result.rounds[2]["epsilon"] == pytest.approx(acc["epsilon"])
    frozen = [n for n in result.state if "lora_A" in n]
    assert frozen and all(np.array_equal(result.state[n], result.initial[n]) for n in frozen)


def test_centralized_round_takes_as_many_steps_as_a_silo_with_the_silos_users_per_step(tiny_bert, monkeypatch):
    """The pooled baseline gets the federated budget per round: same epochs, same steps, same users per
    step as all silos together (not ``silos`` times more Adam steps of ``batch-users`` users each)."""
    import uirl.baselines as b
    from uirl.train import train_round

    cfg = tiny_config(tiny_bert, dp=False, **{**FAST, "local-epochs": 1.0, "batch-users": 8})
    model, _ = build_model(cfg)
    state = {n: t.numpy().copy() for n, t in model.trainable_state().items()}
    silo_steps = {local_train(cfg, SiloConfig(partition_id=k, num_partitions=2), state, ledger_json=None,
                              server_round=1)[1]["steps"] for k in range(2)}
    pooled = []

    def spy(model, bank, users, touched, run_cfg, **kw):
        result = train_round(model, bank, users, touched, run_cfg, **kw)
        pooled.append((len(users), run_cfg.train.batch_users, result.steps))
        return result

    monkeypatch.setattr(b, "train_round", spy)
    b.centralized(cfg, 2)
    users = sum(len(s.users) for s in b.load_silos(cfg, 2))
    assert silo_steps == {3.0}  # 20 users, 8 per step, 1 epoch
    assert pooled == [(users, 16, 3)]


def test_zero_shot_reads_the_catalogue_vectors_from_the_disk_cache(tiny_bert, monkeypatch, tmp_path):
    """The zero-shot row encodes the catalogue once into the disk cache; a second row (another
    method's round 0, a cached-path run of the same encoder) reads that entry and scores identically."""
    from uirl import federated
    from uirl.model.vector_cache import cache_dir

    monkeypatch.setenv("UIRL_CACHE", str(tmp_path))
    cfg = tiny_config(tiny_bert, **{"synthetic-users": 30})
    first = baselines.zero_shot(cfg, 2)
    assert len(list(cache_dir().glob("*.npy"))) == 1  # one catalogue, one encoder: one entry
    monkeypatch.setattr(federated, "encode_texts", lambda *a, **k: pytest.fail("encoded the catalogue again"))
    assert baselines.zero_shot(cfg, 2) == first
