"""ClientApp: one data silo. Reads its config, runs uirl's local round, replies with records.

Train and evaluate messages carry only the global model's trainable arrays; the silo's model has
the frozen ones from the base model and the run's seed. The reply carries what
:func:`uirl.federated.released_update` makes of the trained arrays (with run config ``compression``:
the update delta in float16 or int8), the same function the in-process engine calls.

The silo's privacy ledger lives in ``context.state`` (node state, kept across rounds of a run)
and, when the node config names ``ledger-path``, in that file on the silo's disk, written before
the update leaves the silo (see :mod:`uirl.privacy.ledger_file`). A refusal carries its reason in
the reply's ``error`` config record, next to the numeric ``status`` metric. In runs with ``secagg``
the same round's update leaves the silo only masked, through Flower's SecAgg+ mod
(:mod:`client.secagg`).

With ``popularity-prior`` the server first sends a query (action :data:`~uirl.message_names.RELEASE_ACTION`,
see :mod:`server.popularity`): the silo releases its item counts once, recorded in the same ledger
its DP-SGD steps later compose with. Every later train and evaluate message carries the prior the
server built, next to the adapter arrays. With distributed noise (``popularity-noise-shares`` > 1) the
release is a SecAgg+ train round instead (:func:`client.secagg.secagg_train` tells it by its config):
the silo's share leaves only masked.

If anything here raises, the server learns only the exception's class name; the traceback stays in
the silo's own log (:mod:`client.failures`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.failures import contain_failures
from client.secagg import secagg_train, secagg_when_configured
from uirl.config import Config, SiloConfig, from_run_config, silo_from_node_config
from uirl.errors import EvaluationWithheld
from uirl.message_names import COUNTS_ARRAY, PRIOR_ARRAY, RELEASE_ACTION
from uirl.silo_worker import run_call, worker_dir

# contain_failures first, so that it wraps everything after it: a failure anywhere in the silo's
# code, SecAgg+'s mod included, reaches the server as the exception's class name only.
app = ClientApp(mods=[contain_failures, secagg_when_configured])

_LEDGER = "uirl-privacy"


def _global_state(msg: Message) -> dict:
    return {name: array.numpy() for name, array in msg.content["arrays"].items()}


def _split_prior(received: dict) -> tuple[dict, np.ndarray | None]:
    """(the adapter state, the popularity prior or None): the prior travels among the arrays."""
    state = dict(received)
    return state, state.pop(PRIOR_ARRAY, None)


def _say(line: str) -> None:
    print(line, flush=True)  # the silo's progress within a round: Flower forwards it to the run's log


def _call(context: Context, name: str, *args, **kwargs):
    """The silo call ``name`` (:data:`uirl.silo_worker.CALLS`), in the silo worker the node config
    names (``silo-worker``) or else in this process."""
    return run_call(worker_dir(context.node_config), name, *args, **kwargs)


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


def _keep_ledger(context: Context, ledger: str | None) -> None:
    if ledger is not None:
        context.state[_LEDGER] = ConfigRecord({"ledger": ledger})


def _train_round(cfg: Config, silo: SiloConfig, context: Context, received: dict, config
                 ) -> tuple[dict | None, dict[str, float], str | None]:
    global_state, prior = _split_prior(received)
    arrays, metrics, ledger, error = _call(
        context, "train", cfg, silo, global_state, ledger_json=_state_ledger(context),
        run=str(config.get("run-name", "")), server_round=int(config["server-round"]),
        expected_rounds=_expected_rounds(config, silo.partition_id), prior=prior, say=_say)
    _keep_ledger(context, ledger)
    return arrays, metrics, error


def _reply(msg: Message, arrays: dict | None, metrics: dict[str, float], error: str | None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if error is not None:
        content["error"] = ConfigRecord({"message": error})
    if arrays is not None:
        content["arrays"] = ArrayRecord({name: Array(value) for name, value in arrays.items()})
    return Message(content=content, reply_to=msg)


def _release(cfg: Config, silo: SiloConfig, context: Context, run: str
             ) -> tuple[np.ndarray | None, dict[str, float], str | None]:
    counts, metrics, ledger, error = _call(context, "release", cfg, silo, ledger_json=_state_ledger(context), run=run)
    _keep_ledger(context, ledger)
    return counts, metrics, error


@app.query(RELEASE_ACTION)
def release(msg: Message, context: Context) -> Message:
    """The silo's one popularity release of the run (noised and in its ledger under DP)."""
    cfg = from_run_config(context.run_config)
    silo = silo_from_node_config(context.node_config)
    config = msg.content.config_records.get("config", ConfigRecord())
    counts, metrics, error = _release(cfg, silo, context, str(config.get("run-name", "")))
    return _reply(msg, None if counts is None else {COUNTS_ARRAY: counts}, metrics, error)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = from_run_config(context.run_config)
    silo = silo_from_node_config(context.node_config)
    if cfg.federation.secagg:  # the update leaves only masked (client/secagg.py)
        return secagg_train(msg, cfg, lambda state, config: _train_round(cfg, silo, context, state, config),
                            lambda run: (*_release(cfg, silo, context, run),
                                         _call(context, "catalogue-size", cfg, silo)))
    arrays, metrics, error = _train_round(cfg, silo, context, _global_state(msg), msg.content["config"])
    return _reply(msg, arrays, metrics, error)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = from_run_config(context.run_config)
    silo = silo_from_node_config(context.node_config)
    global_state, prior = _split_prior(_global_state(msg))
    try:  # with local-prior the arrays also carry the released sum the prior was built from
        metrics = _call(context, "evaluate", cfg, silo, global_state, prior=prior)
    except EvaluationWithheld as why:  # too few users to report: the reason, and no numbers
        return Message(content=RecordDict({"error": ConfigRecord({"message": str(why)})}), reply_to=msg)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
