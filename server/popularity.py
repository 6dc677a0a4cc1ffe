"""The private popularity prior under ``flwr run``: every silo releases its item counts once, before round 0.

Why a query message: Flower 1.41's Message API has three message categories (train, evaluate,
query) and routes ``<category>.<action>`` to the ClientApp function registered for that action,
here ``@app.query(RELEASE_ACTION)``. The release is neither training nor evaluation. As a train
message with a task field it would pass through the SecAgg+ mod, which masks train replies as
model updates, and every train handler would have to branch on the field; a query with its own
action reaches the release handler only, and Flower's strategies never see it.

The server asks every connected silo (once ``min-nodes`` have connected), checks each reply
(status OK, one finite count per catalogue item, a noise level that is > 0 under DP), and builds
the prior from the sum with :func:`uirl.engine.popularity_prior` -- the same post-processing as the
in-process engine. The catalogue size is the one most releasing silos share. A silo that refuses,
fails or sends something else is left out, and the console says which; with none left the run
stops. Every reply's privacy numbers (the silo's epsilon after the release) go to
``privacy.jsonl`` as round-0 rows. The prior is saved in the run directory
(:meth:`uirl.rundir.RunDirectory.save_prior`); a resumed run sends that one again rather than ask
the silos for a second release.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from flwr.app import Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from uirl.config import Config
from uirl.engine import popularity_prior
from uirl.errors import UirlError
from uirl.federated import COUNTS_ARRAY, RELEASE_ACTION, STATUS_OK
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
    who: str  # "silo <partition-id>", or "node <id>" for a reply that names no silo
    counts: np.ndarray | None  # None: left out of the prior
    noise: float  # the release's noise standard deviation (0: exact counts, DP off)
    metrics: dict  # the privacy row: the silo's metrics, ``accepted``, and why a reply was left out

    @property
    def why(self) -> str:
        return str(self.metrics.get("error") or self.metrics.get("rejected"))


def _read(cfg: Config, msg: Message) -> _Reply:
    """One reply, checked. A reason to leave it out goes under ``error`` (the silo's own) or
    ``rejected`` (the server's)."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        return _Reply(f"node {node}", None, 0.0, {"node-id": node, "accepted": False,
                                                  "error": _last_line(msg.error.reason)})
    content = msg.content
    metrics = dict(content["metrics"]) if "metrics" in content.metric_records else {}
    if any(not isinstance(v, (int, float)) or math.isnan(v) for v in metrics.values()) or not (
            math.isfinite(metrics.get("silo", 0.0))):
        return _Reply(f"node {node}", None, 0.0, {"node-id": node, "accepted": False,
                                                  "rejected": "a metric that is not a number, or a silo label "
                                                              "that is not finite"})
    metrics["node-id"] = node  # rows are keyed by Flower's node id; the silo is only a label
    who = f"silo {int(metrics['silo'])}" if "silo" in metrics else f"node {node}"
    if metrics.get("status") != STATUS_OK:
        error = str(content["error"].get("message", "")) if "error" in content.config_records else ""
        error = error or f"status {metrics.get('status')}"
        return _Reply(who, None, 0.0, {**metrics, "accepted": False, "error": error})
    arrays = content.array_records.get("arrays")
    counts = np.asarray(arrays[COUNTS_ARRAY].numpy()) if arrays is not None and COUNTS_ARRAY in arrays else None
    noise = float(metrics.get("release-noise", 0.0))
    if counts is None or counts.ndim != 1 or not np.isfinite(counts).all():
        why = "no finite count vector in the reply"
    elif not math.isfinite(noise) or noise < 0 or (cfg.privacy.enabled and noise == 0):
        why = f"release noise {noise} is not a valid noise level{' under DP' if cfg.privacy.enabled else ''}"
    else:
        return _Reply(who, counts, noise, {**metrics, "accepted": True})
    return _Reply(who, None, 0.0, {**metrics, "accepted": False, "rejected": why})


def _same_catalogue(replies: list[_Reply]) -> list[_Reply]:
    """Counts over a catalogue of another size than most releasing silos' cannot be summed with
    theirs: those replies are marked rejected."""
    sizes = Counter(len(r.counts) for r in replies if r.counts is not None)
    if not sizes:
        return replies
    size = sizes.most_common(1)[0][0]

    def rejected(r: _Reply) -> _Reply:
        why = f"its counts cover {len(r.counts)} items, the other silos' catalogue {size}"
        return r._replace(counts=None, metrics={**r.metrics, "accepted": False, "rejected": why})

    return [r if r.counts is None or len(r.counts) == size else rejected(r) for r in replies]


def release_prior(grid: Grid, cfg: Config, run: RunDirectory, *, on_release: Callable[[list[dict]], None],
                  timeout: float) -> np.ndarray:
    """Ask every connected silo for its release, build the prior, save it in ``run``; return it.

    ``on_release`` receives the privacy row of every reply (keyed by ``node-id``). Raises
    :class:`PriorError` if no silo released usable counts."""
    _, nodes = sample_nodes(grid, cfg.federation.min_nodes, 0)
    answers = list(grid.send_and_receive(
        [Message(RecordDict(), dst_node_id=node, message_type=RELEASE_MESSAGE) for node in nodes], timeout=timeout))
    replies = _same_catalogue(sorted((_read(cfg, msg) for msg in answers),
                                     key=lambda r: r.metrics.get("silo", math.inf)))
    on_release([r.metrics for r in replies])
    replied = {msg.metadata.src_node_id for msg in answers}
    left_out = [(f"node {node}", "no reply") for node in nodes if node not in replied]
    left_out += [(r.who, r.why) for r in replies if r.counts is None]
    released = [r for r in replies if r.counts is not None]
    if not released:
        raise PriorError("popularity-prior: no silo released its popularity counts ("
                         + "; ".join(f"{who}: {why}" for who, why in left_out) + ")")
    for who, why in left_out:
        print(f"uirl: popularity prior built without {who}: {why}", flush=True)
    prior = popularity_prior([r.counts for r in released], [r.noise for r in released])
    run.save_prior(prior)
    print(f"uirl: popularity prior from {', '.join(r.who for r in released)} over {len(prior)} items", flush=True)
    return prior
