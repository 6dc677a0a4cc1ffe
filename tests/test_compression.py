"""What travels on the wire: no frozen arrays in either direction, and the silo's update compressed
(run config ``compression``) -- round-trip error bounds, unbiased stochastic rounding, malformed
payloads rejected with a reason, and a federated run whose AUC compression leaves alone."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from helpers import tiny_config
from test_replies import NODES, Federation, _metrics
from uirl.aggregation import UpdateRejected, fedavg
from uirl.compression import (BLOCK, SCALE_SUFFIX, PayloadError, check_payload, compress, decode_update,
                              decompress, encode_update, num_scales, payload_bytes)
from uirl.config import SiloConfig, from_run_config, to_run_config
from uirl.errors import ConfigError
from uirl.model.build import build_model
from uirl.replies import ReplyChecker
from uirl.wire import downlink, wire_bytes


@pytest.fixture
def flower_identity(monkeypatch):
    """What Flower sets in an app's process; a Message cannot be built without it."""
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _per_value(scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Each value's int8 step: its block's scale."""
    return np.repeat(scale.astype(np.float64), BLOCK)[:int(np.prod(shape))].reshape(shape)


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    """Blocks of very different magnitudes, a partial last block, an all-zero array, a 1x1 weight."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(75, 8)) * np.repeat([1e-4, 1e-2, 1.0], BLOCK)[:600].reshape(75, 8)
    return {"w": w.astype(np.float32), "zero": np.zeros(5, np.float32),
            "s": rng.normal(size=(1, 1)).astype(np.float32)}


def test_fp16_round_trip_is_within_half_precision():
    delta = _delta()
    payload = compress(delta, "fp16")
    assert all(v.dtype == np.float16 for v in payload.values())
    back = decompress(payload, "fp16")
    for name, value in delta.items():
        err = np.abs(back[name] - value.astype(np.float64))
        assert (err <= np.abs(value) * 2.0 ** -11 + 2.0 ** -25).all(), name
    with pytest.raises(PayloadError, match="float16's range"):
        compress({"w": np.full(3, 1e6, np.float32)}, "fp16")


def test_int8_round_to_nearest_is_within_half_a_step():
    delta = _delta()
    payload = compress(delta, "int8")  # no generator: deterministic round to nearest
    back = decompress(payload, "int8")
    for name, value in delta.items():
        scale = payload[name + SCALE_SUFFIX]
        assert scale.dtype == np.float32 and scale.shape == (num_scales(value.shape),)
        assert payload[name].dtype == np.int8 and np.abs(payload[name].astype(int)).max() <= 127
        err = np.abs(back[name] - value.astype(np.float64))
        assert (err <= _per_value(scale, value.shape) / 2 * (1 + 1e-6)).all(), name
    assert not back["zero"].any()
    # Per block, not per array: the small first block keeps its precision next to the large last one.
    first = delta["w"].ravel()[:BLOCK]
    assert np.abs(back["w"].ravel()[:BLOCK] - first).max() <= np.abs(first).max() / 254 * (1 + 1e-6) < 1e-5


def test_int8_stochastic_rounding_is_unbiased_where_rounding_to_nearest_is_not():
    # One block: a large value sets the step; the others sit at 0.3 and -0.7 steps.
    x = np.zeros(BLOCK)
    x[0] = 127.0
    x[1::2], x[2::2] = 0.3, -0.7
    nearest = decompress(compress({"x": x}, "int8"), "int8")["x"]
    assert np.allclose(nearest[1::2], 0.0) and np.allclose(nearest[2::2], -1.0)  # off by 0.3 steps, always
    rng = np.random.default_rng(0)
    draws = 4000
    total = np.zeros(BLOCK)
    for _ in range(draws):
        back = decompress(compress({"x": x}, "int8", rng=rng), "int8")["x"]
        assert np.abs(back - x).max() < 1.0 + 1e-9  # never off by a whole step
        total += back
    # Each draw is off by at most one step (variance <= 1/4): the mean of 4000 within 5 sigma of x.
    assert np.abs(total / draws - x).max() < 5 * 0.5 / np.sqrt(draws)


def test_the_server_gets_back_the_arrays_the_silo_trained():
    rng = np.random.default_rng(1)
    received = {"b": rng.normal(size=(40, 8)).astype(np.float32), "h": rng.normal(size=300).astype(np.float32)}
    new = {n: (v + 1e-3 * rng.normal(size=v.shape)).astype(np.float32) for n, v in received.items()}
    assert encode_update(new, received, "none") is new
    for mode, tolerance in (("fp16", 1e-3 * 5 * 2.0 ** -11 + 1e-7), ("int8", 1e-3 * 5 / 127)):
        payload = encode_update(new, received, mode, rng=np.random.default_rng(2))
        decoded = decode_update(payload, received, set(received), mode)
        for name in new:
            assert decoded[name].dtype == np.float32
            assert np.abs(decoded[name] - new[name]).max() <= tolerance, (mode, name)
    assert payload_bytes(compress(received, "int8")) == 320 + 300 + 4 * (2 + 2)


def test_secagg_and_compression_conflict_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match="compression.*secagg"):
        from_run_config({"secagg": True, "compression": "int8"})
    assert from_run_config({"secagg": True, "compression": "none"}).federation.secagg
    with pytest.raises(ConfigError, match="none, fp16 or int8"):
        from_run_config({"compression": "int4"})


# --- malformed payloads ------------------------------------------------------------------------

GLOBAL = {"a": np.ones((2, 3), np.float32), "b": np.zeros(300, np.float32)}  # a: frozen
TRAINABLE = {"b"}


def _honest(mode: str) -> dict[str, np.ndarray]:
    new = {"b": (GLOBAL["b"] + 1e-4 * np.linspace(-1, 1, 300)).astype(np.float32)}
    return encode_update(new, GLOBAL, mode, rng=np.random.default_rng(0))


def _changed(mode: str, **changes) -> dict[str, np.ndarray]:
    payload = _honest(mode)
    for name, value in changes.items():
        name = name.replace("_scale", SCALE_SUFFIX)
        if value is None:
            payload.pop(name)
        else:
            payload[name] = value
    return payload


MALFORMED = {
    "int8 without its scales": ("int8", lambda: _changed("int8", b_scale=None), r"missing \['b:scale'\]"),
    "int8 scales as float64": ("int8", lambda: _changed("int8", b_scale=np.ones(2)), "b:scale: float64"),
    "int8 scales of the wrong count": ("int8", lambda: _changed("int8", b_scale=np.ones(3, np.float32)),
                                       r"expected float32\[2\]"),
    "a NaN scale": ("int8", lambda: _changed("int8", b_scale=np.array([np.nan, 1], np.float32)), "finite and >= 0"),
    "a negative scale": ("int8", lambda: _changed("int8", b_scale=np.array([-1, 1], np.float32)), "finite and >= 0"),
    "int8 value -128": ("int8", lambda: _changed("int8", b=np.full(300, -128, np.int8)), "-128"),
    "raw float32 weights": ("int8", lambda: {"b": GLOBAL["b"], "b" + SCALE_SUFFIX: np.ones(2, np.float32)},
                            r"b: float32\[300\], expected int8\[300\]"),
    "int8 of another shape": ("int8", lambda: _changed("int8", b=np.zeros((10, 30), np.int8)), r"int8\[10, 30\]"),
    "the frozen arrays too": ("int8", lambda: {**_honest("int8"), "a": GLOBAL["a"]}, r"extra \['a'\]"),
    "a scale too large for an honest silo": ("int8", lambda: _changed("int8", b_scale=np.full(2, 10.0, np.float32)),
                                             "exceeds max-update-norm"),
    "fp16 sent as float32": ("fp16", lambda: {"b": GLOBAL["b"]}, "expected float16"),
    "fp16 infinity": ("fp16", lambda: {"b": np.full(300, np.inf, np.float16)}, "non-finite"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_compressed_reply_is_rejected_with_a_reason(case):
    mode, make, reason = MALFORMED[case]
    cfg = from_run_config({"compression": mode, "min-nodes": 1})
    checker = ReplyChecker(cfg, TRAINABLE)
    honest = checker.train(1, 1, [_metrics(0, 1)], [_honest(mode)], GLOBAL)
    assert np.abs(honest.update["b"] - 1e-4 * np.linspace(-1, 1, 300)).max() < 1e-4 / 127 + 1e-9
    with pytest.raises(UpdateRejected, match=reason) as rejected:  # what the strategy and the engine catch
        checker.train(2, 1, [_metrics(1, 1)], [make()], GLOBAL)
    if case.startswith(("a scale too large", "fp16 infinity")):  # well-formed: caught once decompressed
        check_payload(make(), {"b": GLOBAL["b"]}, mode)
    else:
        assert str(rejected.value).startswith(f"malformed {mode} update: ")
        with pytest.raises(PayloadError):
            check_payload(make(), {"b": GLOBAL["b"]}, mode)


def test_the_strategy_sends_no_frozen_arrays_and_averages_int8_updates(tmp_path, flower_identity):
    cfg = from_run_config({"compression": "int8", "min-nodes": 3})
    fed = Federation(tmp_path, cfg)
    sent = list(fed.strategy.configure_train(1, fed.arrays, ConfigRecord(), _Grid()))
    assert all(set(m.content["arrays"]) == {"b"} for m in sent)  # FFA-LoRA's A stays home
    received = {"a": fed.arrays["a"].numpy(), "b": fed.arrays["b"].numpy()}
    new = {k: {"b": (received["b"] + 1e-4 * (k + 1) * np.arange(1, 7)).astype(np.float32)} for k in range(5)}
    payloads = {k: encode_update(new[k], received, "int8", rng=np.random.default_rng(k)) for k in range(5)}
    bad = {k: (_metrics(k, 1), payloads[k]) for k in range(4)}
    bad[4] = (_metrics(4, 1), {"b": payloads[4]["b"]})  # scales left out
    result = fed.train(1, bad=bad)
    decoded = [decode_update(payloads[k], received, {"b"}, "int8") for k in range(4)]
    np.testing.assert_allclose(result["b"], fedavg(decoded, [100.0] * 4)["b"], rtol=1e-6)
    np.testing.assert_array_equal(result["a"], received["a"])  # the server keeps the frozen arrays
    assert np.abs(result["b"] - fedavg([new[k] for k in range(4)], [100.0] * 4)["b"]).max() < 4e-4 / 127
    rejected = [row for row in fed.privacy_rows() if "rejected" in row]
    assert len(rejected) == 1 and rejected[0]["node-id"] == str(NODES[4])
    assert "malformed int8 update" in rejected[0]["rejected"] and "b:scale" in rejected[0]["rejected"]


class _Grid:
    def get_node_ids(self):
        return list(NODES)


# --- the real model -----------------------------------------------------------------------------

def test_the_client_app_receives_and_sends_no_frozen_arrays(tiny_bert, flower_identity, caplog):
    from client.app import app as client_app

    cfg = tiny_config(tiny_bert, **{"train-mode": "lora", "compression": "int8"})
    model, _ = build_model(cfg)
    adapter = {n: t.numpy().copy() for n, t in model.adapter_state().items()}
    trainable = set(model.trainable_state())
    frozen = set(adapter) - trainable
    assert frozen and all("lora_A" in n for n in frozen)  # FFA-LoRA
    sent = downlink(adapter, trainable)
    assert set(sent) == trainable and payload_bytes(sent) < payload_bytes(adapter)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=to_run_config(cfg))
    train = Message(RecordDict({"arrays": ArrayRecord({n: Array(v) for n, v in sent.items()}),
                                "config": ConfigRecord({"server-round": 1, "run-name": "t"})}),
                    dst_node_id=7, message_type="train")
    reply = client_app(train, context)
    payload = {n: a.numpy() for n, a in reply.content["arrays"].items()}
    assert set(payload) == trainable | {n + SCALE_SUFFIX for n in trainable}
    assert payload_bytes(payload) < 0.3 * payload_bytes(sent)
    update = ReplyChecker(cfg, trainable).train(7, 1, [dict(reply.content["metrics"])], [payload], adapter).update
    assert set(update) == trainable and any(not np.array_equal(update[n], adapter[n]) for n in trainable)
    # A message without the trainable arrays is refused, not trained from another silo's leftovers.
    bare = Message(RecordDict({"arrays": ArrayRecord({}), "config": ConfigRecord({"server-round": 2})}),
                   dst_node_id=7, message_type="train")
    flwr_log = logging.getLogger("flwr")
    flwr_log.addHandler(caplog.handler)
    try:
        refused = client_app(bare, context)
    finally:
        flwr_log.removeHandler(caplog.handler)
    assert refused.has_error() and refused.error.reason == "UirlError (details in the silo's log)"
    assert not refused.has_content()
    assert f"lacks {len(trainable)} trainable" in caplog.text  # the reason, in the silo's own log only


@pytest.mark.parametrize("mode", ["lora", "cached"])
def test_wire_bytes_counts_what_travels(tiny_bert, mode):
    cfg = tiny_config(tiny_bert, **{"train-mode": mode})
    model, _ = build_model(cfg)
    trainable = {n: t for n, t in model.trainable_state().items()}
    counted = wire_bytes(cfg)
    values = sum(t.numel() for t in trainable.values())
    assert counted["trainable-values"] == values and counted["arrays-sent"] == len(trainable)
    assert counted["downlink-bytes"] == counted["reply-bytes-none"] == 4 * values
    assert counted["frozen-bytes"] == counted["adapter-bytes"] - counted["downlink-bytes"] > 0
    assert counted["reply-bytes-fp16"] == 2 * values
    scales = sum(num_scales(tuple(t.shape)) for t in trainable.values())
    assert counted["reply-bytes-int8"] == values + 4 * scales
    assert (mode == "cached") == all("lora_" not in n for n in trainable)
    assert 0 < counted["reply-fraction-int8"] < counted["reply-fraction-fp16"] < counted["reply-fraction-none"]


def test_a_silo_replays_its_compressed_update_byte_for_byte(tmp_path, tiny_bert):
    from uirl.federated import local_train_durable

    cfg = tiny_config(tiny_bert, compression="int8")
    model, _ = build_model(cfg)
    state = {n: t.numpy().copy() for n, t in model.trainable_state().items()}
    silo = SiloConfig(partition_id=0, num_partitions=2, ledger_path=str(tmp_path / "ledger.json"))
    first, m1, _, _ = local_train_durable(cfg, silo, state, ledger_json=None, run="r", server_round=1)
    again, m2, _, _ = local_train_durable(cfg, silo, state, ledger_json=None, run="r", server_round=1)
    assert m2["replayed"] == 1.0 and set(again) == set(first) and any(n.endswith(SCALE_SUFFIX) for n in first)
    for name, value in first.items():
        assert again[name].dtype == value.dtype
        np.testing.assert_array_equal(again[name], value)


def test_resume_refuses_a_checkpoint_whose_frozen_arrays_differ_from_the_seeded_ones(tmp_path, monkeypatch):
    from server.app import _start
    from uirl.checkpoint import CheckpointError, save_checkpoint
    from uirl.rundir import RunDirectory

    run = RunDirectory.create(tmp_path / "runs", "a", {})
    initial = {"a": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float32)}

    def checkpoint(r: int, arrays: dict) -> None:
        save_checkpoint(run.path, r, arrays, strategy={"name": "X"}, rounds=run.rounds, ledger=run.ledger,
                        write_adapter=lambda d: d.mkdir(parents=True), keep=2)

    cfg = from_run_config({"run-dir": str(tmp_path / "runs"), "resume": "latest"})
    checkpoint(1, {"a": initial["a"], "b": initial["b"] + 1})
    _, done, state = _start(cfg, initial, {"b"})
    assert done == 1 and state["b"][0] == 1 and state["a"][0, 0] == 1  # the full adapter is back
    checkpoint(2, {"a": initial["a"] + 1, "b": initial["b"] + 2})
    with pytest.raises(CheckpointError, match="frozen array a"):
        _start(cfg, initial, {"b"})


def test_a_federated_run_learns_as_well_with_fp16_and_int8(tiny_bert, monkeypatch):
    """In process, the tiny model, the default cached path, DP on (its noise and sampling seeded, so
    the runs differ by the compression only): the test AUC after the last round stays within 0.005
    of the uncompressed run's, and silos are never sent a LoRA array (all frozen in this mode)."""
    import uirl.engine as engine

    monkeypatch.setattr("uirl.privacy.dp_sgd.secure_generator",
                        lambda device="cpu": torch.Generator(device=device).manual_seed(1234))
    monkeypatch.setattr("uirl.train.secure_sampling_rng", lambda: np.random.default_rng(1234))
    received: list[set[str]] = []
    honest_train = engine.local_train

    def spy(cfg, silo, state, **kwargs):
        received.append(set(state))
        return honest_train(cfg, silo, state, **kwargs)

    monkeypatch.setattr(engine, "local_train", spy)
    runs = {}
    for mode in ("none", "fp16", "int8"):
        cfg = tiny_config(tiny_bert, **{"compression": mode, "num-server-rounds": 2, "lr": 0.01,
                                        "target-epsilon": 50.0, "batch-users": 16, "full-catalogue": False})
        runs[mode] = engine.run_federated(cfg, 2)
    plain = runs["none"]
    trainable = set(plain.model.trainable_state())
    assert received and all(names == trainable for names in received)
    assert all("lora_" not in n for n in trainable) and any("lora_" in n for n in plain.state)
    moved = max(float(np.abs(plain.state[n] - plain.initial[n]).max()) for n in trainable)
    for mode in ("fp16", "int8"):
        run = runs[mode]
        off = max(float(np.abs(run.state[n] - plain.state[n]).max()) for n in trainable)
        assert 0 < off < moved / 10, (mode, off, moved)  # compressed, and far less than training moved it
        assert abs(run.rounds[-1]["auc"] - plain.rounds[-1]["auc"]) <= 0.005, (mode, run.rounds, plain.rounds)
