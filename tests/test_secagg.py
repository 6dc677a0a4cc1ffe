"""SecAgg+ (run config ``secagg``): valid combinations, the silo's masked reply, one real `flwr run`."""

from __future__ import annotations

import io
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
