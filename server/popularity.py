"""The private popularity prior under ``flwr run``: every silo releases its item counts once, before round 0.

Why a query message: Flower 1.41's Message API has three message categories (train, evaluate,
query) and routes ``<category>.<action>`` to the ClientApp function registered for that action,
here ``@app.query(RELEASE_ACTION)``. The release is neither training nor evaluation. As a train
message with a task field it would pass through the SecAgg+ mod, which masks train replies as
model updates, and every train handler would have to branch on the field; a query with its own
action reaches the release handler only, and Flower's strategies never see it.

The server asks every connected silo (once ``min-nodes`` have connected); each reply is checked by
:func:`uirl.replies.check_release` (status, metric keys and ranges, one finite count vector over the
catalogue most releasing silos share, a noise level that is > 0 under DP), the same check the
in-process engine makes, and the prior is built from the sum with :func:`uirl.engine.popularity_prior`
-- the same post-processing as the engine. A silo that refuses, fails or sends something else is
left out, and the console says which; with none left the run stops. Every reply's privacy numbers
(the silo's epsilon after the release) go to ``privacy.jsonl`` as round-0 rows. The prior is saved in the run directory
(:meth:`uirl.rundir.RunDirectory.save_prior`); a resumed run sends that one again rather than ask
the silos for a second release.

With distributed noise (``popularity-noise-shares`` > 1) the release is instead one SecAgg+ round
(:func:`server.secagg.secagg_release`): each silo's share, with only 1/sqrt(k) of the noise, may
never be seen alone, and a query's reply would be seen. The server then checks each reply's
metrics and the unmasked sum, and stops the run unless at least k releases are in the sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from server.secagg import secagg_release
from uirl.config import Config
from uirl.engine import released_sum
from uirl.errors import UirlError
from uirl.federated import STATUS_OK, ReleasedSum
from uirl.message_names import RELEASE_ACTION
from uirl.replies import ReplyRejected, check_release, check_release_sum, release_catalogue
from uirl.rundir import RunDirectory

#: The message type of the release; the ClientApp routes it to ``@app.query(RELEASE_ACTION)``.
RELEASE_MESSAGE = f"{MessageType.QUERY}.{RELEASE_ACTION}"


class PriorError(UirlError):
    """The run asked for a popularity prior and no silo released usable counts."""


def _last_line(text: str | None) -> str:
    """A failed reply's reason is often a stack trace: its last line says what went wrong."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


class _Reply(NamedTuple):
    who: str  # "silo <partition-id>", or "node <id>" for a reply that names no usable silo label
    counts: np.ndarray | None  # None: left out of the prior
    noise: float  # the release's noise standard deviation (0: exact counts, DP off)
    metrics: dict  # the privacy row: the silo's metrics, ``accepted``, and why a reply was left out

    @property
    def why(self) -> str:
        return str(self.metrics.get("error") or self.metrics.get("rejected"))


def _records(msg: Message) -> tuple[list[dict], list[dict[str, np.ndarray]]]:
    """A reply's metric records and array records as plain dicts (what :func:`check_release` reads)."""
    content = msg.content
    metrics = [dict(record) for record in content.metric_records.values()]
    arrays = [{name: np.asarray(array.numpy()) for name, array in record.items()}
              for record in content.array_records.values()]
    return metrics, arrays


def _label(metrics: list[dict], node: int) -> tuple[str, dict]:
    """Who a reply is from, for the console, and the silo label its row may keep (a finite number only)."""
    silo = metrics[0].get("silo") if len(metrics) == 1 else None
    if isinstance(silo, (int, float)) and not isinstance(silo, bool) and math.isfinite(silo):
        return f"silo {int(silo)}", {"silo": float(silo)}
    return f"node {node}", {}


def _read(cfg: Config, msg: Message, catalogue: int | None) -> _Reply:
    """One reply, checked against the catalogue size ``catalogue``. A reason to leave it out goes
    under ``error`` (the silo's own) or ``rejected`` (the server's)."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        return _Reply(f"node {node}", None, 0.0, {"node-id": node, "accepted": False,
                                                  "error": _last_line(msg.error.reason)})
    metrics, arrays = _records(msg)
    who, label = _label(metrics, node)
    try:
        release = check_release(metrics, arrays, catalogue=catalogue, dp=cfg.privacy.enabled)
    except ReplyRejected as why:
        return _Reply(who, None, 0.0, {**label, "node-id": node, "accepted": False, "rejected": str(why)})
    row = {**release.metrics, "node-id": node}  # rows are keyed by Flower's node id; the silo is only a label
    if release.counts is None:
        error = str(msg.content["error"].get("message", "")) if "error" in msg.content.config_records else ""
        return _Reply(who, None, 0.0, {**row, "accepted": False, "error": error or f"status {row['status']:g}"})
    return _Reply(who, release.counts, release.noise, {**row, "accepted": True})


def _catalogue(answers: list[Message]) -> int | None:
    """The catalogue size most releasing silos share (:func:`uirl.replies.release_catalogue`)."""
    return release_catalogue(_records(msg)[1] for msg in answers if not msg.has_error())


def release_prior(grid: Grid, cfg: Config, run: RunDirectory, *, on_release: Callable[[list[dict]], None],
                  timeout: float, on_silent: Callable[[int], None] = lambda node: None,
                  context: Context | None = None) -> np.ndarray:
    """Ask every connected silo for its release, build the prior, save it in ``run``; return it.

    ``on_release`` receives the privacy row of every reply (keyed by ``node-id``); ``on_silent``
    each node that sent no reply within ``timeout`` (its release may still be running: the strategy
    sends it nothing more). Raises :class:`PriorError` if no silo released usable counts. With
    ``popularity-noise-shares`` > 1 the release is one SecAgg+ round (``context``: the ServerApp's)."""
    _, nodes = sample_nodes(grid, cfg.federation.min_nodes, 0)
    if cfg.privacy.popularity_noise_shares > 1:
        return _distributed_prior(grid, context, cfg, run, nodes, on_release=on_release, timeout=timeout)
    answers = list(grid.send_and_receive(
        [Message(RecordDict({"config": ConfigRecord({"run-name": run.path.name})}), dst_node_id=node,
                 message_type=RELEASE_MESSAGE) for node in nodes], timeout=timeout))
    catalogue = _catalogue(answers)
    replies = sorted((_read(cfg, msg, catalogue) for msg in answers), key=lambda r: r.metrics.get("silo", math.inf))
    on_release([r.metrics for r in replies])
    replied = {msg.metadata.src_node_id for msg in answers}
    left_out = []
    for node in nodes:
        if node not in replied:
            on_silent(node)
            left_out.append((f"node {node}", f"no reply within reply-timeout ({timeout:g} s); not asked again in this run"))
    left_out += [(r.who, r.why) for r in replies if r.counts is None]
    released = [r for r in replies if r.counts is not None]
    if not released:
        raise PriorError("popularity-prior: no silo released its popularity counts ("
                         + "; ".join(f"{who}: {why}" for who, why in left_out) + ")")
    for who, why in left_out:
        print(f"uirl: popularity prior built without {who}: {why}", flush=True)
    total = released_sum([r.counts for r in released], [r.noise for r in released])
    prior = total.prior()
    run.save_prior(prior)
    run.save_release(*total)
    print(f"uirl: popularity prior from {', '.join(r.who for r in released)} over {len(prior)} items", flush=True)
    return prior


def _distributed_prior(grid: Grid, context: Context, cfg: Config, run: RunDirectory, nodes: list[int], *,
                       on_release: Callable[[list[dict]], None], timeout: float) -> np.ndarray:
    """The prior from a distributed release: the silos' shares summed under SecAgg+
    (:func:`server.secagg.secagg_release`). Each reply's metrics travel in the clear and are checked
    as a release's (:func:`uirl.replies.check_release` with ``masked``). The sum is used only if it
    holds at least ``popularity-noise-shares`` releases and none from a silo whose reply was
    rejected; otherwise the run stops: the silos' ledgers record the noise of that many shares."""
    shares = cfg.privacy.popularity_noise_shares
    replies, total = secagg_release(grid, context, cfg, nodes, run.path.name, timeout)
    rows, released, bad = [], [], []
    for node, metrics, weight in replies:
        metrics = dict(metrics)
        error = str(metrics.pop("error", ""))
        who, label = _label([metrics], node)
        try:
            release = check_release([metrics], [], catalogue=None, dp=cfg.privacy.enabled, masked=True)
        except ReplyRejected as why:
            rows.append({**label, "node-id": node, "accepted": False, "rejected": str(why)})
            if weight > 0:
                bad.append(f"{who}: {why}")
            continue
        ok = release.metrics["status"] == STATUS_OK and weight > 0
        rows.append({**release.metrics, "node-id": node, "accepted": ok, **({} if ok else {"error": error})})
        if ok:
            released.append((who, release))
        elif weight > 0:
            bad.append(f"{who}: a refusal inside the masked sum")
    on_release(rows)
    if bad or total is None or len(released) < shares:
        why = "; ".join(bad) or f"{len(released)} silo(s) released into the sum, popularity-noise-shares = {shares}"
        raise PriorError(f"popularity-prior: the SecAgg+ sum of the silos' releases is not usable ({why})")
    try:
        counts = check_release_sum(total, [r for _, r in released])
    except ReplyRejected as why:
        raise PriorError(f"popularity-prior: the SecAgg+ sum of the silos' releases is not usable ({why})") from None
    released.sort(key=lambda pair: pair[1].metrics.get("silo", math.inf))
    total = ReleasedSum(counts, math.sqrt(sum(r.noise ** 2 for _, r in released)))
    prior = total.prior()
    run.save_prior(prior)
    run.save_release(*total)
    print(f"uirl: popularity prior from the SecAgg+ sum of {', '.join(who for who, _ in released)} "
          f"({len(released)} noise shares) over {len(prior)} items", flush=True)
    return prior
