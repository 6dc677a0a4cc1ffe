"""The server's strategy: Flower's FedAvg picks the silos, uirl checks and combines their replies.

Flower's FedAvg samples the nodes of a round and builds their messages (``configure_train`` /
``configure_evaluate``). What is done with the replies is ours, because Flower's aggregation trusts
them: it requires every reply's records to agree with every other's (one silo's odd reply raises
for the whole run) and weighs each update by the ``num-examples`` the silo claims. Here each reply
is read into plain data (:class:`uirl.rounds.SiloReply`) and the round goes through
:func:`uirl.rounds.train_round` -- the same checks, combination and round failure as the in-process
engine: a malformed, out-of-range or oversized reply, or one from a ClientApp that failed, is
dropped (logged at WARNING with the node id and the reason, recorded as a rejected row); refusals
are recorded, not averaged; the kept updates are combined by the run's ``aggregation`` rule or,
with ``central-dp``, clipped, averaged over the silos asked and noised; a round with fewer valid
updates than ``min-nodes`` raises :class:`uirl.errors.RunFailed` after its rows are recorded. A silo
asked that sends no reply within ``reply-timeout`` (Flower's ``send_and_receive`` returns without
it) is named on the console at WARNING and counted in the round row (``silos-no-reply``).
Frozen adapter parts (FFA-LoRA's A matrices) are kept from the global model. Evaluation metrics
are averaged over the checked replies, weighted by their capped user counts.

Silos are sent only the trainable arrays (:func:`uirl.wire.downlink`): frozen adapter parts
(FFA-LoRA's A matrices; the whole LoRA adapter in ``cached`` mode) never travel and are kept from
the global model, which the server holds whole for checkpoints and the exported adapter. A
compressed update (run config ``compression``) is decompressed onto the global arrays by the
checker before anything else looks at it.

The popularity prior, when the run has one, travels next to the adapter arrays in every train and
evaluate message (under :data:`~uirl.message_names.PRIOR_ARRAY`) and is never aggregated. Per-silo rows
go to the ``on_train`` / ``on_evaluate`` callbacks, keyed by node id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from uirl.config import Config
from uirl.engine import weighted_metrics
from uirl.federated import EVAL_METRICS, ReleasedSum, release_arrays
from uirl.message_names import PRIOR_ARRAY
from uirl.privacy.central import central_epsilon, central_noise
from uirl.replies import ReplyChecker, ReplyRejected
from uirl.rounds import MAX_TEXT, RoundResult, SiloReply, conclude_round, rejected_row, train_round
from uirl.wire import downlink

_RANKING = sorted(EVAL_METRICS - {"num-examples", "silo"})


def log_warning(text: str) -> None:
    log(WARNING, "%s", text)


def _as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _records(msg: Message) -> tuple[list[dict], list[dict[str, np.ndarray]]]:
    """A reply's metric records and array records as plain dicts (the checker's input); raises
    :class:`ReplyRejected` for a reply that carries an error instead (its ClientApp failed)."""
    if msg.has_error():
        raise ReplyRejected(f"the ClientApp failed: {msg.error.reason}"[:MAX_TEXT])
    content = msg.content
    try:
        arrays = [_as_numpy(record) for record in content.array_records.values()]
    except (TypeError, ValueError, OSError, EOFError) as exc:  # bytes that are no numpy array
        raise ReplyRejected(f"unreadable arrays: {exc}"[:MAX_TEXT]) from None
    return [dict(record) for record in content.metric_records.values()], arrays


def refusal(content: RecordDict) -> str:
    """The reason a silo gave for refusing (its ``error`` config record), cut short."""
    if "error" not in content.config_records:
        return ""
    return str(content.config_records["error"].get("message", ""))[:MAX_TEXT]


def silo_reply(msg: Message) -> SiloReply:
    """A training reply as plain data (:class:`uirl.rounds.SiloReply`)."""
    node = msg.metadata.src_node_id
    try:
        metrics, arrays = _records(msg)
    except ReplyRejected as why:
        return SiloReply(node, failure=str(why))
    return SiloReply(node, metrics, arrays, refusal=refusal(msg.content))


class ValidatingFedAvg(FedAvg):
    def __init__(self, *, cfg: Config, trainable: set[str], on_train: Callable[[int, list[dict], int], None],
                 on_evaluate: Callable[[int, list[dict], dict], None], prior: np.ndarray | None = None,
                 silent: set[int] | None = None, release: ReleasedSum | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self.trainable = trainable
        self.checker = ReplyChecker(cfg, trainable)
        self.on_train = on_train
        self.on_evaluate = on_evaluate
        self.prior = prior
        self.release = release  # local-prior: the released sum, sent with every evaluate message
        self._global: dict[str, np.ndarray] = {}
        self._asked: dict[str, list[int]] = {"train": [], "evaluate": []}  # the nodes the last message went to
        #: Nodes that missed ``reply-timeout``: their message may still be running, and a newer one
        #: would start from the node state (the privacy ledger) before it, so they are not asked again.
        self._silent: set[int] = set(silent or ())
        if cfg.federation.central_dp:
            _announce_central_dp(cfg)

    def outgoing(self, arrays: ArrayRecord, *, evaluate: bool = False) -> ArrayRecord:
        """What a silo receives: the global model's trainable arrays (:func:`uirl.wire.downlink`;
        each silo rebuilds the frozen ones from the seed), plus the popularity prior if the run has
        one, and to evaluate with ``local-prior`` the released sum it was built from."""
        sent = downlink(dict(arrays.items()), self.trainable)
        if self.prior is not None:
            sent[PRIOR_ARRAY] = Array(self.prior)
        if evaluate and self.release is not None:
            sent.update({name: Array(value) for name, value in release_arrays(self.release).items()})
        return ArrayRecord(sent)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self._global = _as_numpy(arrays)
        messages = list(super().configure_train(server_round, self.outgoing(arrays), config, grid))
        self._asked["train"] = [m.metadata.dst_node_id for m in messages]  # a silent node counts, unanswered
        return self._not_silent(messages)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, self.outgoing(arrays, evaluate=True), config, grid))
        self._asked["evaluate"] = [m.metadata.dst_node_id for m in messages]
        return self._not_silent(messages)

    def _not_silent(self, messages: Iterable[Message]) -> list[Message]:
        return [m for m in messages if m.metadata.dst_node_id not in self._silent]

    def _warn_silent(self, server_round: int, task: str, replies: list[Message]) -> None:
        """Name on the console each node asked that sent no reply within ``reply-timeout`` (Flower's
        ``send_and_receive`` returns without it): it is left out of the round, with no row, and sent
        nothing more in this run; later rounds count it as asked and silent (so ``min-nodes`` still
        counts it as missing)."""
        replied = {m.metadata.src_node_id for m in replies}
        for node in self._asked[task]:
            if node not in replied and node not in self._silent:  # a silent node was named when it fell silent
                label = self.checker.label(node)
                log_warning(f"round {server_round}: node {node}{'' if label is None else f' (silo {label})'} sent "
                            f"no {task} reply within reply-timeout ({self.cfg.federation.reply_timeout:g} s): "
                            "left out of the round and not asked again in this run (its message may still be "
                            "running; a newer one would start from its privacy ledger before it)")
                self._silent.add(node)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._warn_silent(server_round, "train", replies)
        result = train_round(self.cfg, self.checker, self._global, server_round, [silo_reply(m) for m in replies],
                             asked=len(self._asked["train"]), warn=log_warning)
        self.conclude_round(result)
        merged = {name: Array(value) for name, value in self._global.items()}
        merged.update({name: Array(value) for name, value in (result.new or {}).items()})
        return ArrayRecord(merged), None

    def conclude_round(self, result: RoundResult, *, why: str = "") -> None:
        """Record the round's rows, say on the console if it was degraded, and raise
        :class:`~uirl.errors.RunFailed` if too few silos trained (:func:`uirl.rounds.conclude_round`)."""
        self.on_train(result.server_round, result.rows, result.asked)
        conclude_round(self.cfg, result, why=why, warn=log_warning)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._warn_silent(server_round, "evaluate", replies)
        rows, kept = [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            withheld = "" if msg.has_error() or msg.content.metric_records else refusal(msg.content)
            if withheld:
                rows.append(rejected_row(self.checker, server_round, node, "evaluate", f"withheld: {withheld}",
                                         log_warning))
                continue
            try:
                reply = self.checker.evaluate(node, _records(msg)[0])
            except ReplyRejected as why:
                rows.append(rejected_row(self.checker, server_round, node, "evaluate", why, log_warning))
                continue
            kept.append({**reply.metrics, "num-examples": reply.weight})
            rows.append({**reply.metrics, "node-id": node, "silo": reply.silo, "weight": reply.weight})
        aggregated = weighted_metrics(kept, _RANKING) if kept else {}
        self.on_evaluate(server_round, rows, aggregated)
        return MetricRecord(aggregated) if aggregated else None


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
