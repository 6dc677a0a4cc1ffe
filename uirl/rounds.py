"""One federated training round on the server side, with no Flower in sight.

The ServerApp's strategy (``server/strategy.py``, and its SecAgg+ path) and the in-process engine
(:mod:`uirl.engine`, which the sweeps and the ablation run) hand the round's replies to the same
functions here, so what a round accepts, combines and records is one code path:

1. :func:`check_replies` -- each reply checked on its own by :class:`uirl.replies.ReplyChecker`;
   a reply that cannot be read, is malformed or out of range is dropped with its reason, a refusal
   (privacy budget spent, ledger damaged, a round asked twice) is recorded and not combined;
2. :func:`combine_round` -- the kept updates combined by the run's ``aggregation`` rule (or, with
   ``central-dp``, clipped, averaged and noised); the result must be finite and move the model no
   farther than its inputs could, else nothing of the round is applied;
3. :func:`round_summary` -- the round's row (loss, epsilon per silo, how many silos trained,
   replied, were rejected), the same keys from both paths;
4. :func:`conclude_round` -- a round with fewer valid updates than ``min-nodes`` raises
   :class:`~uirl.errors.RunFailed`, so a run never looks like it went on while nothing trained.

A caller with its own transport turns each reply into a :class:`SiloReply` (plain metric dicts and
numpy arrays) and passes ``warn`` to put the one-line reasons where its users look.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from uirl.aggregation import UpdateRejected, check_update, combine_checked
from uirl.config import Config
from uirl.federated import STATUS_MEANING
from uirl.privacy.central import central_dp_aggregate, central_noise
from uirl.replies import ReplyChecker, TrainReply, check_round

#: The longest text kept from a reply (a refusal's reason, a reading error): it reaches logs and rows.
MAX_TEXT = 200

Warn = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class SiloReply:
    """One training reply as plain data. ``arrays=None``: the update is masked (SecAgg+);
    ``failure``: the reply could not be read at all (its ClientApp failed, unreadable bytes)."""

    node: int
    metrics: Sequence[Mapping] = ()
    arrays: Sequence[Mapping[str, np.ndarray]] | None = ()
    refusal: str = ""  # the reason a refusing silo gave
    failure: str | None = None


@dataclass(frozen=True)
class RoundResult:
    server_round: int
    rows: list[dict]  # one per reply, as the run directory records it (keyed by node id)
    kept: list[TrainReply]  # the checked replies of the silos that trained
    new: dict[str, np.ndarray] | None  # the new trainable arrays; None: nothing of the round applied
    why: str  # why nothing was applied, if so
    asked: int  # silos the round asked

    @property
    def trained(self) -> int:
        """Silos whose update is in the applied aggregate (0 if none was applied)."""
        return len(self.kept) if self.new is not None else 0


def rejected_row(checker: ReplyChecker, server_round: int, node: int, task: str, why: object,
                 warn: Warn = _quiet) -> dict:
    """The row of a dropped reply: its node, the node's label, the task and the reason only."""
    warn(f"round {server_round}: rejected the {task} reply of node {node}: {why}")
    return {"node-id": node, "silo": checker.label(node), "task": task, "accepted": False, "rejected": str(why)}


def check_reply(checker: ReplyChecker, server_round: int, reply: SiloReply, current: dict[str, np.ndarray],
                warn: Warn = _quiet) -> tuple[dict, TrainReply | None]:
    """The row of one training reply, and the checked reply if it passed."""
    if reply.failure is not None:
        return rejected_row(checker, server_round, reply.node, "train", reply.failure[:MAX_TEXT], warn), None
    try:
        checked = checker.train(reply.node, server_round, reply.metrics, reply.arrays, current=current)
    except UpdateRejected as why:
        return rejected_row(checker, server_round, reply.node, "train", why, warn), None
    row = {**checked.metrics, "node-id": reply.node, "silo": checked.silo, "accepted": checked.trained,
           "weight": checked.weight}
    if checked.notes:
        row["notes"] = "; ".join(checked.notes)
        warn(f"round {server_round}: node {reply.node}: {row['notes']}")
    if not checked.trained:
        refusal = reply.refusal[:MAX_TEXT]
        if refusal:
            row["error"] = refusal
        warn(f"round {server_round}: node {reply.node} refused to train "
             f"({STATUS_MEANING[checked.metrics['status']]}){': ' + refusal if refusal else ''}")
    return row, checked


def check_replies(checker: ReplyChecker, server_round: int, replies: Sequence[SiloReply],
                  current: dict[str, np.ndarray], warn: Warn = _quiet) -> tuple[list[dict], list[TrainReply]]:
    """(a row per reply, the checked replies of the silos that trained)."""
    rows, kept = [], []
    for reply in replies:
        row, checked = check_reply(checker, server_round, reply, current, warn)
        rows.append(row)
        if checked is not None and checked.trained:
            kept.append(checked)
    return rows, kept


def combine_round(cfg: Config, current: dict[str, np.ndarray], kept: list[TrainReply], *, expected_silos: float,
                  server_round: int, warn: Warn = _quiet
                  ) -> tuple[dict[str, np.ndarray] | None, str]:
    """The new trainable arrays from the kept updates (``current``: the trainable part of the
    global model), or (None, why) if there is nothing to combine or the result is not sane.
    ``expected_silos`` normalises the central-DP sum (the silos asked, or the expected number under
    Poisson sampling); its noise multiplier is :func:`~uirl.privacy.central.central_noise`."""
    fed = cfg.federation
    if not kept and not fed.central_dp:  # central DP adds its noise even to an empty Poisson sample
        return None, ""
    updates = [reply.update for reply in kept]
    try:
        if fed.central_dp:  # the noise is as long as it must be: check only that it stayed finite
            new = central_dp_aggregate(current, updates, clip=fed.central_clip, noise_multiplier=central_noise(cfg),
                                       expected_silos=max(expected_silos, 1e-12), rng=np.random.default_rng())
            check_update(new, current, set(current), np.inf)
        else:
            new = combine_checked(fed.aggregation, current, updates, [reply.weight for reply in kept],
                                  [reply.bound for reply in kept], trim_fraction=fed.trim_fraction)
    except UpdateRejected as why:
        warn(f"round {server_round}: the aggregate of {len(kept)} updates was not applied: {why}")
        return None, f"the aggregate was not applied: {why}"
    return new, ""


def train_round(cfg: Config, checker: ReplyChecker, global_state: dict[str, np.ndarray], server_round: int,
                replies: Sequence[SiloReply], *, asked: int, expected_silos: float | None = None,
                warn: Warn = _quiet) -> RoundResult:
    """Check the round's replies against the global arrays the silos were sent and combine the
    valid updates. Does not raise for a degraded round: see :func:`conclude_round`."""
    rows, kept = check_replies(checker, server_round, replies, global_state, warn)
    current = {name: global_state[name] for name in checker.trainable}
    new, why = combine_round(cfg, current, kept, expected_silos=asked if expected_silos is None else expected_silos,
                             server_round=server_round, warn=warn)
    return RoundResult(server_round=server_round, rows=rows, kept=kept, new=new, why=why, asked=asked)


def silo_epsilons(rows: Sequence[Mapping]) -> dict[str, float]:
    """``epsilon`` (the largest) and ``epsilon/silo-<label>`` (or ``epsilon/node-<id>``) of the
    replies that were not rejected (a rejected reply's numbers are not believed)."""
    eps = {f"epsilon/silo-{int(m['silo'])}" if m.get("silo") is not None else f"epsilon/node-{m['node-id']}":
           m.get("epsilon", math.inf) for m in rows if "rejected" not in m}
    return {"epsilon": max(eps.values(), default=math.nan), **dict(sorted(eps.items()))}


def round_summary(rows: Sequence[Mapping], *, asked: int | None = None) -> dict[str, float]:
    """The round's row from its per-reply rows: the user-weighted training loss of the silos that
    trained and reported one (under DP none does: :data:`uirl.federated.KEPT_UNDER_DP`; NaN then),
    :func:`silo_epsilons`, and how many silos trained, replied and were rejected; given the number of
    silos ``asked``, also how many of them sent no reply (within ``reply-timeout``)."""
    accepted = [m for m in rows if m.get("accepted")]
    with_loss = [m for m in accepted if "train-loss" in m]
    users = sum(m["weight"] for m in with_loss)
    loss = sum(m["train-loss"] * m["weight"] for m in with_loss) / users if users else math.nan
    rejected = sum("rejected" in m for m in rows)
    summary = {"train-loss": loss, **silo_epsilons(rows), "silos-trained": len(accepted), "silos-replied": len(rows),
               "silos-rejected": rejected}
    if asked is not None:
        summary["silos-no-reply"] = max(asked - len(rows), 0)
    return summary


def conclude_round(cfg: Config, result: RoundResult, *, why: str = "", warn: Warn = _quiet) -> None:
    """Say if the round was degraded, and raise :class:`~uirl.errors.RunFailed` if too few silos
    trained (see :func:`uirl.replies.check_round`). Call it after the round's rows are recorded."""
    if result.asked == 0:  # Poisson sampling (central DP) picked no silo: a noise-only round
        return
    rows = result.rows
    rejected = sum("rejected" in row for row in rows)
    refused = sum("rejected" not in row and not row["accepted"] for row in rows)
    silent = max(result.asked - len(rows), 0)
    if result.trained < result.asked:
        warn(f"round {result.server_round}: {result.trained} of {result.asked} silos asked trained ({rejected} "
             f"rejected, {refused} refused, {silent} no reply)")
    check_round(result.server_round, trained=result.trained, asked=result.asked, min_nodes=cfg.federation.min_nodes,
                rejected=rejected, refused=refused, silent=silent, why=why or result.why)
