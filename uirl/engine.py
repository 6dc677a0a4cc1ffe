"""A federated run in one process: the same silo code and the same aggregation as ``flwr run``.

Each round sends the sampled silos what the ServerApp sends (:func:`uirl.wire.downlink`: the
trainable arrays only), calls :func:`uirl.federated.local_train` on them and compresses what leaves
each one with :func:`uirl.federated.released_update` (what the ClientApp does), hands the replies to
:func:`uirl.rounds.train_round` -- the very function the ServerApp's strategy calls: the same checks,
combination, round row and round failure -- then evaluates the global model
on every silo with :func:`uirl.federated.local_evaluate`. Only Flower's messaging is left out, which
makes a sweep of many runs affordable on a CPU. With ``central-dp = "fixed"`` the server clips each
update and adds Gaussian noise instead (:mod:`uirl.privacy.central`). Rows carry ``train-seconds``
and ``eval-seconds`` (this round's wall time in each).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from uirl.config import Config, SiloConfig
from uirl.errors import RunFailed, UirlError
from uirl.federated import (EvaluationWithheld, ReleasedSum, hash_seed, local_evaluate, local_release, local_train,
                            released_update)
from uirl.message_names import COUNTS_ARRAY
from uirl.model import InterestModel
from uirl.model.build import build_model
from uirl.model.encoder import Encoder
from uirl.privacy import PrivacyLedger
from uirl.privacy.central import central_epsilon, central_noise
from uirl.replies import ReplyChecker, ReplyRejected, check_release, release_catalogue
from uirl.rounds import SiloReply, conclude_round, round_summary, train_round
from uirl.wire import downlink

_RANKING = ("auc", "mrr", "ndcg@5", "ndcg@10", "recall@5", "recall@10",
            "full/recall@10", "full/recall@20", "full/ndcg@10", "full/ndcg@20")


@dataclass
class FederatedResult:
    rounds: list[dict[str, Any]]  # round 0 (before training) .. R: metrics, epsilon per silo
    state: dict[str, np.ndarray]  # final global adapter state
    initial: dict[str, np.ndarray]  # the round-0 state (the pretrained model: the audit's reference)
    model: InterestModel  # a model to load either state into
    encoder: Encoder  # its encoder (tokenizer) for building text banks
    privacy: dict[str, Any]  # the guarantee and its accounting (see :func:`accounting`)


def weighted_metrics(per_silo: list[dict[str, float]], keys: Sequence[str] = _RANKING) -> dict[str, float]:
    """Silo metrics averaged with ``num-examples`` weights (as FedAvg aggregates evaluation); only
    ``keys`` (default: the sampled-candidate ranking metrics) that the first silo has."""
    if not per_silo:
        return {}
    total = sum(m["num-examples"] for m in per_silo)
    return {k: sum(m[k] * m["num-examples"] for m in per_silo) / total for k in keys
            if all(k in m for m in per_silo)}


def accounting(cfg: Config, ledgers: dict[int, str | None], rounds_done: int) -> dict[str, Any]:
    """What guarantee a run has, with every number needed to recompute it."""
    if cfg.federation.central_dp:
        sigma = central_noise(cfg)
        return {"guarantee": "client-level", "unit": "one silo (all its users)",
                "epsilon": central_epsilon(noise_multiplier=sigma, sample_rate=cfg.federation.fraction_train,
                                           rounds=rounds_done, delta=cfg.privacy.target_delta),
                "delta": cfg.privacy.target_delta, "noise-multiplier": sigma,
                "sample-rate": cfg.federation.fraction_train, "steps": rounds_done, "accountant": "rdp",
                "clip": cfg.federation.central_clip}
    if cfg.privacy.enabled and any(ledgers.values()):
        parsed = [PrivacyLedger.from_json(text) for text in ledgers.values() if text]
        worst = max(parsed, key=lambda led: led.epsilon())
        return {"guarantee": "user-level per silo", "unit": "one user of a silo",
                "epsilon": worst.epsilon(), "delta": worst.target_delta,
                "noise-multiplier": worst.noise_multiplier, "sample-rate": worst.sample_rate,
                "steps": worst.steps, "accountant": worst.accountant, "clip": cfg.privacy.clip_norm}
    return {"guarantee": "none", "unit": "-", "epsilon": math.inf, "delta": 0.0, "noise-multiplier": 0.0,
            "sample-rate": None, "steps": None, "accountant": None, "clip": None}


def _sample_silos(cfg: Config, num_silos: int, rng: np.random.Generator) -> list[int]:
    fraction = cfg.federation.fraction_train
    if cfg.federation.central_dp:  # Poisson: what the accountant's sampling amplification assumes
        return [k for k in range(num_silos) if rng.random() < fraction]
    size = max(int(num_silos * fraction), 1)  # as Flower's FedAvg samples nodes
    return sorted(rng.choice(num_silos, size=size, replace=False).tolist())


def released_sum(released: list[np.ndarray], noise: list[float] | None = None) -> ReleasedSum | None:
    """The sum of the silos' released count vectors and its noise standard deviation, from each
    one's (0 for exact counts); None if no silo released."""
    if not released:
        return None
    if len({len(c) for c in released}) != 1:
        raise UirlError("silos released popularity counts over catalogues of different sizes")
    return ReleasedSum(np.sum(released, axis=0), math.sqrt(sum(s * s for s in noise or [])))


def popularity_prior(released: list[np.ndarray], noise: list[float] | None = None) -> np.ndarray | None:
    """The server's prior from the silos' released count vectors and each one's noise standard
    deviation (0 for exact counts): :func:`~uirl.privacy.popularity.prior_from_counts` of the sum."""
    total = released_sum(released, noise)
    return None if total is None else total.prior()


def _release_prior(cfg: Config, silos: list[SiloConfig], ledgers: dict[int, str | None]
                   ) -> tuple[ReleasedSum | None, dict[int, str | None]]:
    """Every silo's popularity release, each checked by :func:`uirl.replies.check_release` as the
    ServerApp checks it, and the sum of those released (None if every silo refused); with the
    silos' new ledgers. These silos run this process's own code, so a rejected release is a bug, not
    a hostile silo: it stops the run instead of quietly leaving that silo out."""
    out = [local_release(cfg, s, ledger_json=ledgers[k]) for k, s in enumerate(silos)]
    replies = [([metrics], [] if counts is None else [{COUNTS_ARRAY: counts}]) for counts, metrics, _ in out]
    catalogue = release_catalogue(arrays for _, arrays in replies)
    released = []
    for k, (metrics, arrays) in enumerate(replies):
        try:
            released.append(check_release(metrics, arrays, catalogue=catalogue, dp=cfg.privacy.enabled))
        except ReplyRejected as why:
            raise RunFailed(f"silo {k}: popularity release rejected: {why}") from None
    released = [r for r in released if r.counts is not None]
    shares = cfg.privacy.popularity_noise_shares
    if len(released) < shares:  # the sum would hold less noise than the silos' ledgers record
        raise RunFailed(f"popularity-noise-shares = {shares} but only {len(released)} silo(s) released their counts")
    total = released_sum([r.counts for r in released], [r.noise for r in released])
    return total, {k: ledger for k, (_, _, ledger) in enumerate(out)}


def reported_metrics(cfg: Config, silos: list[SiloConfig], state: dict[str, np.ndarray], prior: np.ndarray | None,
                     release: ReleasedSum | None = None) -> list[dict[str, float]]:
    """The evaluation metrics of the silos that report them (see :class:`~uirl.federated.EvaluationWithheld`);
    ``release`` is what the silos' ``local-prior`` reads."""
    out = []
    for silo in silos:
        try:
            out.append(local_evaluate(cfg, silo, state, prior=prior, release=release))
        except EvaluationWithheld:
            pass
    return out


def run_federated(cfg: Config, num_silos: int, *, on_round: Callable[[dict[str, Any]], None] | None = None,
                  round0: bool = True) -> FederatedResult:
    """``cfg.federation.num_rounds`` rounds over ``num_silos`` simulated silos; ``on_round`` gets
    each round's row as it is made. Round 0 evaluates the untrained model (``round0=False``: not).
    Raises :class:`~uirl.errors.RunFailed` for a round with fewer valid updates than ``min-nodes``,
    as the ServerApp does (:func:`uirl.rounds.conclude_round`)."""
    silos = [SiloConfig(partition_id=k, num_partitions=num_silos) for k in range(num_silos)]
    model, encoder = build_model(cfg)
    initial = {n: t.cpu().numpy().copy() for n, t in model.adapter_state().items()}
    trainable = set(model.trainable_state())
    checker = ReplyChecker(cfg, trainable)
    state = dict(initial)
    ledgers: dict[int, str | None] = {k: None for k in range(num_silos)}
    rng = np.random.default_rng(hash_seed(cfg.train.seed, 7919))
    prior, release = None, None
    if cfg.model.popularity_prior:  # each silo's (noised) counts, checked and summed by the server
        release, ledgers = _release_prior(cfg, silos, ledgers)
        prior = None if release is None else release.prior()

    def evaluate(server_round: int, extra: dict[str, Any]) -> None:
        metrics = {}
        every = cfg.federation.eval_every
        if server_round in (0, cfg.federation.num_rounds) or server_round % every == 0:
            started = time.perf_counter()
            metrics = weighted_metrics(reported_metrics(cfg, silos, downlink(state, trainable), prior, release))
            metrics["eval-seconds"] = time.perf_counter() - started
        row = {"round": server_round, **extra, **metrics}
        rows.append(row)
        if on_round is not None:
            on_round(row)

    rows: list[dict[str, Any]] = []
    if round0:
        evaluate(0, {"epsilon": accounting(cfg, ledgers, 0)["epsilon"]} if prior is not None else {})
    for server_round in range(1, cfg.federation.num_rounds + 1):
        started = time.perf_counter()
        sampled = _sample_silos(cfg, num_silos, rng)
        sent = downlink(state, trainable)
        replies = []
        for k in sampled:
            arrays, metrics, ledgers[k] = local_train(cfg, silos[k], sent, ledger_json=ledgers[k],
                                                      server_round=server_round, prior=prior)
            payload = released_update(cfg, silos[k], arrays, sent, server_round=server_round)
            replies.append(SiloReply(k, [metrics], [] if payload is None else [payload]))
        result = train_round(cfg, checker, state, server_round, replies, asked=len(sampled),
                             expected_silos=cfg.federation.fraction_train * num_silos if cfg.federation.central_dp
                             else None)
        state.update(result.new or {})
        summary = round_summary(result.rows, asked=result.asked)
        if cfg.federation.central_dp:
            summary["epsilon"] = accounting(cfg, ledgers, server_round)["epsilon"]
        conclude_round(cfg, result)
        evaluate(server_round, {**summary, "train-seconds": time.perf_counter() - started})
    return FederatedResult(rounds=rows, state=state, initial=initial, model=model, encoder=encoder,
                           privacy=accounting(cfg, ledgers, cfg.federation.num_rounds))
