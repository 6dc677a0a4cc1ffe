"""A ClientApp for the fault matrix (tests/test_flower_faults.py): the real one, with a hostile or
broken silo on some partitions.

Not part of the product. The test copies this file into a Flower app directory of its own, whose
``pyproject.toml`` names ``faulty_silo:app`` as the ClientApp, and writes the plan next to it
(``faults.json``: which partition does what in which round). Every message goes through the real
ClientApp (``client.app.app``, as installed): this module only breaks things around it -- before
it (a hang), inside it (the training raises), or in the reply it produced (a lie).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

import client.app as real
from uirl.aggregation import honest_update_norm
from uirl.config import from_run_config
from uirl.message_names import RELEASE_ACTION

PLAN = json.loads((Path(__file__).parent / "faults.json").read_text(encoding="utf-8"))

#: What the failing training raises: a message with a local path and a user id, as a real one might.
SECRET = "cannot read /srv/silo-data/events.jsonl line 7: user 'secret-user-42'"

app = ClientApp()


def _fault(msg: Message, context: Context) -> tuple[str | None, int, int]:
    silo = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    return PLAN["faults"].get(f"{silo}:{server_round}"), silo, server_round


def _hang(context: Context) -> None:
    """Go on only after the server has given up on this round: ``reply-timeout`` seconds after it
    sent the message, which was before this silo got it."""
    time.sleep(from_run_config(context.run_config).federation.reply_timeout + 10)


def _raising(*args, **kwargs):
    raise ValueError(SECRET)


def _scaled(msg: Message, reply: Message, context: Context, *, to_bound: float | None, factor: float) -> None:
    """Scale the update (new minus the global arrays the silo was sent): by ``factor``, or to
    ``to_bound`` x the longest update the server accepts from a silo of this size."""
    sent = {name: a.numpy() for name, a in msg.content["arrays"].items()}
    new = {name: a.numpy() for name, a in reply.content["arrays"].items()}
    delta = {name: new[name].astype(np.float64) - sent[name] for name in new}
    if to_bound is not None:
        cfg = from_run_config(context.run_config)
        size = sum(v.size for v in delta.values())
        bound = honest_update_norm(cfg, reply.content["metrics"]["num-examples"], size)
        factor = to_bound * bound / float(np.sqrt(sum(np.sum(v ** 2) for v in delta.values())))
    reply.content["arrays"] = ArrayRecord({name: Array((sent[name] + factor * delta[name]).astype(new[name].dtype))
                                           for name in new})


def _keep(reply: Message, silo: int, server_round: int) -> None:
    """Save the update as sent, for the test to compare the aggregate with."""
    if "arrays" in reply.content.array_records:
        arrays = {name: a.numpy() for name, a in reply.content["arrays"].items()}
        np.savez(Path(PLAN["record"]) / f"round-{server_round}-silo-{silo}.npz", **arrays)


@app.train()
def train(msg: Message, context: Context) -> Message:
    fault, silo, server_round = _fault(msg, context)
    if fault == "hang":
        _hang(context)
    if fault == "raise":  # the silo's own training fails, inside the real ClientApp
        honest = real.run_call
        real.run_call = lambda where, name, *args, **kwargs: (_raising() if name == "train"
                                                              else honest(where, name, *args, **kwargs))
        try:
            return real.app(msg, context)
        finally:
            real.run_call = honest
    reply = real.app(msg, context)
    metrics = reply.content["metrics"] if not reply.has_error() else {}
    if fault == "nan-count":
        metrics["num-examples"] = float("nan")
    elif fault == "extra-key":
        metrics["user-ids"] = 3.0
    elif fault == "spoof":  # claims to be silo 0, with a ledger of a billion rounds
        metrics["silo"] = 0.0
        metrics["rounds-trained"] = 1e9
    elif fault == "scale-huge":
        _scaled(msg, reply, context, to_bound=None, factor=1e4)
    elif fault == "scale-to-bound":
        _scaled(msg, reply, context, to_bound=0.99, factor=0.0)
    _keep(reply, silo, server_round)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real.app(msg, context)


@app.query(RELEASE_ACTION)
def release(msg: Message, context: Context) -> Message:
    return real.app(msg, context)
