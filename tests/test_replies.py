"""A hostile or broken silo's reply, against the ServerApp's strategy in process (Flower Message
objects built by hand, the real run directory): it is dropped or capped, the reason is recorded,
the aggregate stays that of the honest silos, and a round with too few valid updates fails the run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.app import _Recorder, _silo_rounds, build_strategy
from uirl.aggregation import fedavg, require_finite
from uirl.config import from_run_config
from uirl.errors import RunFailed
from uirl.federated import KEPT_UNDER_DP, STATUS_BUDGET_EXHAUSTED, STATUS_LEDGER_ERROR, TRAIN_METRICS
from uirl.replies import ReplyChecker, ReplyRejected
from uirl.rundir import RunDirectory

NODES = [101, 102, 103, 104, 105]  # Flower node ids; silo k runs on NODES[k]
GLOBAL = {"a": np.ones((2, 3), np.float32), "b": np.zeros(6, np.float32)}  # a: frozen (FFA-LoRA's A)
TRAINABLE = {"b"}
CFG = from_run_config({"min-nodes": 3})


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """What Flower sets in a ServerApp process; a Message cannot be built without it."""
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class _Grid:
    """What FedAvg's sampling asks of a Grid."""

    def get_node_ids(self):
        return list(NODES)


def _metrics(k: int, server_round: int, **changes) -> dict:
    """Silo ``k``'s honest training metrics in ``server_round`` under DP (no loss, no sample size:
    they stay on the silo), with ``changes`` (None: key left out)."""
    honest = {"num-examples": 100.0, "silo": float(k), "status": 0.0, "steps": 4.0,
              "epsilon": 0.5 * server_round, "delta": 1e-5, "target-epsilon": 8.0,
              "noise-multiplier": 1.1, "sample-rate": 0.3, "rounds-trained": float(server_round), "replayed": 0.0}
    assert set(honest) == TRAIN_METRICS - KEPT_UNDER_DP
    honest.update(changes)
    return {k: v for k, v in honest.items() if v is not None}


def _update(silo: int) -> dict[str, np.ndarray]:
    return {"b": (GLOBAL["b"] + 1e-4 * (silo + 1) * np.arange(1, 7)).astype(np.float32)}


def _content(metrics, arrays) -> RecordDict:
    content = RecordDict({"metrics": MetricRecord(metrics)} if isinstance(metrics, dict) else
                         {f"metrics-{i}": MetricRecord(m) for i, m in enumerate(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord({n: Array(v) for n, v in arrays.items()})
    return content


#: A silo that sends no reply (Flower's ``send_and_receive`` returned without it).
SILENT = object()


class Federation:
    """The ServerApp's strategy and recorder over a run directory, fed hand-made replies."""

    def __init__(self, tmp_path, cfg=CFG):
        self.run = RunDirectory.create(tmp_path, "r", {})
        self.strategy = build_strategy(cfg, TRAINABLE, _Recorder(self.run))
        self.arrays = ArrayRecord({n: Array(v) for n, v in GLOBAL.items()})

    def train(self, server_round: int, bad: dict | None = None) -> dict[str, np.ndarray]:
        """One round; ``bad`` maps a silo to (metrics, arrays) or to an Error in place of its honest
        reply, or to :data:`SILENT` (no reply: it did not answer within ``reply-timeout``)."""
        sent = list(self.strategy.configure_train(server_round, self.arrays, ConfigRecord(), _Grid()))
        replies = []
        for msg in sent:
            silo = NODES.index(msg.metadata.dst_node_id)
            reply = (bad or {}).get(silo, (_metrics(silo, server_round), _update(silo)))
            if reply is SILENT:
                continue
            replies.append(Message(reply, reply_to=msg) if isinstance(reply, Error)
                           else Message(_content(*reply), reply_to=msg))
        new, _ = self.strategy.aggregate_train(server_round, replies)
        return {n: a.numpy() for n, a in new.items()}

    def evaluate(self, server_round: int, bad: dict | None = None) -> dict:
        sent = list(self.strategy.configure_evaluate(server_round, self.arrays, ConfigRecord(), _Grid()))
        replies = []
        for msg in sent:
            silo = NODES.index(msg.metadata.dst_node_id)
            reply = (bad or {}).get(silo, _eval_metrics(silo))
            replies.append(Message(reply if isinstance(reply, RecordDict) else _content(reply, None), reply_to=msg))
        self.strategy.aggregate_evaluate(server_round, replies)
        return self.run.rounds[-1]

    def privacy_rows(self) -> list[dict]:
        return [json.loads(line) for line in (self.run.path / "privacy.jsonl").read_text().splitlines()]


def _eval_metrics(silo: int) -> dict:
    return {"num-examples": 50.0, "silo": float(silo), "auc": 0.6 + 0.01 * silo, "mrr": 0.3,
            "ndcg@5": 0.3, "ndcg@10": 0.35, "recall@5": 0.4, "recall@10": 0.5}


def _clean(silos) -> dict[str, np.ndarray]:
    return {"a": GLOBAL["a"], **fedavg([_update(k) for k in silos], [100.0] * len(silos))}


HOSTILE = {
    "num-examples NaN": (lambda r: (_metrics(4, r, **{"num-examples": math.nan}), _update(4)), "not finite"),
    "num-examples inf": (lambda r: (_metrics(4, r, **{"num-examples": math.inf}), _update(4)), "not finite"),
    "num-examples negative": (lambda r: (_metrics(4, r, **{"num-examples": -100.0}), _update(4)), "num-examples"),
    "num-examples zero": (lambda r: (_metrics(4, r, **{"num-examples": 0.0}), _update(4)), "num-examples"),
    "an extra metric": (lambda r: (_metrics(4, r, bonus=1.0), _update(4)), "extra ['bonus']"),
    "a missing metric": (lambda r: (_metrics(4, r, steps=None), _update(4)), "missing ['steps']"),
    "a train-loss under DP": (lambda r: (_metrics(4, r, **{"train-loss": 2.0}), _update(4)), "extra ['train-loss']"),
    "a sample size under DP": (lambda r: (_metrics(4, r, **{"users-sampled": 9.0}), _update(4)),
                               "extra ['users-sampled']"),
    "two metric records": (lambda r: ([_metrics(4, r), _metrics(4, r)], _update(4)), "2 metric records"),
    "silo NaN": (lambda r: (_metrics(4, r, silo=math.nan), _update(4)), "silo = nan"),
    "silo inf": (lambda r: (_metrics(4, r, silo=math.inf), _update(4)), "silo = inf"),
    "rounds-trained inf": (lambda r: (_metrics(4, r, **{"rounds-trained": math.inf}), _update(4)), "not finite"),
    "rounds-trained shrinks": (lambda r: (_metrics(4, r, **{"rounds-trained": 0.0}), _update(4)), "went from 1"),
    "a list for a number": (lambda r: (_metrics(4, r, epsilon=[1.0, 2.0]), _update(4)), "not a number"),
    "an unknown status": (lambda r: (_metrics(4, r, status=7.0), _update(4)), "status"),
    "NaN in the update": (lambda r: (_metrics(4, r), {"b": np.full(6, np.nan, np.float32)}), "non-finite"),
    "a too long update": (lambda r: (_metrics(4, r), {"b": np.full(6, 10.0, np.float32)}), "exceeds max-update-norm"),
    "the frozen arrays too": (lambda r: (_metrics(4, r), {**GLOBAL, **_update(4)}), "extra ['a']"),
    "float64 arrays": (lambda r: (_metrics(4, r), {"b": _update(4)["b"].astype(np.float64)}), "float64"),
    "a refusal with arrays": (lambda r: (_metrics(4, r, status=1.0), _update(4)), "carries arrays"),
    "a crashed ClientApp": (lambda r: Error(code=0, reason="boom"), "the ClientApp failed: boom"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_bad_reply_is_dropped_the_round_goes_on_and_the_reason_is_recorded(tmp_path, case):
    make, reason = HOSTILE[case]
    fed = Federation(tmp_path)
    fed.train(1)  # every node replies honestly once: its label and first count are known
    new = fed.train(2, bad={4: make(2)})
    for name, value in _clean([0, 1, 2, 3]).items():  # the honest silos' FedAvg, frozen A untouched
        np.testing.assert_allclose(new[name], value, rtol=1e-6)
    rejected = [row for row in fed.privacy_rows() if "rejected" in row]
    assert len(rejected) == 1 and reason in rejected[0]["rejected"], rejected
    assert rejected[0]["node-id"] == str(NODES[4]) and rejected[0]["round"] == 2 and rejected[0]["silo"] == 4
    assert fed.run.ledger[str(NODES[4])]["round"] == 1  # nothing it said reached the ledger
    row = fed.evaluate(2)
    assert (row["silos-trained"], row["silos-replied"], row["silos-rejected"]) == (4, 5, 1)
    assert math.isnan(row["train-loss"])  # under DP no silo tells its loss


def test_a_silo_that_sends_no_reply_in_time_is_named_and_counted(tmp_path, monkeypatch):
    """A silo missing from a round's replies (past ``reply-timeout``) is named on the console, has
    no row, and the round row counts it; too many such silos fail the round, saying so."""
    import server.strategy
    from uirl.tables import round_line

    said = []
    monkeypatch.setattr(server.strategy, "log_warning", said.append)
    fed = Federation(tmp_path)
    fed.train(1)
    new = fed.train(2, bad={4: SILENT})
    for name, value in _clean([0, 1, 2, 3]).items():
        np.testing.assert_allclose(new[name], value, rtol=1e-6)
    assert any(line.startswith(f"round 2: node {NODES[4]} (silo 4) sent no train reply within reply-timeout "
                               "(3600 s): left out of the round and not asked again in this run") for line in said)
    assert not [r for r in fed.privacy_rows() if r["round"] == 2 and r["node-id"] == str(NODES[4])]
    row = fed.evaluate(2)
    assert (row["silos-trained"], row["silos-replied"], row["silos-rejected"], row["silos-no-reply"]) == (4, 4, 0, 1)
    assert "silos=4/4 (1 no reply)" in round_line(row)
    # Silo 4's late message may still be running: it is sent nothing more in this run, and counts
    # as asked and silent, so that min-nodes still misses it.
    sent = [m.metadata.dst_node_id for m in fed.strategy.configure_train(3, fed.arrays, ConfigRecord(), _Grid())]
    assert sorted(sent) == sorted(NODES[:4])
    with pytest.raises(RunFailed, match=r"2 valid update\(s\) from 5 silo\(s\) asked.*0 refused, 3 sent no reply "
                                        r"within reply-timeout"):
        fed.train(3, bad={2: SILENT, 3: SILENT})


@pytest.mark.parametrize("value, expected", [(0, "a number of seconds > 0"), (-1.0, "a number of seconds > 0"),
                                             (math.inf, "a finite number"), ("soon", "a number")])
def test_reply_timeout_must_be_a_positive_number_of_seconds(value, expected):
    from uirl.errors import ConfigError

    with pytest.raises(ConfigError, match=f"field 'reply-timeout' = .*: expected {expected}"):
        from_run_config({"reply-timeout": value})
    assert from_run_config({"reply-timeout": 2.5}).federation.reply_timeout == 2.5
    assert from_run_config({}).federation.reply_timeout == 3600.0


def test_a_count_above_the_first_one_is_capped(tmp_path):
    fed = Federation(tmp_path)
    fed.train(1)
    new = fed.train(2, bad={4: (_metrics(4, 2, **{"num-examples": 1e12}), _update(4))})
    for name, value in _clean([0, 1, 2, 3, 4]).items():  # weighted as its first report, 100
        np.testing.assert_allclose(new[name], value, rtol=1e-6)
    entry = fed.run.ledger[str(NODES[4])]
    assert entry["accepted"] and "weighted as 100" in entry["notes"]


def test_a_spoofed_silo_id_never_overwrites_the_honest_silos_ledger_row(tmp_path):
    fed = Federation(tmp_path)
    fed.train(1)
    # Node 105 claims to be silo 0 with an absurd round count: rejected outright.
    fed.train(2, bad={4: (_metrics(0, 2, **{"rounds-trained": 1e9}), _update(4))})
    assert fed.run.ledger[str(NODES[0])]["rounds-trained"] == 2 and fed.run.ledger[str(NODES[0])]["silo"] == 0
    assert [r["rejected"] for r in fed.privacy_rows() if "rejected" in r] == [
        "rounds-trained went from 1 (round 1) to 1e+09 in round 2"]
    # ... with plausible numbers: accepted on its merits, but it keeps its own label, and silo 0's row is silo 0's.
    fed.train(3, bad={4: (_metrics(0, 3, epsilon=7.5), _update(4))})
    assert fed.run.ledger[str(NODES[0])]["epsilon"] == 1.5
    assert fed.run.ledger[str(NODES[4])]["silo"] == 4 and "said silo 4 before" in fed.run.ledger[str(NODES[4])]["notes"]
    assert _silo_rounds(fed.run.ledger) == "0:3,1:3,2:3,3:3,4:3"


def test_a_new_node_cannot_take_a_label_another_node_holds(tmp_path):
    checker = ReplyChecker(CFG, TRAINABLE)
    checker.train(1, 1, [_metrics(0, 1)], [_update(0)], GLOBAL)
    reply = checker.train(2, 1, [_metrics(0, 1)], [_update(1)], GLOBAL)
    assert reply.silo is None and "the label of node 1" in reply.notes[0]


def test_a_ledger_carried_over_from_earlier_runs_is_not_a_lie():
    """``rounds-trained`` counts the silo's lifetime rounds (its ledger file outlives runs): a silo in
    its second run reports more rounds than this run has had, then one more per round."""
    checker = ReplyChecker(CFG, TRAINABLE)
    for server_round in (1, 2):
        checker.train(1, server_round, [_metrics(0, server_round, **{"rounds-trained": 5.0 + server_round})],
                      [_update(0)], GLOBAL)
    with pytest.raises(ReplyRejected, match="went from 7"):
        checker.train(1, 3, [_metrics(0, 3, **{"rounds-trained": 9.0})], [_update(0)], GLOBAL)


def test_refusals_are_recorded_not_averaged_and_keep_the_silos_last_spend(tmp_path):
    fed = Federation(tmp_path)
    fed.train(1)
    spent = _metrics(3, 2, status=float(STATUS_BUDGET_EXHAUSTED), steps=0.0, epsilon=0.5,
                     **{"rounds-trained": 1.0})
    lost = {"status": float(STATUS_LEDGER_ERROR), "silo": 4.0, "steps": 0.0}
    new = fed.train(2, bad={3: (spent, None), 4: (lost, None)})
    for name, value in _clean([0, 1, 2]).items():
        np.testing.assert_allclose(new[name], value, rtol=1e-6)
    assert fed.run.ledger[str(NODES[4])]["epsilon"] == 0.5  # the refusal carried none: the last known one
    assert not any("rejected" in row for row in fed.privacy_rows())
    row = fed.evaluate(2)
    assert (row["silos-trained"], row["silos-replied"], row["silos-rejected"]) == (3, 5, 0)


def test_evaluation_drops_an_out_of_range_auc_and_weighs_by_the_capped_count(tmp_path):
    fed = Federation(tmp_path)
    fed.train(1)
    honest = fed.evaluate(1)
    assert honest["auc"] == pytest.approx(0.62)
    bad = {4: {"num-examples": 50.0, "silo": 4.0, "auc": 999.0, "mrr": 0.3, "ndcg@5": 0.3, "ndcg@10": 0.35,
               "recall@5": 0.4, "recall@10": 0.5},
           3: {"num-examples": 1e9, "silo": 3.0, "auc": 1.0, "mrr": 0.3, "ndcg@5": 0.3, "ndcg@10": 0.35,
               "recall@5": 0.4, "recall@10": 0.5}}
    fed.train(2)
    row = fed.evaluate(2, bad=bad)
    assert row["auc"] == pytest.approx((0.60 + 0.61 + 0.62 + 1.0) / 4)  # silo 3 weighted as its first 50
    rejected = [r for r in fed.privacy_rows() if "rejected" in r]
    assert [(r["task"], r["node-id"]) for r in rejected] == [("evaluate", str(NODES[4]))]
    assert "auc = 999 is not a number in [0, 1]" in rejected[0]["rejected"]


def test_a_withheld_evaluation_is_recorded_with_the_silos_reason(tmp_path):
    """A silo with fewer than eval-min-users users sends its reason and no numbers (client/app.py):
    recorded as withheld, the others' metrics averaged."""
    fed = Federation(tmp_path)
    fed.train(1)
    why = "silo 4 evaluates 3 users, fewer than eval-min-users 10: it reports no evaluation metrics"
    row = fed.evaluate(1, bad={4: RecordDict({"error": ConfigRecord({"message": why})})})
    assert row["auc"] == pytest.approx(0.615)  # silos 0..3
    rejected = [r for r in fed.privacy_rows() if "rejected" in r]
    assert [(r["task"], r["rejected"]) for r in rejected] == [("evaluate", f"withheld: {why}")]


def test_fewer_valid_updates_than_min_nodes_fail_the_round_after_recording_it(tmp_path):
    fed = Federation(tmp_path)
    zero = {k: (_metrics(k, 1, **{"num-examples": 0.0}), _update(k)) for k in range(5)}  # weights summing to 0
    with pytest.raises(RunFailed, match=r"round 1: 0 valid update\(s\) from 5 silo\(s\) asked, fewer than the 3"):
        fed.train(1, bad=zero)
    assert len([r for r in fed.privacy_rows() if "rejected" in r]) == 5
    crashed = {k: Error(code=0, reason="boom") for k in (0, 1, 2)}
    fed = Federation(tmp_path / "again")
    with pytest.raises(RunFailed, match="3 reply"):
        fed.train(1, bad=crashed)


def test_an_aggregate_that_is_not_finite_is_never_applied(tmp_path, monkeypatch):
    import uirl.aggregation

    # The combining rule itself goes wrong: the strategy's check of its result must catch it.
    monkeypatch.setattr(uirl.aggregation, "combine", lambda *a, **k: {"b": np.full(6, np.inf, np.float32)})
    with pytest.raises(RunFailed, match="the aggregate was not applied: b: non-finite"):
        Federation(tmp_path).train(1)
    with pytest.raises(RunFailed, match="non-finite values"):
        require_finite({"b": np.array([0.0, np.nan])})


def test_checker_accepts_every_reply_an_honest_silo_sends(tiny_bert):
    """The key sets of :data:`uirl.federated.TRAIN_REPLY_KEYS` are what uirl.federated really sends:
    a trained round with and without DP, a spent budget, a refusal before the ledger is read."""
    from helpers import tiny_config
    from uirl.config import SiloConfig
    from uirl.federated import local_evaluate, local_train, local_train_durable
    from uirl.model.build import build_model

    silo = SiloConfig(partition_id=0, num_partitions=2)
    model, _ = build_model(tiny_config(tiny_bert))
    state = {k: v.numpy().copy() for k, v in model.adapter_state().items()}
    trainable = set(model.trainable_state())
    for dp in (True, False):
        cfg = tiny_config(tiny_bert, dp=dp)
        arrays, metrics, _ = local_train(cfg, silo, state, ledger_json=None, server_round=1)
        checker = ReplyChecker(cfg, trainable)
        assert checker.train(7, 1, [metrics], [arrays], state).update is not None
        assert checker.evaluate(7, [local_evaluate(cfg, silo, state)]).weight > 0
    cfg = tiny_config(tiny_bert, **{"target-epsilon": 0.01, "noise-multiplier": 0.5})
    none, spent, _ = local_train(cfg, silo, state, ledger_json=None, server_round=1)
    assert none is None and spent["status"] == STATUS_BUDGET_EXHAUSTED
    assert not ReplyChecker(cfg, trainable).train(7, 1, [spent], [], state).trained
    none, refused, _, why = local_train_durable(tiny_config(tiny_bert), silo, state, ledger_json=None, run="r",
                                                server_round=2, expected_rounds=1)
    assert none is None and "lost" in why
    assert not ReplyChecker(cfg, trainable).train(7, 2, [refused], [], state).trained
    with pytest.raises(ReplyRejected, match="epsilon = inf is not finite"):  # under DP, a silo without it
        kept_private = {k: v for k, v in metrics.items() if k not in KEPT_UNDER_DP}
        ReplyChecker(cfg, trainable).train(7, 1, [{**kept_private, **{k: 1.0 for k in (
            "target-epsilon", "sample-rate", "rounds-trained")}}], [arrays], state)


def test_the_strategy_and_the_engine_share_one_round_function(tmp_path):
    """The ServerApp's strategy, fed Flower messages, does exactly what :func:`uirl.rounds.train_round`
    does with the same replies as plain data (what the in-process engine hands it): the same
    aggregate, the same rows, the same round row."""
    from uirl.rounds import SiloReply, round_summary, train_round

    fed = Federation(tmp_path)
    checker = ReplyChecker(CFG, TRAINABLE)
    for server_round in (1, 2):
        bad = {4: (_metrics(4, server_round, **{"num-examples": math.nan}), _update(4))} if server_round == 2 else {}
        via_flower = fed.train(server_round, bad=bad)
        replies = [bad.get(k, (_metrics(k, server_round), _update(k))) for k in range(5)]
        plain = train_round(CFG, checker, GLOBAL, server_round,
                            [SiloReply(NODES[k], [m], [a]) for k, (m, a) in enumerate(replies)], asked=5)
        for name, value in plain.new.items():
            np.testing.assert_array_equal(via_flower[name], value)
    assert plain.trained == 4 and "not finite" in plain.rows[4]["rejected"]
    row = fed.evaluate(2)
    assert {k: row[k] for k in round_summary(plain.rows)} == round_summary(plain.rows)


def test_the_engine_fails_a_run_in_which_no_silo_trained(tiny_bert):
    """As the ServerApp does: every silo refuses (its budget cannot afford one round), so the
    in-process run stops with RunFailed instead of evaluating an untrained model as if trained."""
    from helpers import tiny_config
    from uirl.engine import run_federated

    cfg = tiny_config(tiny_bert, **{"target-epsilon": 0.01, "noise-multiplier": 0.5})
    with pytest.raises(RunFailed, match=r"round 1: 0 valid update\(s\) from 2 silo\(s\) asked.*2 refused"):
        run_federated(cfg, 2)
