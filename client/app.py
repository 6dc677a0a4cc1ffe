"""ClientApp: one data silo. Reads its config, runs uirl's local round, replies with records.

The silo's privacy ledger lives in ``context.state`` (node state, kept across rounds of a run)
and, when the node config names ``ledger-path``, in that file on the silo's disk, written before
the update leaves the silo (see :mod:`uirl.privacy.ledger_file`). A refusal carries its reason in
the reply's ``error`` config record, next to the numeric ``status`` metric. In runs with ``secagg``
the same round's update leaves the silo only masked, through Flower's SecAgg+ mod
(:mod:`client.secagg`).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secagg import secagg_train, secagg_when_configured
from uirl.config import Config, SiloConfig, from_run_config, silo_from_node_config
from uirl.federated import local_evaluate, local_train_durable

app = ClientApp(mods=[secagg_when_configured])

_LEDGER = "uirl-privacy"


def _global_state(msg: Message) -> dict:
    return {name: array.numpy() for name, array in msg.content["arrays"].items()}


def _state_ledger(context: Context) -> str | None:
    if _LEDGER in context.state.config_records:
        return str(context.state.config_records[_LEDGER]["ledger"])
    return None


def _expected_rounds(config: ConfigRecord, silo: int) -> int:
    """Rounds the server recorded this silo as trained ("silo:rounds,..."; set after a resume)."""
    for pair in str(config.get("silo-rounds", "")).split(","):
        if pair.partition(":")[0] == str(silo):
            return int(pair.partition(":")[2])
    return 0


def _train_round(cfg: Config, silo: SiloConfig, context: Context, global_state: dict, config
                 ) -> tuple[dict | None, dict[str, float], str | None]:
    arrays, metrics, ledger, error = local_train_durable(
        cfg, silo, global_state, ledger_json=_state_ledger(context),
        run=str(config.get("run-name", "")), server_round=int(config["server-round"]),
        expected_rounds=_expected_rounds(config, silo.partition_id))
    if ledger is not None:
        context.state[_LEDGER] = ConfigRecord({"ledger": ledger})
    return arrays, metrics, error


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = from_run_config(context.run_config)
    silo = silo_from_node_config(context.node_config)
    if cfg.federation.secagg:  # the update leaves only masked (client/secagg.py)
        return secagg_train(msg, cfg, lambda state, config: _train_round(cfg, silo, context, state, config))
    arrays, metrics, error = _train_round(cfg, silo, context, _global_state(msg), msg.content["config"])
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if error is not None:
        content["error"] = ConfigRecord({"message": error})
    if arrays is not None:
        content["arrays"] = ArrayRecord({name: Array(value) for name, value in arrays.items()})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = from_run_config(context.run_config)
    silo = silo_from_node_config(context.node_config)
    metrics = local_evaluate(cfg, silo, _global_state(msg))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
