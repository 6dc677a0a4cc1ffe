"""``local-prior``: a silo scores its own users with its own exact counts plus the other silos' part
of the released popularity sum, and trains only with the released prior."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import uirl.engine
import uirl.federated
from helpers import tiny_config
from uirl.config import SiloConfig
from uirl.engine import released_sum, run_federated
from uirl.errors import ConfigError
from uirl.federated import ReleasedSum, _worker, catalogue_ids, local_evaluate, local_prior, local_train, own_counts
from uirl.config import silo_from_node_config
from uirl.model.build import build_model
from test_popularity_release import _LocalGrid, _context, flower_task  # noqa: F401 (a fixture)
from uirl.privacy.popularity import prior_from_counts

LOCAL = {"train-mode": "cached", "user-proj-rank": 4, "popularity-prior": True, "local-prior": True}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def test_a_known_part_of_the_count_is_added_inside_the_log():
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.exponential(3.0, 400), np.zeros(600)]) + rng.normal(0, 1.0, 1000)
    known = rng.exponential(2.0, 1000)
    # Exact counts: log(1 + known + count), negative counts clipped at 0.
    assert np.allclose(prior_from_counts(y, 0.0, known=known), np.log1p(known + np.maximum(y, 0)), atol=1e-6)
    # Nothing known is the plain prior.
    assert np.allclose(prior_from_counts(y, 1.0, known=np.zeros(1000)), prior_from_counts(y, 1.0), atol=1e-6)
    # E[log(1 + k + c)] grows with k and lies between log(1 + k) and log(1 + k + the grid's top).
    with_known = prior_from_counts(y, 1.0, known=known)
    more = prior_from_counts(y, 1.0, known=known + 1.0)
    assert np.all(more > with_known)
    assert np.all(with_known >= np.log1p(known) - 1e-6)
    assert np.all(with_known <= np.log1p(known + max(y.max(), 6.0)) + 1e-6)
    with pytest.raises(ValueError):
        prior_from_counts(y, 1.0, known=known[:10])


def test_under_heavy_noise_the_local_prior_ranks_by_the_silos_own_counts(tiny_bert):
    """The released sum here is all noise (sd 1000): the global prior from it is nearly flat, while
    the local prior still orders the catalogue by the silo's own exact counts."""
    cfg = tiny_config(tiny_bert, **LOCAL)
    silo_cfg = SiloConfig(0, 2)
    _, silo = _worker(cfg, silo_cfg)
    own = own_counts(cfg, silo)
    assert own.shape == (len(catalogue_ids(silo)),) and own.max() > 0
    noise = np.random.default_rng(1).normal(0, 1000.0, own.shape)
    release = ReleasedSum(own + 3.0 * own + noise, 1000.0)  # others: three times ours, plus the noise
    local = local_prior(cfg, silo, release)
    glob = prior_from_counts(release.counts, release.noise_std)
    assert _spearman(local, own) > 0.95 and abs(_spearman(glob, own)) < 0.2
    # Exact release: the local prior is the global one (own + the others' exact part = the sum).
    exact = ReleasedSum(4.0 * own, 0.0)
    assert np.allclose(local_prior(cfg, silo, exact), prior_from_counts(exact.counts, 0.0), atol=1e-6)
    with pytest.raises(Exception, match="items"):
        local_prior(cfg, silo, ReleasedSum(own[:-1], 1.0))


def test_a_silo_evaluates_with_the_local_prior_and_trains_with_the_released_one(tiny_bert, monkeypatch):
    cfg = tiny_config(tiny_bert, **LOCAL)
    off = tiny_config(tiny_bert, **{**LOCAL, "local-prior": False})
    silo_cfg = SiloConfig(0, 2)
    worker, silo = _worker(cfg, silo_cfg)
    state = {k: v.detach().cpu().numpy().copy() for k, v in worker.model.adapter_state().items()}
    own = own_counts(cfg, silo)
    release = ReleasedSum(2.0 * own + np.random.default_rng(2).normal(0, 5.0, own.shape), 5.0)
    released = prior_from_counts(release.counts, release.noise_std)
    local = local_prior(cfg, silo, release)

    with_local = local_evaluate(cfg, silo_cfg, state, prior=released, release=release)
    assert with_local == local_evaluate(off, silo_cfg, state, prior=local)  # the same as handing it the local prior
    assert with_local != local_evaluate(off, silo_cfg, state, prior=released, release=release)

    seen = []
    real_round = uirl.federated.train_round

    def spy(model, bank, *args, **kwargs):
        seen.append(dict(bank.prior))
        return real_round(model, bank, *args, **kwargs)

    monkeypatch.setattr(uirl.federated, "train_round", spy)
    local_evaluate(cfg, silo_cfg, state, prior=released, release=release)  # leaves the local prior attached
    local_train(cfg, silo_cfg, state, ledger_json=None, server_round=1, prior=released)
    ids = catalogue_ids(silo)
    assert seen and np.allclose([seen[0][i] for i in ids], released)
    assert not np.allclose([seen[0][i] for i in ids], local)


def test_an_in_process_run_with_local_prior_reports_the_local_evaluation(tiny_bert, monkeypatch):
    """The engine hands every silo's evaluation the released sum it built from the releases."""
    cfg = tiny_config(tiny_bert, **LOCAL, **{"num-server-rounds": 1, "target-epsilon": 50.0})
    handed = []
    real = uirl.engine.local_evaluate

    def spy(cfg_, silo_cfg, state, *, prior=None, release=None):
        handed.append(release)
        return real(cfg_, silo_cfg, state, prior=prior, release=release)

    monkeypatch.setattr(uirl.engine, "local_evaluate", spy)
    result = run_federated(cfg, 2)
    assert len(handed) == 4 and all(isinstance(r, ReleasedSum) and r.noise_std > 0 for r in handed)
    assert np.isfinite(result.rounds[-1]["auc"])
    assert released_sum([]) is None


def test_local_prior_needs_the_popularity_prior(tiny_bert):
    with pytest.raises(ConfigError, match="local-prior"):
        tiny_config(tiny_bert, **{"local-prior": True})


def test_under_flower_each_silo_evaluates_with_the_released_sum_it_is_sent(tiny_bert, flower_task, tmp_path):
    """The ServerApp's path: the release is saved with the prior, the evaluate messages (not the
    train ones) carry the released sum, and each silo's ClientApp reports what
    :func:`local_evaluate` gives with that sum, which differs from the released prior's."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from server.app import _Recorder, build_strategy
    from server.popularity import release_prior
    from uirl.federated import pop_release
    from uirl.message_names import RELEASE_NOISE_ARRAY, RELEASE_SUM_ARRAY
    from uirl.rundir import RunDirectory

    # The prior dominates the scores (weight 50), so the two priors rank differently.
    cfg = tiny_config(tiny_bert, **LOCAL, **{"target-epsilon": 0.5, "prior-weight": 50.0})
    grid = _LocalGrid([_context(cfg, 11, 0), _context(cfg, 12, 1)])
    run = RunDirectory.create(tmp_path / "runs", "r", {})
    prior = release_prior(grid, cfg, run, on_release=lambda rows: None, timeout=10.0)
    counts, noise = run.load_release()
    assert noise > 0 and np.allclose(prior_from_counts(counts, noise), prior, atol=1e-6)
    release = ReleasedSum(counts, noise)
    model, _ = build_model(cfg)
    strategy = build_strategy(cfg, set(model.trainable_state()), _Recorder(run), prior, set(), release)
    state = {n: v.detach().cpu().numpy().copy() for n, v in model.adapter_state().items()}
    arrays = ArrayRecord({n: Array(v) for n, v in state.items()})
    train = strategy.configure_train(1, arrays, ConfigRecord(), grid)
    assert all(RELEASE_SUM_ARRAY not in m.content["arrays"] for m in train)
    asked = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid))
    assert len(asked) == 2 and all({RELEASE_SUM_ARRAY, RELEASE_NOISE_ARRAY} <= set(m.content["arrays"]) for m in asked)
    for reply in grid.send_and_receive(asked):
        context = grid.contexts[reply.metadata.src_node_id]
        silo = silo_from_node_config(context.node_config)
        got = dict(reply.content["metrics"])
        expected = local_evaluate(cfg, silo, state, prior=prior, release=release)
        keys = ("auc", "mrr", "ndcg@10")
        assert [got[k] for k in keys] == pytest.approx([expected[k] for k in keys], abs=1e-9)
        released_only = local_evaluate(cfg, silo, state, prior=prior)
        assert [got[k] for k in keys] != pytest.approx([released_only[k] for k in keys], abs=1e-9)
    # A malformed sum in a message is refused with a reason.
    with pytest.raises(Exception, match="malformed"):
        pop_release({RELEASE_SUM_ARRAY: np.ones(3), RELEASE_NOISE_ARRAY: np.array([-1.0])})
    assert pop_release({"other": np.ones(2)}) is None
