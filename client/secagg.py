"""The silo's side of SecAgg+ (run config ``secagg``): Flower's ``secaggplus_mod`` plus the reply it masks.

Flower's mod answers the protocol's setup, key-sharing and unmasking messages itself and, at the
"collect masked vectors" stage, calls the ClientApp's train handler, then quantizes, masks and sends
the update it returns. It reads that update in Flower's older FitRes layout, so under SecAgg+ the
train handler answers with :func:`fit_reply` instead of the plain ``arrays`` record.

In runs with distributed noise for the popularity release (``popularity-noise-shares`` > 1) the
first SecAgg+ round is that release: the train handler sends the silo's noisy integer counts
(:func:`release_reply`) instead of an update.

The mod only runs when the run asks for SecAgg+ (:func:`secagg_when_configured`): it would reject the
plain path's train messages, which carry no SecAgg+ stage.
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore import log

from uirl.config import Config, from_run_config
from uirl.message_names import RELEASE_TASK

#: Must match server/secagg.py: the names of the arrays sent, and of those whose delta is masked.
ARRAY_NAMES = "array-names"
DELTA_NAMES = "delta-names"


def secagg_when_configured(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply ``secaggplus_mod`` to train messages of runs with ``secagg = true``; pass the rest through."""
    if msg.metadata.message_type == MessageType.TRAIN and from_run_config(context.run_config).federation.secagg:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def fit_instructions(msg: Message) -> tuple[dict[str, np.ndarray], dict, list[str]]:
    """(global state by name, train config, names of the arrays whose delta goes back) of a SecAgg+ round."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    names = [n for n in str(config.pop(ARRAY_NAMES)).split(",") if n]  # none in the release round
    delta_names = str(config.pop(DELTA_NAMES)).split(",")
    arrays = parameters_to_ndarrays(fitins.parameters)
    return dict(zip(names, arrays, strict=True)), config, delta_names


def fit_reply(cfg: Config, global_state: dict[str, np.ndarray], delta_names: list[str],
              arrays: dict[str, np.ndarray] | None, metrics: dict[str, float], error: str | None) -> RecordDict:
    """The FitRes record the mod masks: this silo's update delta, weighted by its user count.

    A silo that refused to train sends a zero delta with weight 0: it still takes part in the
    protocol (so the others' masks cancel) but adds nothing to the mean.
    """
    if arrays is None:
        deltas, weight = [np.zeros_like(global_state[n]) for n in delta_names], 0
    else:
        deltas = [arrays[n] - global_state[n] for n in delta_names]
        weight = int(metrics.get("num-examples", 0))
        if weight > cfg.federation.secagg_max_users:
            log(WARNING, "silo has %d users, more than secagg-max-users %d: weighted as %d",
                weight, cfg.federation.secagg_max_users, cfg.federation.secagg_max_users)
            weight = cfg.federation.secagg_max_users
    reply_metrics: dict = dict(metrics)
    if error is not None:
        reply_metrics["error"] = error
    return compat.fitres_to_recorddict(FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(deltas),
                                              num_examples=weight, metrics=reply_metrics), keep_input=True)


def secagg_train(msg: Message, cfg: Config, train_round, release) -> Message:
    """Train handler under SecAgg+; ``train_round(global_state, config)`` -> (arrays, metrics, error),
    or, in the popularity release's round (``popularity-noise-shares`` > 1), ``release(run_name)`` ->
    (counts or None, metrics, error, catalogue size)."""
    global_state, config, delta_names = fit_instructions(msg)
    if config.get(RELEASE_TASK):
        counts, metrics, error, catalogue = release(str(config.get("run-name", "")))
        return Message(content=release_reply(cfg, counts, metrics, error, catalogue=catalogue), reply_to=msg)
    arrays, metrics, error = train_round(global_state, config)
    return Message(content=fit_reply(cfg, global_state, delta_names, arrays, metrics, error), reply_to=msg)


def release_reply(cfg: Config, counts: np.ndarray | None, metrics: dict[str, float], error: str | None, *,
                  catalogue: int) -> RecordDict:
    """The FitRes record the mod masks in the release round: this silo's share of the release as
    integers (count units x the release scale: exact, see :func:`uirl.privacy.popularity.release_scale`)
    with weight 1, or ``catalogue`` zeros with weight 0 from a silo that refuses (it still takes part,
    so the others' masks cancel)."""
    reply_metrics: dict = dict(metrics)
    if counts is None:
        reply_metrics["error"] = error or "refused"
        values, weight = np.zeros(catalogue), 0
    else:
        from uirl.privacy.popularity import release_scale  # opacus: only where a release is made

        values, weight = np.round(np.asarray(counts, dtype=np.float64) * release_scale(cfg.federation.secagg_max_users)), 1
    return compat.fitres_to_recorddict(FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters([values]),
                                              num_examples=weight, metrics=reply_metrics), keep_input=True)
