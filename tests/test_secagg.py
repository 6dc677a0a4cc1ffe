"""SecAgg+ (run config ``secagg``): valid combinations, the silo's masked reply, one real `flwr run`."""

from __future__ import annotations

import io
import math
import json

import numpy as np
import pytest
from flwr.compat.common import recorddict_compat as compat
from flwr.common import parameters_to_ndarrays
from safetensors.numpy import load_file

from client.secagg import fit_reply
from simulation import flower
from uirl.checkpoint import ARRAYS_FILE, CHECKPOINTS, load_checkpoint
from uirl.config import from_run_config
from uirl.engine import run_federated
from uirl.errors import ConfigError
from uirl.privacy.popularity import prior_from_counts


def test_central_dp_with_secagg_is_refused():
    with pytest.raises(ConfigError, match="central-dp"):
        from_run_config({"secagg": True, "central-dp": "fixed"})
    with pytest.raises(ConfigError, match="min-nodes"):
        from_run_config({"secagg": True, "min-nodes": 1})
    # Local user-level DP per silo composes with SecAgg+ (noise is added before masking).
    assert from_run_config({"secagg": True, "dp": True}).federation.secagg


def test_a_refusing_silo_sends_a_zero_delta_with_weight_zero():
    cfg = from_run_config({"secagg": True})
    state = {"a": np.ones((2, 3), np.float32), "b": np.full(4, 2.0, np.float32)}
    refused = compat.recorddict_to_fitres(fit_reply(cfg, state, ["b"], None, {"status": 2.0}, "budget spent"), True)
    assert refused.num_examples == 0 and refused.metrics["error"] == "budget spent"
    assert [d.tolist() for d in parameters_to_ndarrays(refused.parameters)] == [[0.0] * 4]
    trained = {"b": np.full(4, 2.5, np.float32)}
    reply = compat.recorddict_to_fitres(fit_reply(cfg, state, ["b"], trained, {"num-examples": 5000.0}, None), True)
    assert reply.num_examples == cfg.federation.secagg_max_users  # capped, so the weighted entry stays in range
    assert np.allclose(parameters_to_ndarrays(reply.parameters)[0], 0.5)


def test_flwr_run_with_secagg_matches_plain_fedavg(tmp_path, tiny_bert):
    overrides = {"model-name": tiny_bert, "num-server-rounds": 2, "synthetic-users": 90, "synthetic-items": 300,
                 "max-history": 4, "eval-negatives": 9, "batch-users": 8, "lora-r": 4, "max-tokens": 16,
                 "dp": False, "lr": 0.05}
    run_config = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower()}"
                          for k, v in overrides.items())
    run_config += f" secagg=true run-dir='{tmp_path / 'runs'}' run-name='secagg'"
    status, text = flower.run(supernodes=3, run_config=run_config, cpus_per_client=1,
                              flwr_home=tmp_path / "flwr-home", log=io.StringIO())
    assert status == "finished:completed", text[-3000:]
    run = tmp_path / "runs" / "secagg"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["silos-trained"] == 3
    assert "Secure aggregation completed" in text and "Secure aggregation halted" not in text, text[-3000:]
    ledger = json.loads((run / "privacy_ledger.json").read_text())  # keyed by node id, labelled by silo
    assert sorted(entry["silo"] for entry in ledger.values()) == [0, 1, 2]
    assert load_checkpoint(run).round == 2  # the mod's protocol state carried into the next round
    masked = load_file(str(run / CHECKPOINTS / "round-1" / ARRAYS_FILE))

    # Round 1 without SecAgg+, in process: FedAvg of the very same silo updates (a plain `flwr run`
    # gives these arrays to 1e-8). Bound: 3 silos x one quantization step (2 x secagg-clip / 2**22)
    # x secagg-max-users / users that trained (~1.6e-5 here).
    plain = run_federated(from_run_config({**overrides, "num-server-rounds": 1}), 3)
    moved = 0.0
    for name, value in plain.state.items():
        assert masked[name].shape == value.shape
        assert np.abs(masked[name] - value).max() < 1e-4, name
        moved = max(moved, float(np.abs(value - plain.initial[name]).max()))
    assert moved > 1e-2  # training moved the model far more than the quantization error


def test_integer_counts_cross_secaggs_quantization_exactly():
    """What :func:`server.secagg.secagg_release` relies on: with clipping range 2^21 and quantization
    range 2^22, Flower's quantize/dequantize and the workflow's unmasking arithmetic (sum, offset,
    division by the total weight) give back the mean of integer vectors exactly."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from uirl.privacy.popularity import SECAGG_INTEGER_RANGE

    clip, levels = float(SECAGG_INTEGER_RANGE), 2 * SECAGG_INTEGER_RANGE
    rng = np.random.default_rng(0)
    vectors = [rng.integers(-SECAGG_INTEGER_RANGE, SECAGG_INTEGER_RANGE + 1, size=5000).astype(np.float64)
               for _ in range(3)]
    quantized = [quantize([v], clip, levels)[0] for v in vectors]  # weight 1: the mod multiplies by 1.0
    for v, q in zip(vectors, quantized):
        np.testing.assert_array_equal(q, v + clip)
    summed = np.sum([q.astype(np.int64) for q in quantized], axis=0) % 2 ** 32  # the masks cancel mod 2^32
    mean = dequantize([summed], clip, levels)[0]  # as the workflow's unmask stage does it
    mean += -(len(vectors) - 1) * clip
    mean *= levels / (len(vectors) * levels)
    np.testing.assert_array_equal(np.round(mean * len(vectors)), np.sum(vectors, axis=0))


def test_flwr_run_releases_the_popularity_counts_through_secagg(tmp_path, tiny_bert):
    """Distributed noise (``popularity-noise-shares = 3``) in a real `flwr run`: the release is one
    SecAgg+ round, each silo adds a third of the noise variance and records the Gaussian mechanism
    of the sum in its ledger; the run then trains and evaluates with the prior built from the sum."""
    from test_cached_path import _gaussian_epsilon

    run_config = (f"model-name='{tiny_bert}' num-server-rounds=1 synthetic-users=90 synthetic-items=300 "
                  f"max-history=4 eval-negatives=9 batch-users=8 max-tokens=16 train-mode='cached' "
                  f"popularity-prior=true secagg=true min-nodes=3 popularity-noise-shares=3 local-prior=true "
                  f"run-dir='{tmp_path / 'runs'}' run-name='shares'")
    status, text = flower.run(supernodes=3, run_config=run_config, cpus_per_client=1,
                              flwr_home=tmp_path / "flwr-home", log=io.StringIO())
    assert status == "finished:completed", text[-3000:]
    assert "popularity prior from the SecAgg+ sum of silo 0, silo 1, silo 2 (3 noise shares) over 300 items" in text
    run = tmp_path / "runs" / "shares"
    assert np.load(run / "popularity_prior.npy").shape == (300,)
    privacy = [json.loads(line) for line in (run / "privacy.jsonl").read_text().splitlines()]
    released = [r for r in privacy if r["round"] == 0]
    assert len(released) == 3 and all(r["accepted"] for r in released)
    sigma = released[0]["release-noise"] * 3 ** 0.5  # the noise of the sum, which each ledger records
    for r in released:
        assert r["epsilon"] == pytest.approx(_gaussian_epsilon(sigma, 1e-5), rel=1e-6)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["silos-trained"] == 3
    # local-prior: the silos evaluated with the released sum, saved with the prior it gives.
    with np.load(run / "popularity_release.npz") as saved:
        assert saved["counts"].shape == (300,) and saved["noise"][0] == pytest.approx(sigma, rel=1e-9)
        assert np.allclose(prior_from_counts(saved["counts"], saved["noise"][0]),
                           np.load(run / "popularity_prior.npy"), atol=1e-6)
    assert all(math.isfinite(r["auc"]) for r in rows)
