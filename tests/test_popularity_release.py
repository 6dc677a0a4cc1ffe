"""The private popularity prior under Flower: the silo's release through the ClientApp's query
handler (once, in the ledger its DP-SGD steps compose with), the server's collection of the
releases, the refusals, and one real `flwr run` with the prior and DP on."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from helpers import tiny_config
from server.popularity import RELEASE_MESSAGE, PriorError, _catalogue, _read, release_prior
from uirl.config import SiloConfig, from_run_config, silo_from_node_config, to_run_config
from uirl.errors import ConfigError
from uirl.federated import (RELEASE_METRICS, STATUS_LEDGER_ERROR, STATUS_OK, STATUS_REPLAY_REFUSED, _worker,
                            local_release_durable, local_train_durable)
from uirl.message_names import COUNTS_ARRAY, PRIOR_ARRAY
from uirl.engine import popularity_prior
from uirl.launch.output import ConciseLog
from uirl.launch.simulation import run_simulation
from uirl.model.build import build_model
from uirl.privacy import PrivacyLedger
from uirl.privacy.ledger_file import LedgerFile
from uirl.privacy.popularity import composed_epsilon
from uirl.rundir import PRIOR_FILE, RunDirectory

_LEDGER = "uirl-privacy"  # where client/app.py keeps the ledger in the node state


@pytest.fixture
def flower_task(monkeypatch):
    """Messages built outside a Flower runtime need the identity of the task that sends them."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _context(cfg, node_id: int, partition: int, **node) -> Context:
    return Context(run_id=1, node_id=node_id, node_config={"partition-id": partition, "num-partitions": 2, **node},
                   state=RecordDict(), run_config=to_run_config(cfg))


def _silo(context: Context) -> SiloConfig:
    return silo_from_node_config(context.node_config)


def _release(context: Context) -> Message:
    return client_app(Message(RecordDict(), dst_node_id=context.node_id, message_type=RELEASE_MESSAGE), context)


def _ledger(context: Context) -> PrivacyLedger:
    return PrivacyLedger.from_json(str(context.state.config_records[_LEDGER]["ledger"]))


class _LocalGrid:
    """Routes each message to the ClientApp of the node it is addressed to, in this process."""

    def __init__(self, contexts: list[Context]) -> None:
        self.contexts = {c.node_id: c for c in contexts}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return [client_app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def test_a_silo_releases_once_into_the_ledger_its_training_composes_with(tiny_bert, flower_task):
    cfg = tiny_config(tiny_bert, **{"popularity-prior": True})
    context = _context(cfg, node_id=7, partition=0)
    reply = _release(context)
    metrics = dict(reply.content["metrics"])
    assert metrics["status"] == STATUS_OK and set(metrics) <= RELEASE_METRICS
    _, silo = _worker(cfg, _silo(context))
    counts = reply.content["arrays"][COUNTS_ARRAY].numpy()
    assert counts.shape == (len(silo.item_text),) and np.isfinite(counts).all()
    sigma = metrics["release-noise"]
    assert _ledger(context).history == [[sigma, 1.0, 1]] and _ledger(context).popularity_released
    assert metrics["epsilon"] == pytest.approx(composed_epsilon([(sigma, 1.0, 1)], delta=cfg.privacy.target_delta,
                                                                accountant=cfg.privacy.accountant))

    again = _release(context)  # asked twice in one run: refused, nothing released, nothing spent
    assert again.content["metrics"]["status"] == STATUS_REPLAY_REFUSED
    assert "twice" in again.content["error"]["message"] and "arrays" not in again.content.array_records
    assert _ledger(context).history == [[sigma, 1.0, 1]]

    # A train message carries the prior next to the adapter arrays; the silo scores with it, and its
    # DP-SGD steps compose with the release in the same ledger.
    model, _ = build_model(cfg)
    prior = np.linspace(0.0, 2.0, len(counts)).astype(np.float32)
    arrays = {name: Array(t.numpy()) for name, t in model.adapter_state().items()}
    train = Message(RecordDict({"arrays": ArrayRecord({**arrays, PRIOR_ARRAY: Array(prior)}),
                                "config": ConfigRecord({"server-round": 1, "run-name": "t"})}),
                    dst_node_id=context.node_id, message_type="train")
    trained = client_app(train, context)
    assert trained.content["metrics"]["status"] == STATUS_OK
    assert PRIOR_ARRAY not in trained.content["arrays"]
    worker, _ = _worker(cfg, _silo(context))
    assert worker.bank.prior  # the prior reached the scores
    ledger = _ledger(context)
    assert ledger.history[0] == [sigma, 1.0, 1] and len(ledger.history) == 2 and ledger.rounds == 1
    expected = composed_epsilon([tuple(entry) for entry in ledger.history], delta=cfg.privacy.target_delta,
                                accountant=cfg.privacy.accountant)
    assert trained.content["metrics"]["epsilon"] == pytest.approx(expected)
    assert sigma > 0 and expected > metrics["epsilon"]


def test_the_server_builds_the_prior_without_a_silo_that_refuses(tiny_bert, flower_task, tmp_path, capsys):
    cfg = tiny_config(tiny_bert, **{"popularity-prior": True})
    ledger_path = tmp_path / "silo-1" / "ledger.json"
    ledger_path.parent.mkdir()
    ledger_path.write_text("{not json", encoding="utf-8")  # a damaged ledger: the silo fails closed
    grid = _LocalGrid([_context(cfg, 11, 0), _context(cfg, 12, 1, **{"ledger-path": str(ledger_path)})])
    run = RunDirectory.create(tmp_path / "runs", "r", {})
    rows = []
    prior = release_prior(grid, cfg, run, on_release=rows.extend, timeout=10.0)
    shown = capsys.readouterr().out
    assert "popularity prior built without silo 1" in shown and "corrupt privacy ledger" in shown
    server_line = next(line for line in shown.splitlines() if line.startswith("uirl: popularity prior built without"))
    assert "<ledger folder>/ledger.json" in server_line and str(tmp_path) not in server_line  # no silo path leaves
    assert f"uirl: silo 1 refuses: {ledger_path}: corrupt privacy ledger" in shown  # the full text, on the silo's console
    assert "popularity prior from silo 0 over" in shown
    np.testing.assert_array_equal(np.load(run.path / PRIOR_FILE), prior)
    np.testing.assert_array_equal(run.load_prior(), prior)
    assert len(prior) == len(_worker(cfg, _silo(grid.contexts[11]))[1].item_text)
    by_silo = {int(r["silo"]): r for r in rows}
    assert by_silo[0]["accepted"] and by_silo[0]["epsilon"] > 0 and by_silo[0]["release-noise"] > 0
    assert not by_silo[1]["accepted"] and by_silo[1]["status"] == STATUS_LEDGER_ERROR
    # It released nothing: beside its ledger only the lock it held while it looked.
    assert sorted(p.name for p in ledger_path.parent.iterdir()) == ["ledger.json", "ledger.json.lock"]

    # No silo releases: the run stops with a message that says why.
    cfg = tiny_config(tiny_bert, **{"popularity-prior": True, "min-nodes": 1})
    alone = _LocalGrid([_context(cfg, 13, 0, **{"ledger-path": str(ledger_path)})])
    with pytest.raises(PriorError, match="no silo released.*silo 0: .*corrupt privacy ledger"):
        release_prior(alone, cfg, RunDirectory.create(tmp_path / "runs", "s", {}), on_release=rows.extend,
                      timeout=10.0)


def test_a_silo_that_does_not_answer_the_release_in_time_is_asked_nothing_more(tiny_bert, flower_task, tmp_path,
                                                                               capsys):
    """Its release may still be running (and would land in its node state after a newer message
    started from the state before it): the strategy sends that node no training or evaluation."""
    from server.app import _Recorder, build_strategy

    cfg = tiny_config(tiny_bert, **{"popularity-prior": True, "min-nodes": 1})

    class _SilentNode(_LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            return [client_app(m, self.contexts[m.metadata.dst_node_id]) for m in messages
                    if m.metadata.dst_node_id != 12]

    grid = _SilentNode([_context(cfg, 11, 0), _context(cfg, 12, 1)])
    run = RunDirectory.create(tmp_path / "runs", "r", {})
    silent: set[int] = set()
    prior = release_prior(grid, cfg, run, on_release=lambda rows: None, timeout=5.0, on_silent=silent.add)
    assert silent == {12} and "node 12: no reply within reply-timeout (5 s); not asked again" in capsys.readouterr().out
    model, _ = build_model(cfg)
    strategy = build_strategy(cfg, set(model.trainable_state()), _Recorder(run), prior, silent)
    arrays = ArrayRecord({n: Array(v.numpy()) for n, v in model.adapter_state().items()})
    for configure in (strategy.configure_train, strategy.configure_evaluate):
        assert [m.metadata.dst_node_id for m in configure(1, arrays, ConfigRecord(), grid)] == [11]


def test_a_silo_with_a_ledger_file_records_its_release_and_replays_it_within_the_run(tiny_bert, tmp_path):
    """The release is in the ledger file before the counts leave; asked again in the same run the
    silo sends the same counts at no new cost; a new run releases anew and the ledger composes
    both; training keeps the record; a damaged counts file makes it refuse."""
    cfg = tiny_config(tiny_bert, **{"popularity-prior": True})
    path = tmp_path / "ledger.json"
    silo = SiloConfig(partition_id=0, num_partitions=2, ledger_path=str(path))
    counts, metrics, ledger_json, error = local_release_durable(cfg, silo, ledger_json=None, run="a")
    assert error is None and counts is not None and metrics["release-noise"] > 0
    stored = LedgerFile(path).read()
    assert stored.popularity.run == "a" and stored.ledger_json == ledger_json
    assert PrivacyLedger.from_json(stored.ledger_json).epsilon() == pytest.approx(metrics["epsilon"])

    again, metrics_again, _, error = local_release_durable(cfg, silo, ledger_json=None, run="a")
    assert error is None and metrics_again == metrics
    np.testing.assert_array_equal(again, counts)  # the same noise: nothing new released or spent
    assert LedgerFile(path).read().ledger_json == ledger_json

    # Training in the same run composes with the release and keeps its record.
    model, _ = build_model(cfg)
    state = {k: v.numpy().copy() for k, v in model.trainable_state().items()}
    prior = popularity_prior([counts], [metrics["release-noise"]])  # what the server sends back
    _, trained, _, error = local_train_durable(cfg, silo, state, ledger_json=None, run="a", server_round=1,
                                               prior=prior)
    assert error is None and trained["epsilon"] > metrics["epsilon"]
    assert LedgerFile(path).read().popularity.run == "a"

    # A new run releases anew: other noise, and the ledger composes it with everything before.
    fresh, metrics_b, _, error = local_release_durable(cfg, silo, ledger_json=None, run="b")
    assert error is None and not np.array_equal(fresh, counts) and metrics_b["epsilon"] > trained["epsilon"]
    history = PrivacyLedger.from_json(LedgerFile(path).read().ledger_json).history
    assert sum(1 for sigma, rate, steps in history if rate == 1.0 and steps == 1) == 2

    # The stored counts damaged: asked again, the silo refuses rather than release something else.
    LedgerFile(path).popularity_path.write_bytes(b"damaged")
    refused, metrics_c, _, error = local_release_durable(cfg, silo, ledger_json=None, run="b")
    assert refused is None and metrics_c["status"] == STATUS_LEDGER_ERROR and "unreadable released counts" in error


def _release_reply(metrics: dict, counts: np.ndarray, *, node: int = 7, extra: dict | None = None) -> Message:
    """A release reply as a silo's ClientApp sends it (status OK, the counts as the one array record)."""
    asked = Message(RecordDict(), dst_node_id=node, message_type=RELEASE_MESSAGE)
    content = RecordDict({"metrics": MetricRecord({"status": float(STATUS_OK), **metrics}),
                          "arrays": ArrayRecord({COUNTS_ARRAY: Array(counts), **(extra or {})})})
    return Message(content, reply_to=asked)


def _honest(silo: int) -> dict:
    """The metrics of an honest release under DP."""
    return {"num-examples": 50.0, "silo": float(silo), "epsilon": 2.0, "delta": 1e-5, "target-epsilon": 8.0,
            "noise-multiplier": 0.0, "sample-rate": 0.2, "rounds-trained": 0.0, "release-noise": 1.5}


def test_counts_over_another_catalogue_are_left_out(flower_task):
    cfg = tiny_config("unused", **{"popularity-prior": True})
    answers = [_release_reply(_honest(k), np.ones(n), node=20 + k) for k, n in enumerate((5, 4, 5))]
    assert _catalogue(answers) == 5  # the size most releasing silos share
    kept = [_read(cfg, msg, _catalogue(answers)) for msg in answers]
    assert [r.counts is not None for r in kept] == [True, False, True]
    assert not kept[1].metrics["accepted"] and "cover 4 items" in kept[1].why and "catalogue 5" in kept[1].why
    assert kept[1].who == "silo 1" and kept[1].metrics["node-id"] == 21


@pytest.mark.parametrize("metrics, counts, extra, why", [
    ({"silo": float("nan")}, np.ones(3), None, "silo = nan is not finite"),
    ({"epsilon": float("nan")}, np.ones(3), None, "epsilon = nan is not finite"),
    ({"release-noise": 1.0}, np.array([1.0, np.inf, 0.0]), None, "1 count(s) not finite"),
    ({"release-noise": -1.0}, np.ones(3), None, "release-noise = -1 is not a number in [0, inf]"),
    ({"release-noise": 0.0}, np.ones(3), None, "not a valid noise level under DP"),
    ({}, np.ones(3), {"extra": Array(np.ones(2))}, "extra ['extra']"),
    ({"auc": 0.5}, np.ones(3), None, "extra ['auc']"),
])
def test_a_bad_release_reply_is_left_out_with_its_reason(flower_task, metrics, counts, extra, why):
    """A release reply with a non-number, a non-finite label, non-finite counts, an impossible noise
    level or something an honest silo never sends never reaches the prior; its row names the node and
    the reason (the check itself: :func:`uirl.replies.check_release`, tests/test_release_replies.py)."""
    cfg = tiny_config("unused", **{"popularity-prior": True})
    reply = _read(cfg, _release_reply({**_honest(0), **metrics}, counts, extra=extra), 3)
    assert reply.counts is None and not reply.metrics["accepted"] and why in reply.why
    assert reply.metrics["node-id"] == 7 and reply.who == ("node 7" if "silo" in metrics else "silo 0")
    assert _read(cfg, _release_reply(_honest(0), np.ones(3)), 3).metrics["accepted"]  # the honest one passes


def test_popularity_prior_with_secagg_needs_dp():
    with pytest.raises(ConfigError, match="popularity-prior.*in the clear"):
        from_run_config({"popularity-prior": True, "secagg": True, "dp": False})
    assert from_run_config({"popularity-prior": True, "secagg": True, "dp": True}).model.popularity_prior
    assert not from_run_config({"popularity-prior": True, "dp": False}).privacy.enabled


def test_flwr_run_with_the_popularity_prior_under_dp(tmp_path, tiny_bert):
    log = io.StringIO()
    run_config = (f"model-name='{tiny_bert}' num-server-rounds=2 synthetic-users=90 synthetic-items=300 "
                  f"max-history=4 eval-negatives=9 batch-users=8 lora-r=4 max-tokens=16 popularity-prior=true "
                  f"eval-every=2 run-dir='{tmp_path / 'runs'}' run-name='prior'")
    result = run_simulation(supernodes=3, run_config=run_config, cpus_per_client=1,
                            flwr_home=tmp_path / "flwr-home", log=ConciseLog(log))
    assert result.status == "finished:completed", result.text[-3000:]
    run = tmp_path / "runs" / "prior"
    assert "popularity prior from silo 0, silo 1, silo 2 over 300 items" in result.text
    assert np.load(run / PRIOR_FILE).shape == (300,)
    # The final model carries the prior it scores with (uirl recommend/embed and exports read it).
    np.testing.assert_array_equal(np.load(run / "final" / PRIOR_FILE), np.load(run / PRIOR_FILE))
    privacy = [json.loads(line) for line in (run / "privacy.jsonl").read_text().splitlines()]
    # Rows are keyed by Flower's node id; each carries its silo's label.
    released = {int(r["silo"]): r for r in privacy if r["round"] == 0}
    assert sorted(released) == [0, 1, 2]
    assert all(r["epsilon"] > 0 and r["release-noise"] > 0 and r["accepted"] for r in released.values())
    assert len({r["node-id"] for r in released.values()}) == 3
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    assert sorted(ledger) == sorted(str(r["node-id"]) for r in released.values())
    for node, entry in ledger.items():
        release = released[int(entry["silo"])]
        assert str(release["node-id"]) == node
        assert entry["rounds-trained"] == 2 and release["epsilon"] < entry["epsilon"] <= entry["target-epsilon"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["epsilon"] == max(r["epsilon"] for r in released.values())  # round 0: after the release
    assert "auc" not in rows[1] and rows[1]["silos-trained"] == 3  # eval-every=2: round 1 is not evaluated
    assert all(0.0 <= rows[r]["auc"] <= 1.0 for r in (0, 2))
