"""The server's strategy: Flower's FedAvg picks the silos, uirl checks and combines their replies.

Flower's FedAvg samples the nodes of a round and builds their messages (``configure_train`` /
``configure_evaluate``). What is done with the replies is ours, because Flower's aggregation trusts
them: it requires every reply's records to agree with every other's (one silo's odd reply raises
for the whole run) and weighs each update by the ``num-examples`` the silo claims. Here:

- each reply is checked on its own by :class:`uirl.replies.ReplyChecker` (the in-process engine
  uses the same checker): a malformed, out-of-range or oversized reply, or one from a ClientApp
  that failed, is dropped -- logged at WARNING with the node id and the reason, recorded as a
  rejected row -- and the round goes on with the others;
- refusals (privacy budget spent, ledger damaged, a round asked twice) are recorded, not averaged;
- the kept updates are combined by the run's ``aggregation`` rule (:func:`uirl.aggregation.combine`;
  FedAvg weights are the checked, capped user counts) or, with ``central-dp``, clipped, averaged
  over the silos asked and noised (:func:`uirl.privacy.central.central_dp_aggregate`);
- the result must be finite and move the model no farther than its inputs could, or it is not
  applied;
- silos are sent only the trainable arrays (:func:`uirl.wire.downlink`); frozen adapter parts
  (FFA-LoRA's A matrices; the whole LoRA adapter in ``cached`` mode) never travel and are kept from
  the global model, which the server holds whole for checkpoints and the exported adapter;
- a compressed update (run config ``compression``) is decompressed onto the global arrays by the
  checker before anything else looks at it;
- a round with fewer valid updates than ``min-nodes`` raises :class:`uirl.errors.RunFailed`
  (after its rows are recorded), so the run ends as failed and writes no final adapter;
- evaluation metrics are averaged over the checked replies, weighted by their capped user counts.
- the popularity prior, when the run has one, travels next to the adapter arrays in every train
  and evaluate message (under :data:`~uirl.federated.PRIOR_ARRAY`) and is never aggregated.

Per-silo rows go to the ``on_train`` / ``on_evaluate`` callbacks, keyed by node id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from uirl.aggregation import UpdateRejected, check_update, combine_checked
from uirl.config import Config
from uirl.engine import central_noise, weighted_metrics
from uirl.federated import EVAL_METRICS, PRIOR_ARRAY, STATUS_MEANING
from uirl.privacy.central import central_dp_aggregate, central_epsilon
from uirl.replies import ReplyChecker, ReplyRejected, TrainReply, check_round
from uirl.wire import downlink

#: The longest text kept from a reply (a refusal's reason, a reading error): it reaches logs and rows.
_MAX_TEXT = 200
_RANKING = sorted(EVAL_METRICS - {"num-examples", "silo"})


def _as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _records(msg: Message) -> tuple[list[dict], list[dict[str, np.ndarray]]]:
    """A reply's metric records and array records as plain dicts (the checker's input); raises
    :class:`ReplyRejected` for a reply that carries an error instead (its ClientApp failed)."""
    if msg.has_error():
        raise ReplyRejected(f"the ClientApp failed: {msg.error.reason}"[:_MAX_TEXT])
    content = msg.content
    try:
        arrays = [_as_numpy(record) for record in content.array_records.values()]
    except (TypeError, ValueError, OSError, EOFError) as exc:  # bytes that are no numpy array
        raise ReplyRejected(f"unreadable arrays: {exc}"[:_MAX_TEXT]) from None
    return [dict(record) for record in content.metric_records.values()], arrays


def _refusal(content: RecordDict) -> str:
    """The reason a silo gave for refusing (its ``error`` config record), cut short."""
    if "error" not in content.config_records:
        return ""
    return str(content.config_records["error"].get("message", ""))[:_MAX_TEXT]


class ValidatingFedAvg(FedAvg):
    def __init__(self, *, cfg: Config, trainable: set[str], on_train: Callable[[int, list[dict]], None],
                 on_evaluate: Callable[[int, list[dict], dict], None], prior: np.ndarray | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self.trainable = trainable
        self.checker = ReplyChecker(cfg, trainable)
        self.on_train = on_train
        self.on_evaluate = on_evaluate
        self.prior = prior
        self._global: dict[str, np.ndarray] = {}
        self._asked = 0
        if cfg.federation.central_dp:
            _announce_central_dp(cfg)

    def outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        """What a silo receives: the global model's trainable arrays (:func:`uirl.wire.downlink`;
        each silo rebuilds the frozen ones from the seed), plus the popularity prior if the run has one."""
        sent = downlink(dict(arrays.items()), self.trainable)
        if self.prior is not None:
            sent[PRIOR_ARRAY] = Array(self.prior)
        return ArrayRecord(sent)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self._global = _as_numpy(arrays)
        messages = list(super().configure_train(server_round, self.outgoing(arrays), config, grid))
        self._asked = len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        return super().configure_evaluate(server_round, self.outgoing(arrays), config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rows, kept = [], []
        for msg in replies:
            row, reply = self._train_row(server_round, msg)
            rows.append(row)
            if reply is not None and reply.trained:
                kept.append(reply)
        new, why = self._combine(server_round, kept) if kept else (None, "")
        self.conclude_round(server_round, rows, trained=len(kept) if new is not None else 0,
                            asked=self._asked, why=why)
        merged = {name: Array(value) for name, value in self._global.items()}
        merged.update({name: Array(value) for name, value in new.items()})
        return ArrayRecord(merged), None

    def conclude_round(self, server_round: int, rows: list[dict], *, trained: int, asked: int, why: str = "") -> None:
        """Record the round's rows, say on the console if it was degraded, and raise
        :class:`~uirl.errors.RunFailed` if too few silos trained (see :func:`uirl.replies.check_round`)."""
        self.on_train(server_round, rows)
        rejected = sum("rejected" in row for row in rows)
        refused = sum("rejected" not in row and not row["accepted"] for row in rows)
        if trained < asked:
            log(WARNING, "round %d: %d of %d silos asked trained (%d rejected, %d refused, %d no reply)",
                server_round, trained, asked, rejected, refused, max(asked - len(rows), 0))
        check_round(server_round, trained=trained, asked=asked, min_nodes=self.cfg.federation.min_nodes,
                    rejected=rejected, refused=refused, why=why)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rows, kept = [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                reply = self.checker.evaluate(node, _records(msg)[0])
            except ReplyRejected as why:
                rows.append(self._rejected(server_round, node, "evaluate", why))
                continue
            kept.append({**reply.metrics, "num-examples": reply.weight})
            rows.append({**reply.metrics, "node-id": node, "silo": reply.silo, "weight": reply.weight})
        aggregated = weighted_metrics(kept, _RANKING) if kept else {}
        self.on_evaluate(server_round, rows, aggregated)
        return MetricRecord(aggregated) if aggregated else None

    def _train_row(self, server_round: int, msg: Message) -> tuple[dict, TrainReply | None]:
        node = msg.metadata.src_node_id
        try:
            metrics, arrays = _records(msg)
        except ReplyRejected as why:
            return self._rejected(server_round, node, "train", why), None
        return self.train_row(server_round, node, metrics, arrays, refusal=_refusal(msg.content))

    def train_row(self, server_round: int, node: int, metrics: list[dict], arrays: list[dict] | None, *,
                  refusal: str = "") -> tuple[dict, TrainReply | None]:
        """The run-directory row of one training reply, and the reply if it passed the checks
        (``arrays=None``: masked by SecAgg+, see :meth:`uirl.replies.ReplyChecker.train`)."""
        try:
            reply = self.checker.train(node, server_round, metrics, arrays, current=self._global)
        except UpdateRejected as why:
            return self._rejected(server_round, node, "train", why), None
        row = {**reply.metrics, "node-id": node, "silo": reply.silo, "accepted": reply.trained, "weight": reply.weight}
        if reply.notes:
            row["notes"] = "; ".join(reply.notes)
            log(WARNING, "round %d: node %d: %s", server_round, node, row["notes"])
        if not reply.trained:
            if refusal:
                row["error"] = refusal[:_MAX_TEXT]
            log(WARNING, "round %d: node %d refused to train (%s)%s", server_round, node,
                STATUS_MEANING[reply.metrics["status"]], f": {refusal[:_MAX_TEXT]}" if refusal else "")
        return row, reply

    def _rejected(self, server_round: int, node: int, task: str, why: Exception) -> dict:
        log(WARNING, "round %d: rejected the %s reply of node %d: %s", server_round, task, node, why)
        return {"node-id": node, "silo": self.checker.label(node), "task": task, "accepted": False,
                "rejected": str(why)}

    def _combine(self, server_round: int, kept: list[TrainReply]) -> tuple[dict[str, np.ndarray] | None, str]:
        """The new trainable arrays from the kept updates, or (None, why) if the result is not sane."""
        fed = self.cfg.federation
        current = {name: self._global[name] for name in self.trainable}
        updates = [reply.update for reply in kept]
        try:
            if fed.central_dp:  # the noise is as long as it must be: check only that it stayed finite
                new = central_dp_aggregate(current, updates, clip=fed.central_clip,
                                           noise_multiplier=central_noise(self.cfg),
                                           expected_silos=max(self._asked, 1), rng=np.random.default_rng())
                check_update(new, current, self.trainable, np.inf)
            else:
                new = combine_checked(fed.aggregation, current, updates, [reply.weight for reply in kept],
                                      [reply.bound for reply in kept], trim_fraction=fed.trim_fraction)
        except UpdateRejected as why:
            log(WARNING, "round %d: the aggregate of %d updates was not applied: %s", server_round, len(kept), why)
            return None, f"the aggregate was not applied: {why}"
        return new, ""


def _announce_central_dp(cfg: Config) -> None:
    """Print the client-level guarantee of a ``central-dp`` run.

    The noise is ``noise-multiplier x central-clip / m`` with ``m`` the silos asked in the round, and
    each silo's clipped update counts ``1 / m`` (sum over the replies / m): one silo moves the model by
    at most ``central-clip / m`` whoever replies. The epsilon printed assumes every silo trains every
    round (``fraction-train = 1``) or Poisson sampling; Flower samples a fixed number of nodes, for
    which the sampling amplification is not proven.
    """
    fed = cfg.federation
    sigma = central_noise(cfg)
    eps = central_epsilon(noise_multiplier=sigma, sample_rate=fed.fraction_train, rounds=fed.num_rounds,
                          delta=cfg.privacy.target_delta)
    print(f"uirl: client-level central DP: noise multiplier {sigma:.4g}, clip {fed.central_clip:g}, "
          f"epsilon {eps:.3f} after {fed.num_rounds} rounds (delta {cfg.privacy.target_delta:g})", flush=True)
