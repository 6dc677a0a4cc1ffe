"""One training round under SecAgg+: the server learns only the weighted mean of the silos' updates.

Flower 1.41 offers SecAgg+ only through its older strategy interface: ``SecAggPlusWorkflow`` runs
the four protocol stages (setup, share keys, collect masked vectors, unmask) against a
``LegacyContext`` whose ``Strategy`` picks the silos (``configure_fit``) and receives the unmasked
aggregate (``aggregate_fit``). This module runs that workflow for the *training step of one round*
and nothing else, so round 0, evaluation, checkpoints, resume and the run directory stay the
ServerApp's own loop -- and, with ``popularity-noise-shares`` > 1, for the popularity release
before round 0 (:func:`secagg_release`).

What travels: the server sends the global model's trainable arrays (as in the plain path,
:meth:`ValidatingFedAvg.outgoing`), plus the popularity prior when the run has one (arrays in name
order, the names in the config). Each silo trains as usual and hands SecAgg+ its *update delta*
(new minus global, trainable arrays only) weighted by its user count; a silo that refuses to train
contributes a zero delta with weight 0. SecAgg+ quantizes each weighted entry after clipping it to
``+-secagg-clip`` and masks it, so the server unmasks only ``sum(users_i * delta_i) / sum(users_i)``
-- FedAvg's result, up to the quantization error. Updates are never compressed under SecAgg+ (the
config refuses ``compression`` with ``secagg``): SecAgg+ quantizes and masks them itself.
Per-silo metrics (training loss, the privacy-ledger numbers, a refusal's reason) still travel in
the clear next to the masked vector.

Because no single update is ever visible, the per-update checks of :class:`ValidatingFedAvg` cannot
run; the silos' metrics, which travel in the clear, are checked as usual. The mean is checked
instead: finite, and within the largest update bound of the silos in it of the global model (a mean
of updates that each respected their bound respects it too, so a larger mean proves a bad update).
A mean that fails, or that holds the update of a silo whose reply was rejected, is not applied: the
round then has no valid update and the run fails.
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.supercore import log

from server.strategy import ValidatingFedAvg, log_warning
from uirl.aggregation import UpdateRejected, aggregate_bound, check_update
from uirl.config import Config
from uirl.message_names import COUNTS_ARRAY, RELEASE_TASK
from uirl.privacy.popularity import SECAGG_INTEGER_RANGE, release_scale
from uirl.replies import TrainReply
from uirl.rounds import RoundResult, SiloReply, check_replies

#: Config key naming the arrays of the global state, in the order they travel (legacy Parameters
#: carry no names).
ARRAY_NAMES = "array-names"
#: Config key naming the trainable arrays, in the order of the masked delta.
DELTA_NAMES = "delta-names"


class _MeanDelta(Strategy):
    """The legacy strategy SecAgg+ drives: fixed silos in, the unmasked mean delta out."""

    def __init__(self, node_ids: list[int], sent: dict[str, np.ndarray], delta_names: list[str],
                 config: dict[str, Scalar]) -> None:
        self.node_ids = node_ids
        self.sent = sent  # what each silo receives: the trainable arrays (and the popularity prior)
        self.delta_names = delta_names
        self.config = config
        self.mean_delta: list[np.ndarray] | None = None
        self.replies: list[tuple[int, dict, int]] = []  # (node, metrics, weight in the masked sum)

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        names = sorted(self.sent)
        fitins = FitIns(ndarrays_to_parameters([self.sent[n] for n in names]),
                        {**self.config, ARRAY_NAMES: ",".join(names), DELTA_NAMES: ",".join(self.delta_names)})
        proxies = client_manager.all()
        return [(proxies[str(nid)], fitins) for nid in self.node_ids]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.replies = [(proxy.node_id, dict(res.metrics), res.num_examples) for proxy, res in results]
        for failure in failures:
            log(WARNING, "round %d: a silo dropped out of SecAgg+: %s", server_round, failure)
        if any(weight > 0 for _, _, weight in self.replies):
            # SecAgg+ hands every result the same unmasked mean; nothing per silo is left to average.
            self.mean_delta = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def workflow(cfg: Config, timeout: float) -> SecAggPlusWorkflow:
    fed = cfg.federation
    return SecAggPlusWorkflow(num_shares=float(fed.secagg_shares), reconstruction_threshold=float(fed.secagg_threshold),
                              max_weight=float(fed.secagg_max_users), clipping_range=float(fed.secagg_clip),
                              timeout=timeout)


def _run_workflow(grid: Grid, context: Context, legacy: _MeanDelta, server_round: int,
                  secagg: SecAggPlusWorkflow) -> None:
    manager = SimpleClientManager()
    for nid in legacy.node_ids:
        manager.register(GridClientProxy(node_id=nid, grid=grid, run_id=grid.run.run_id))
    legacy_context = LegacyContext(context, strategy=legacy, client_manager=manager)
    legacy_context.state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server_round}),
                                       MAIN_PARAMS_RECORD: ArrayRecord()})
    secagg(grid, legacy_context)


def secagg_release(grid: Grid, context: Context, cfg: Config, node_ids: list[int], run_name: str, timeout: float
                   ) -> tuple[list[tuple[int, dict, int]], np.ndarray | None]:
    """The popularity release of a run with distributed noise (``popularity-noise-shares`` > 1) as
    one SecAgg+ round: each silo masks its integer counts (its noisy share, see
    :func:`uirl.privacy.popularity.distributed_release`), the server unmasks only their sum.

    The counts travel exactly: SecAgg+ maps x to round((x + clip) x range / (2 clip)), which with
    ``clip`` = range / 2 is x + clip for an integer x, with no rounding; each releasing silo has
    weight 1 (a refusing one 0), so the unmasked mean times the number of releasing silos is the sum.
    Returns ((node, metrics, weight) per reply, the summed counts in count units or None if no silo
    released)."""
    legacy = _MeanDelta(node_ids, {}, [COUNTS_ARRAY], {RELEASE_TASK: 1, "run-name": run_name})
    fed = cfg.federation
    _run_workflow(grid, context, legacy, 0, SecAggPlusWorkflow(
        num_shares=float(fed.secagg_shares), reconstruction_threshold=float(fed.secagg_threshold), max_weight=1.0,
        clipping_range=float(SECAGG_INTEGER_RANGE), quantization_range=2 * SECAGG_INTEGER_RANGE, timeout=timeout))
    released = sum(1 for _, _, weight in legacy.replies if weight > 0)
    if legacy.mean_delta is None or not released:
        return legacy.replies, None
    scale = release_scale(fed.secagg_max_users)
    total = np.round(np.asarray(legacy.mean_delta[0], dtype=np.float64) * released)
    return legacy.replies, total / scale


def secagg_train(grid: Grid, context: Context, cfg: Config, strategy: ValidatingFedAvg, server_round: int,
                 arrays: ArrayRecord, train_config: ConfigRecord, timeout: float) -> ArrayRecord:
    """Run one SecAgg+ training round and return the new global arrays.

    The silos are sampled exactly as the plain path samples them (``strategy.configure_train``);
    their metrics are checked and reach the run directory through ``strategy.conclude_round``,
    which raises :class:`~uirl.errors.RunFailed` if the round has too few valid updates.
    """
    messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
    node_ids = [m.metadata.dst_node_id for m in messages]
    global_state = {name: np.asarray(a.numpy()) for name, a in arrays.items()}
    delta_names = sorted(strategy.trainable)
    sent = {name: np.asarray(a.numpy()) for name, a in strategy.outgoing(arrays).items()}
    legacy = _MeanDelta(node_ids, sent, delta_names,
                        {**dict(train_config), "server-round": server_round})
    if len(node_ids) >= 2:
        _run_workflow(grid, context, legacy, server_round, workflow(cfg, timeout))
    else:
        log(WARNING, "round %d: SecAgg+ needs at least two silos, %d sampled", server_round, len(node_ids))
    replies = [SiloReply(node, [metrics], None, refusal=str(metrics.pop("error", "")))
               for node, metrics, _ in legacy.replies]
    rows, kept = check_replies(strategy.checker, server_round, replies, global_state, log_warning)
    why = next((f"node {r.node}'s reply was rejected and its update is inside the masked mean"
                for r, row, (_, _, weight) in zip(replies, rows, legacy.replies) if "rejected" in row and weight > 0), "")
    new = _checked_mean(server_round, legacy.mean_delta, global_state, delta_names, kept) if not why else None
    strategy.conclude_round(RoundResult(server_round=server_round, rows=rows, kept=kept, new=new, why="",
                                        asked=len(node_ids)),
                            why=why or ("" if new is not None else "no usable SecAgg+ mean"))
    return ArrayRecord({name: Array(new.get(name, value)) for name, value in global_state.items()})


def _checked_mean(server_round: int, mean_delta: list[np.ndarray] | None, global_state: dict[str, np.ndarray],
                  delta_names: list[str], kept: list[TrainReply]) -> dict[str, np.ndarray] | None:
    """The new trainable arrays from the unmasked mean delta, or None if there is none or it is not
    sane (not finite, or farther from the global model than the silos in it could move it)."""
    if mean_delta is None or not kept:
        return None
    new = {name: (global_state[name].astype(np.float64) + delta).astype(global_state[name].dtype)
           for name, delta in zip(delta_names, mean_delta, strict=True)}
    try:
        check_update(new, global_state, set(delta_names), aggregate_bound("fedavg", [r.bound for r in kept]))
    except UpdateRejected as why:
        log(WARNING, "round %d: rejected the SecAgg+ aggregate: %s", server_round, why)
        return None
    return new
