"""Every silo's reply is checked here before it touches the global model or the run directory.

A reply is untrusted input: a broken silo (a bug, a damaged ledger, a diverged loss) or a hostile
one can put anything in the records Flower carries. :class:`ReplyChecker` accepts a reply only if

- it holds exactly one metric record whose keys are exactly what an honest silo of this run (with
  or without DP) sends for the status it claims (:data:`uirl.federated.TRAIN_REPLY_KEYS`),
  and every value is a finite number in its range (rates in [0, 1], epsilon >= 0, counts whole and
  >= 1; epsilon may be infinite only without DP), and ``rounds-trained`` -- the silo's lifetime count,
  which a ledger file carries across runs -- grows by at most one per round since the node's last reply;
- a trained round carries exactly one array record with exactly the trainable arrays, in the
  global model's shapes and dtypes, finite, and no farther from the global model than an honest
  silo of its size can move it (:func:`uirl.aggregation.honest_update_norm`, or ``max-update-norm``
  when the run sets one); a refusal carries no arrays. With ``compression`` the record is the
  compressed update delta: its form is checked first (names, dtypes, shapes, int8 scales:
  :func:`uirl.compression.check_payload`), then it is decompressed onto the global arrays and the
  result checked as above.

A rejected reply raises :class:`ReplyRejected` with a one-line reason; the caller drops it.

The popularity release (``popularity-prior``, once before round 0) is checked here too, by
:func:`check_release`: the keys an honest release of the status it claims has, every value a number
in its range, and for a release exactly one array record holding exactly one finite count vector
over the catalogue most releasing silos share (:func:`release_catalogue`), within what its
``num-examples`` users can give, with a noise level > 0 under DP. The ServerApp
(:mod:`server.popularity`) and the in-process engine (:mod:`uirl.engine`) both call it.

Identity is the node id the transport gives (Flower's ``src_node_id``, authenticated by SuperNode
authentication in a deployment), never the ``silo`` a reply claims. ``silo`` is kept only as a
label, and only while it is consistent: the label this node gave first in this run, and no other
node's. A reply with an inconsistent label is judged on its merits; its row keeps the node's first
label, or none if the label it claims first is already another node's.

Weights. The server does not know silo sizes in advance, so each node's ``num-examples`` (its
FedAvg weight, and what its update bound is computed from) is capped at the first count it reported
in this run -- training and evaluation counts separately. That keeps a node from raising its own
weight once it has been accepted (a silo's user count does not change during a run), with no bound
to configure that would be too tight for one deployment and meaningless for another. A node that
lies from its very first reply keeps the weight it claimed: the robust rules (``aggregation =
median`` or ``trimmed-mean``) ignore weights for that reason.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from uirl.aggregation import UpdateRejected, check_update, honest_update_norm
from uirl.compression import PayloadError, decode_update
from uirl.config import Config
from uirl.errors import RunFailed
from uirl.federated import (DP_METRICS, EVAL_METRICS, FULL_METRICS, KEPT_UNDER_DP, RELEASE_REPLY_KEYS, STATUS_OK,
                            TRAIN_REPLY_KEYS)
from uirl.message_names import COUNTS_ARRAY


class ReplyRejected(UpdateRejected):
    """A reply the server drops; the message says why, on one line."""


#: (low, high, whole number) of every metric a reply may carry. Unlisted evaluation metrics are
#: rates in [0, 1].
_RANGES: dict[str, tuple[float, float, bool]] = {
    "num-examples": (1, math.inf, True),
    "silo": (0, 2 ** 31 - 1, True),
    "status": (min(TRAIN_REPLY_KEYS), max(TRAIN_REPLY_KEYS), True),
    "train-loss": (-math.inf, math.inf, False),
    "steps": (0, math.inf, True),
    "users-sampled": (0, math.inf, True),
    "epsilon": (0, math.inf, False),
    "delta": (0, 1, False),
    "target-epsilon": (0, math.inf, False),
    "noise-multiplier": (0, math.inf, False),
    "sample-rate": (0, 1, False),
    "rounds-trained": (0, math.inf, True),
    "replayed": (0, 1, True),
    "release-noise": (0, math.inf, False),
}
_RATE = (0.0, 1.0, False)


@dataclass(frozen=True)
class TrainReply:
    node: int
    silo: int | None  # the label, if consistent (see the module docstring)
    metrics: dict[str, float]
    weight: float  # num-examples after the cap (0 for a refusal without a count)
    bound: float  # the longest update this node may send (its honest bound or max-update-norm)
    update: dict[str, np.ndarray] | None  # None: refused (metrics say why), or masked under SecAgg+
    notes: tuple[str, ...] = field(default=())  # what was adjusted: a dropped label, a capped count

    @property
    def trained(self) -> bool:
        """The silo trained this round (its update is in ``update``, or in the masked mean)."""
        return self.metrics["status"] == STATUS_OK


@dataclass(frozen=True)
class EvalReply:
    node: int
    silo: int | None
    metrics: dict[str, float]
    weight: float
    notes: tuple[str, ...] = field(default=())


def _one_record(records: Sequence[Mapping]) -> dict:
    if len(records) != 1:
        raise ReplyRejected(f"{len(records)} metric records, expected exactly one")
    return dict(records[0])


def _check_keys(values: Mapping, allowed: Sequence[frozenset], what: str) -> None:
    if any(set(values) == keys for keys in allowed):
        return
    nearest = min(allowed, key=lambda keys: len(keys ^ set(values)))
    extra, missing = sorted(set(values) - nearest), sorted(nearest - set(values))
    raise ReplyRejected(f"the metric keys of {what} differ from an honest one's "
                        f"(extra {[str(k)[:40] for k in extra[:3]]}, missing {missing[:3]})")


def _train_keys(status: float, dp: bool) -> frozenset:
    return TRAIN_REPLY_KEYS[status] - (KEPT_UNDER_DP if dp else DP_METRICS)


def _eval_keys(full_catalogue: bool) -> tuple[frozenset, ...]:
    """With ``full-catalogue`` a silo may still leave the full-catalogue metrics out (a test target
    missing from the catalogue); without it, it never sends them."""
    return (EVAL_METRICS, EVAL_METRICS - FULL_METRICS) if full_catalogue else (EVAL_METRICS - FULL_METRICS,)


def _check_value(key: str, value, *, infinite_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyRejected(f"{key} = {str(value)[:40]!r} is not a number")
    value = float(value)
    low, high, whole = _RANGES.get(key, _RATE)
    if math.isnan(value) or (math.isinf(value) and not infinite_ok):
        raise ReplyRejected(f"{key} = {value} is not finite")
    if not low <= value <= high or (whole and math.isfinite(value) and not value.is_integer()):
        kind = "a whole number" if whole else "a number"
        raise ReplyRejected(f"{key} = {value:g} is not {kind} in [{low:g}, {high:g}]")
    return value


class ReplyChecker:
    """What the server remembers about each node during one run (its silo label, its first counts),
    and the checks of :mod:`uirl.replies` against it. One per run; not shared between runs."""

    def __init__(self, cfg: Config, trainable: set[str]) -> None:
        self.cfg = cfg
        self.trainable = set(trainable)
        self._label_of: dict[int, int] = {}  # node -> silo label
        self._node_of: dict[int, int] = {}  # silo label -> node
        self._first: dict[tuple[str, int], float] = {}  # (train|evaluate, node) -> first count
        self._rounds: dict[int, tuple[int, float]] = {}  # node -> (server round, rounds-trained) last seen

    def train(self, node: int, server_round: int, metrics: Sequence[Mapping],
              arrays: Sequence[Mapping[str, np.ndarray]] | None, current: dict[str, np.ndarray]) -> TrainReply:
        """A training reply (its metric records and array records), checked against the global
        arrays ``current`` the silo's update was computed from; raises :class:`ReplyRejected`.
        ``arrays=None``: the update is masked (SecAgg+) and only the metrics can be checked; the
        result has no update. The result's ``update`` is the new trainable arrays, decompressed."""
        values = self._train_metrics(_one_record(metrics))
        self._check_progress(node, server_round, values.get("rounds-trained"))
        silo, notes = self._label(node, values["silo"])
        weight, capped = self._weight("train", node, values.get("num-examples"))
        notes += capped
        sizes = sum(int(np.prod(current[name].shape)) for name in self.trainable)
        bound = self.cfg.federation.max_update_norm or honest_update_norm(self.cfg, weight, sizes)
        update = None
        if arrays is not None and values["status"] == STATUS_OK:
            if len(arrays) != 1:
                raise ReplyRejected(f"a trained round with {len(arrays)} array records, expected exactly one")
            payload = {name: np.asarray(value) for name, value in arrays[0].items()}
            mode = self.cfg.federation.compression
            try:
                update = decode_update(payload, current, self.trainable, mode)
            except PayloadError as why:
                raise ReplyRejected(f"malformed {mode} update: {why}") from None
            check_update(update, current, self.trainable, bound)
        elif arrays:
            raise ReplyRejected(f"a refusal (status {values['status']:g}) that carries arrays")
        self._remember(node, silo, "train", values.get("num-examples"))
        if "rounds-trained" in values:
            self._rounds[node] = (server_round, values["rounds-trained"])
        return TrainReply(node=node, silo=silo, metrics=values, weight=weight, bound=bound, update=update,
                          notes=notes)

    def evaluate(self, node: int, metrics: Sequence[Mapping]) -> EvalReply:
        """An evaluation reply's metric records, checked; raises :class:`ReplyRejected`."""
        values = _one_record(metrics)
        _check_keys(values, _eval_keys(self.cfg.data.full_catalogue), "an evaluation reply")
        values = {key: _check_value(key, value) for key, value in values.items()}
        silo, notes = self._label(node, values["silo"])
        weight, capped = self._weight("evaluate", node, values["num-examples"])
        self._remember(node, silo, "evaluate", values["num-examples"])
        return EvalReply(node=node, silo=silo, metrics=values, weight=weight, notes=notes + capped)

    def label(self, node: int) -> int | None:
        """The silo label this node has in this run, if it has given a consistent one."""
        return self._label_of.get(node)

    def _train_metrics(self, values: dict) -> dict[str, float]:
        status = values.get("status")
        if isinstance(status, bool) or not isinstance(status, (int, float)) or status not in TRAIN_REPLY_KEYS:
            raise ReplyRejected(f"status = {str(status)[:40]!r} is not a known status")
        _check_keys(values, (_train_keys(status, self.cfg.privacy.enabled),),
                    f"a status-{int(status)} training reply")
        infinite_ok = not self.cfg.privacy.enabled  # a silo without DP reports epsilon = inf
        return {key: _check_value(key, value, infinite_ok=infinite_ok and key == "epsilon")
                for key, value in values.items()}

    def _check_progress(self, node: int, server_round: int, rounds: float | None) -> None:
        """A silo's ledger never shrinks and gains at most one round per round it is asked in."""
        if rounds is None or node not in self._rounds:
            return
        seen_round, seen = self._rounds[node]
        if not seen <= rounds <= seen + (server_round - seen_round):
            raise ReplyRejected(f"rounds-trained went from {seen:g} (round {seen_round}) to {rounds:g} "
                                f"in round {server_round}")

    def _label(self, node: int, silo: float) -> tuple[int | None, tuple[str, ...]]:
        label = int(silo)
        mine, owner = self._label_of.get(node), self._node_of.get(label)
        if mine is not None and mine != label:
            return mine, (f"claims silo {label}, said silo {mine} before: label kept",)
        if owner is not None and owner != node:
            return None, (f"claims silo {label}, the label of node {owner}: label dropped",)
        return label, ()

    def _weight(self, kind: str, node: int, count: float | None) -> tuple[float, tuple[str, ...]]:
        if count is None:
            return 0.0, ()
        first = self._first.get((kind, node), count)
        if count > first:
            return first, (f"num-examples {count:g} above the {first:g} this node reported first: "
                           f"weighted as {first:g}",)
        return count, ()

    def _remember(self, node: int, silo: int | None, kind: str, count: float | None) -> None:
        if silo is not None and node not in self._label_of:
            self._label_of[node] = silo
            self._node_of[silo] = node
        if count is not None:
            self._first.setdefault((kind, node), count)


def check_round(server_round: int, *, trained: int, asked: int, min_nodes: int, rejected: int,
                refused: int, silent: int = 0, why: str = "") -> None:
    """Raise :class:`~uirl.errors.RunFailed` if a round has fewer valid updates than ``min-nodes``
    (or than the silos asked, if fewer were asked): what the round would average is then too
    little to stand for the federation, and averaging nothing would keep the old model while the
    run looked like it went on. ``silent``: silos asked that sent no reply within ``reply-timeout``."""
    needed = max(1, min(min_nodes, asked))
    if trained < needed:
        reason = f"; {why}" if why else ""
        no_reply = f", {silent} sent no reply within reply-timeout" if silent else ""
        raise RunFailed(f"round {server_round}: {trained} valid update(s) from {asked} silo(s) asked, fewer than "
                        f"the {needed} needed (min-nodes {min_nodes}); {rejected} reply(ies) rejected, "
                        f"{refused} refused{no_reply}{reason}")


#: How many noise standard deviations a released count may lie outside [0, num-examples] (the
#: range of an exact count: each user adds at most 1 to an item): an honest silo's Gaussian noise
#: passes this on a catalogue of 10^15 items with probability 1 - 10^-8.
_RELEASE_SIGMAS = 10.0


@dataclass(frozen=True)
class Release:
    """A checked popularity-release reply."""

    metrics: dict[str, float]  # the silo's metrics, each a number in its range
    counts: np.ndarray | None  # float64, one count per catalogue item; None: the silo refused (``status``)
    noise: float  # the counts' noise standard deviation (0: exact counts, DP off)


def release_catalogue(arrays: Iterable[Sequence[Mapping[str, np.ndarray]]]) -> int | None:
    """The catalogue size most replies' count vectors share (each item of ``arrays`` is one reply's
    array records); None if no reply carries a count vector. Counts over a catalogue of another size
    cannot be summed with theirs: :func:`check_release` rejects them."""
    sizes = Counter(np.shape(records[0][COUNTS_ARRAY])[0] for records in arrays
                    if len(records) == 1 and COUNTS_ARRAY in records[0] and np.ndim(records[0][COUNTS_ARRAY]) == 1)
    return sizes.most_common(1)[0][0] if sizes else None


def check_release(metrics: Sequence[Mapping], arrays: Sequence[Mapping[str, np.ndarray]], *,
                  catalogue: int | None, dp: bool, masked: bool = False) -> Release:
    """One popularity-release reply (its metric records and array records), checked; raises
    :class:`ReplyRejected`. ``catalogue``: the length the counts must have (see
    :func:`release_catalogue`; None: any); ``dp``: the run's ``dp`` (the release must be noised).
    A refusal (a known status other than OK, with the keys an honest refusal has and no arrays) is
    returned with ``counts`` None. ``masked``: a share of a distributed release, whose counts are
    inside the SecAgg+ sum (:func:`check_release_sum`): only the metrics are checked, and a release
    is returned with ``counts`` None too (tell it from a refusal by its ``status``)."""
    values = _one_record(metrics)
    status = values.get("status")
    if isinstance(status, bool) or not isinstance(status, (int, float)) or status not in RELEASE_REPLY_KEYS:
        raise ReplyRejected(f"status = {str(status)[:40]!r} is not a known status of a release")
    keys = RELEASE_REPLY_KEYS[status] if dp else RELEASE_REPLY_KEYS[status] - DP_METRICS - {"release-noise"}
    _check_keys(values, (keys,), f"a status-{int(status)} release reply")
    infinite_ok = not dp  # a silo without DP reports epsilon = inf
    values = {key: float(value) if key == "status" else
              _check_value(key, value, infinite_ok=infinite_ok and key == "epsilon") for key, value in values.items()}
    if status != STATUS_OK:
        if arrays:
            raise ReplyRejected(f"a refusal (status {status:g}) that carries arrays")
        return Release(metrics=values, counts=None, noise=0.0)
    noise = values.get("release-noise", 0.0)
    if dp and noise <= 0:
        raise ReplyRejected(f"release-noise = {noise:g} is not a valid noise level under DP (expected > 0)")
    if masked:
        return Release(metrics=values, counts=None, noise=noise)
    return Release(metrics=values, counts=_release_counts(arrays, catalogue, values["num-examples"], noise),
                   noise=noise)


def check_release_sum(counts: np.ndarray, releases: Sequence[Release]) -> np.ndarray:
    """The unmasked sum of a distributed release, checked as one release of all its silos' users
    with their noise (variances add); raises :class:`ReplyRejected`."""
    users = sum(r.metrics["num-examples"] for r in releases)
    noise = float(np.sqrt(sum(r.noise ** 2 for r in releases)))
    return _release_counts([{COUNTS_ARRAY: counts}], None, users, noise)


def _release_counts(arrays: Sequence[Mapping[str, np.ndarray]], catalogue: int | None, users: float,
                    noise: float) -> np.ndarray:
    if len(arrays) != 1:
        raise ReplyRejected(f"a release with {len(arrays)} array records, expected exactly one")
    names = set(arrays[0])
    if names != {COUNTS_ARRAY}:
        extra = sorted(str(n)[:40] for n in names - {COUNTS_ARRAY})[:3]
        raise ReplyRejected(f"a release's arrays must be exactly {COUNTS_ARRAY!r} (extra {extra}, "
                            f"missing {sorted({COUNTS_ARRAY} - names)})")
    counts = np.asarray(arrays[0][COUNTS_ARRAY])
    if counts.dtype.kind not in "iuf" or counts.ndim != 1:
        raise ReplyRejected(f"the counts are {counts.dtype} of shape {counts.shape}, expected one number per "
                            f"catalogue item")
    if catalogue is not None and len(counts) != catalogue:
        raise ReplyRejected(f"its counts cover {len(counts)} items, the other silos' catalogue {catalogue}")
    counts = counts.astype(np.float64)
    finite = np.isfinite(counts)
    if not finite.all():
        raise ReplyRejected(f"{int((~finite).sum())} count(s) not finite, e.g. item {int(np.flatnonzero(~finite)[0])}")
    low, high = -_RELEASE_SIGMAS * noise, users + _RELEASE_SIGMAS * noise
    outside = (counts < low) | (counts > high)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ReplyRejected(f"count {counts[i]:g} of item {i} is outside [{low:g}, {high:g}], what {users:g} users "
                            f"and noise {noise:g} can give")
    return counts
