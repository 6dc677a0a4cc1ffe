"""ClientApp: one data silo. Reads its config, runs uirl's local round, replies with records.

The silo's privacy ledger lives in ``context.state`` (node state, kept across rounds in
simulation) and, when the node config names ``ledger-path``, in that file on the silo's disk.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from uirl.config import from_run_config, silo_from_node_config
from uirl.federated import local_evaluate, local_train
from uirl.rundir import atomic_write_text

app = ClientApp()

_LEDGER = "uirl-privacy"


def _global_state(msg: Message) -> dict:
    return {name: array.numpy() for name, array in msg.content["arrays"].items()}


def _read_ledger(context: Context, ledger_path: str | None) -> str | None:
    if ledger_path and Path(ledger_path).exists():
        return Path(ledger_path).read_text(encoding="utf-8")
    if _LEDGER in context.state.config_records:
        return str(context.state.config_records[_LEDGER]["ledger"])
    return None


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = from_run_config(context.run_config)
    silo = silo_from_node_config(context.node_config)
    server_round = int(msg.content["config"]["server-round"])
    arrays, metrics, ledger = local_train(cfg, silo, _global_state(msg),
                                          ledger_json=_read_ledger(context, silo.ledger_path),
                                          server_round=server_round)
    if ledger is not None:
        context.state[_LEDGER] = ConfigRecord({"ledger": ledger})
        if silo.ledger_path:
            atomic_write_text(Path(silo.ledger_path), ledger)
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord({name: Array(value) for name, value in arrays.items()})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = from_run_config(context.run_config)
    silo = silo_from_node_config(context.node_config)
    metrics = local_evaluate(cfg, silo, _global_state(msg))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
