"""The popularity release's reply check (:func:`uirl.replies.check_release`) on plain data: what an
honest silo sends passes, anything else is rejected with a one-line reason; and the in-process engine
goes through the same check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from helpers import tiny_config
from uirl import engine
from uirl.errors import RunFailed
from uirl.federated import (DP_METRICS, RELEASE_METRICS, STATUS_BUDGET_EXHAUSTED, STATUS_OK, STATUS_REPLAY_REFUSED,
                            STATUS_UNSUPPORTED, local_release)
from uirl.message_names import COUNTS_ARRAY
from uirl.replies import ReplyRejected, check_release, release_catalogue

ITEMS = 6


def _metrics(*, dp: bool = True, **changes) -> dict:
    """An honest release's metrics (under DP unless ``dp`` is False), with ``changes`` (None: key left out)."""
    honest = {"num-examples": 40.0, "silo": 1.0, "status": float(STATUS_OK), "epsilon": 3.0, "delta": 1e-5,
              "target-epsilon": 8.0, "noise-multiplier": 0.0, "sample-rate": 0.25, "rounds-trained": 0.0,
              "release-noise": 2.0}
    if not dp:
        honest = {k: v for k, v in honest.items() if k not in DP_METRICS | {"release-noise"}}
        honest["epsilon"] = math.inf
    honest.update(changes)
    return {k: v for k, v in honest.items() if v is not None}


def _counts(n: int = ITEMS) -> np.ndarray:
    return np.linspace(-1.0, 12.0, n)


def _check(metrics=None, arrays=None, *, catalogue=ITEMS, dp=True):
    metrics = _metrics(dp=dp) if metrics is None else metrics
    arrays = [{COUNTS_ARRAY: _counts()}] if arrays is None else arrays
    return check_release([metrics], arrays, catalogue=catalogue, dp=dp)


def test_an_honest_release_passes_with_its_counts_and_noise():
    assert set(_metrics()) == RELEASE_METRICS
    release = _check()
    np.testing.assert_array_equal(release.counts, _counts())
    assert release.counts.dtype == np.float64 and release.noise == 2.0 and release.metrics["silo"] == 1.0
    # Without DP: exact counts, epsilon inf, no accountant and no noise.
    plain = _check(_metrics(dp=False), [{COUNTS_ARRAY: np.arange(ITEMS, dtype=np.float32)}], dp=False)
    assert plain.noise == 0.0 and plain.metrics["epsilon"] == math.inf and plain.counts[-1] == ITEMS - 1


def test_the_silos_own_refusals_pass_without_counts():
    replay = _metrics(status=float(STATUS_REPLAY_REFUSED), **{"release-noise": None})
    assert _check(replay, []).counts is None
    unsupported = {"status": float(STATUS_UNSUPPORTED), "silo": 2.0}
    refused = _check(unsupported, [])
    assert refused.counts is None and refused.noise == 0.0 and refused.metrics == unsupported
    with pytest.raises(ReplyRejected, match="a refusal .status 4. that carries arrays"):
        _check(unsupported, [{COUNTS_ARRAY: _counts()}])


@pytest.mark.parametrize("metrics, arrays, why", [
    # counts
    (None, [{COUNTS_ARRAY: np.array([1.0, np.nan, 2.0, 0.0, 1.0, 1.0])}], r"1 count\(s\) not finite, e.g. item 1"),
    (None, [{COUNTS_ARRAY: np.full(ITEMS, np.inf)}], r"6 count\(s\) not finite"),
    (None, [{COUNTS_ARRAY: _counts(ITEMS + 1)}], "its counts cover 7 items, the other silos' catalogue 6"),
    (None, [{COUNTS_ARRAY: np.ones((2, 3))}], r"shape \(2, 3\), expected one number per catalogue item"),
    (None, [{COUNTS_ARRAY: np.array(["a"] * ITEMS)}], "expected one number per catalogue item"),
    (None, [{COUNTS_ARRAY: np.full(ITEMS, 1e9)}], r"count 1e\+09 of item 0 is outside \[-20, 60\]"),
    (None, [{COUNTS_ARRAY: np.full(ITEMS, -21.0)}], "outside"),
    # arrays
    (None, [], "a release with 0 array records, expected exactly one"),
    (None, [{COUNTS_ARRAY: _counts()}, {COUNTS_ARRAY: _counts()}], "2 array records"),
    (None, [{COUNTS_ARRAY: _counts(), "user-embeddings": np.ones(3)}], r"extra \['user-embeddings'\]"),
    (None, [{"counts": _counts()}], r"missing \['uirl.popularity-counts'\]"),
    # noise
    (_metrics(**{"release-noise": 0.0}), None, "release-noise = 0 is not a valid noise level under DP"),
    (_metrics(**{"release-noise": -0.5}), None, r"release-noise = -0.5 is not a number in \[0, inf\]"),
    (_metrics(**{"release-noise": math.nan}), None, "release-noise = nan is not finite"),
    (_metrics(**{"release-noise": None}), None, r"missing \['release-noise'\]"),
    # metrics
    (_metrics(epsilon="8"), None, "epsilon = '8' is not a number"),
    (_metrics(epsilon=[1.0, 2.0]), None, r"epsilon = '\[1.0, 2.0\]' is not a number"),
    (_metrics(silo=True), None, "silo = 'True' is not a number"),
    (_metrics(epsilon=math.nan), None, "epsilon = nan is not finite"),
    (_metrics(epsilon=math.inf), None, "epsilon = inf is not finite"),
    (_metrics(silo=-1.0), None, r"silo = -1 is not a whole number"),
    (_metrics(**{"num-examples": 0.0}), None, r"num-examples = 0 is not a whole number in \[1, inf\]"),
    (_metrics(delta=2.0), None, r"delta = 2 is not a number in \[0, 1\]"),
    (_metrics(auc=0.5), None, r"extra \['auc'\]"),
    (_metrics(status=float(STATUS_BUDGET_EXHAUSTED)), None, "status = '1.0' is not a known status of a release"),
    (_metrics(status="0"), None, "status = '0' is not a known status"),
    (_metrics(status=None), None, "status = 'None' is not a known status"),
])
def test_a_bad_release_is_rejected_with_a_one_line_reason(metrics, arrays, why):
    with pytest.raises(ReplyRejected, match=why) as caught:
        _check(metrics, arrays)
    assert "\n" not in str(caught.value)


def test_two_metric_records_or_dp_keys_without_dp_are_rejected():
    with pytest.raises(ReplyRejected, match="2 metric records, expected exactly one"):
        check_release([_metrics(), _metrics()], [{COUNTS_ARRAY: _counts()}], catalogue=ITEMS, dp=True)
    with pytest.raises(ReplyRejected, match=r"extra \['release-noise', 'rounds-trained', 'sample-rate'\]"):
        _check(_metrics(), dp=False)  # noised, with an accountant, in a run without DP: not an honest silo
    with pytest.raises(ReplyRejected, match=r"epsilon = inf is not finite"):
        _check(_metrics(epsilon=math.inf))  # infinite epsilon only without DP


def test_the_catalogue_is_the_size_most_releases_share():
    replies = [[{COUNTS_ARRAY: _counts(n)}] for n in (5, 4, 5)] + [[], [{COUNTS_ARRAY: np.ones((4, 4))}]]
    assert release_catalogue(replies) == 5
    assert release_catalogue([[], []]) is None
    assert _check(arrays=[{COUNTS_ARRAY: _counts(9)}], catalogue=None).counts.shape == (9,)


def test_the_engine_checks_each_release_as_the_server_does(tiny_bert, monkeypatch):
    """The in-process engine (no Flower) goes through :func:`check_release` too: a silo's release with
    a NaN count stops the run with the reason, before any round."""
    cfg = tiny_config(tiny_bert, **{"popularity-prior": True, "train-mode": "cached", "num-server-rounds": 1})

    def broken(cfg, silo_cfg, *, ledger_json):
        counts, metrics, ledger = local_release(cfg, silo_cfg, ledger_json=ledger_json)
        if silo_cfg.partition_id == 1:
            counts = counts.copy()
            counts[3] = np.nan
        return counts, metrics, ledger

    monkeypatch.setattr(engine, "local_release", broken)
    rounds = []
    with pytest.raises(RunFailed, match=r"silo 1: popularity release rejected: 1 count\(s\) not finite, e.g. item 3"):
        engine.run_federated(cfg, 2, on_round=rounds.append)
    assert rounds == []  # nothing was evaluated or trained on a prior built without the check
