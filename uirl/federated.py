"""What a silo does in a federated round, with no Flower in sight.

The ClientApp calls :func:`local_train` / :func:`local_evaluate` with plain arrays and strings and
wraps what comes back into Flower records. Keeping this here means the whole client logic --
including what leaves the silo -- is tested without a Flower runtime.

What reaches the silo: the global model's trainable arrays only (:func:`uirl.wire.downlink`); the
frozen ones (the base encoder, FFA-LoRA's A matrices, the whole LoRA adapter in ``cached`` mode) are
rebuilt on the silo from the base model and the run's seed, bit for bit as the server holds them.

What leaves the silo: the trainable adapter/head arrays, or their update delta compressed
(run config ``compression``, :func:`released_update`) -- never the frozen base, never user data --
and the scalar metrics named in :data:`TRAIN_METRICS` / :data:`EVAL_METRICS`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from uirl.compression import encode_update
from uirl.config import Config, SiloConfig
from uirl.data.silo import Silo, load_silo
from uirl.model import InterestModel, TextBank
from uirl.model.build import build_model
from uirl.privacy import PrivacyLedger, plan_noise_multiplier
from uirl.privacy.accountant import PrivacyError
from uirl.privacy.ledger_file import LedgerFile, PopularityRelease, Release, digest_arrays
from uirl.errors import EvaluationWithheld, UirlError
from uirl.message_names import RELEASE_NOISE_ARRAY, RELEASE_SUM_ARRAY
from uirl.model.vector_cache import load_catalogue_vectors
from uirl.privacy.dp_sgd import secure_sampling_rng
from uirl.privacy.popularity import (distributed_release, gaussian_release, integer_counts, plan_sgd_noise_after_release,
                                     prior_from_counts, release_noise, release_scale, user_normalised_counts)
from uirl.threads import apply_threads
from uirl.train import encode_texts, evaluate, sampling_plan, train_round

STATUS_OK = 0
STATUS_BUDGET_EXHAUSTED = 1
STATUS_LEDGER_ERROR = 2  # the silo's ledger is corrupt or missing where it must exist: fail closed
STATUS_REPLAY_REFUSED = 3  # asked again for a round already released, with a different global model
STATUS_UNSUPPORTED = 4  # asked for something this silo's configuration cannot do safely (the reply says why)

# Wire names shared by server/app.py and client/app.py live in uirl.message_names (light to import).
#: What each refusal status means, in words (for logs).
STATUS_MEANING = {STATUS_BUDGET_EXHAUSTED: "privacy budget spent",
                  STATUS_LEDGER_ERROR: "privacy ledger damaged or lost",
                  STATUS_REPLAY_REFUSED: "round already released with another global model",
                  STATUS_UNSUPPORTED: "not supported by this silo's configuration"}

#: The stream of :func:`hash_seed` that seeds a silo's stochastic rounding (``compression = int8``).
_ROUNDING_STREAM = 2

TRAIN_METRICS = frozenset({"num-examples", "silo", "status", "train-loss", "steps", "users-sampled",
                           "epsilon", "delta", "target-epsilon", "noise-multiplier", "sample-rate",
                           "rounds-trained", "replayed"})
EVAL_METRICS = frozenset({"num-examples", "silo", "auc", "mrr", "ndcg@5", "ndcg@10", "recall@5", "recall@10",
                          "full/recall@10", "full/recall@20", "full/ndcg@10", "full/ndcg@20"})
RELEASE_METRICS = frozenset({"num-examples", "silo", "status", "epsilon", "delta", "target-epsilon",
                             "noise-multiplier", "sample-rate", "rounds-trained", "release-noise"})
#: What only a silo under DP reports: its accountant's state.
DP_METRICS = frozenset({"target-epsilon", "sample-rate", "rounds-trained"})
#: What a silo under DP keeps to itself: the round's training loss and the size of its Poisson
#: sample are functions of its users' data and of the secret sampling, which the DP guarantee does
#: not cover, so they never leave it (the silo's own console shows them, see :class:`StepProgress`).
#: Without DP nothing is private and a silo reports them.
KEPT_UNDER_DP = frozenset({"train-loss", "users-sampled"})
#: The full-catalogue evaluation metrics (absent when ``full-catalogue`` is off, or a target is unknown).
FULL_METRICS = frozenset(k for k in EVAL_METRICS if k.startswith("full/"))

#: The metric keys of an honest training reply, by ``status``, less :data:`KEPT_UNDER_DP` under DP
#: (without DP a silo has no accountant: less :data:`DP_METRICS`). The server accepts a reply only if
#: its keys are exactly the set for the status it claims (:mod:`uirl.replies`).
TRAIN_REPLY_KEYS = {
    STATUS_OK: TRAIN_METRICS,
    STATUS_BUDGET_EXHAUSTED: TRAIN_METRICS - {"train-loss", "users-sampled"},  # nothing trained
    STATUS_LEDGER_ERROR: frozenset({"status", "silo", "steps"}),  # refused before reading the ledger
    STATUS_REPLAY_REFUSED: frozenset({"status", "silo", "steps"}),
}
#: The metric keys of an honest popularity-release reply, by ``status``, under DP (without DP a silo
#: has no accountant and adds no noise: less :data:`DP_METRICS` and ``release-noise``). See
#: :func:`local_release_durable` for the refusals and :func:`uirl.replies.check_release` for the check.
RELEASE_REPLY_KEYS = {
    STATUS_OK: RELEASE_METRICS,
    STATUS_REPLAY_REFUSED: RELEASE_METRICS - {"release-noise"},  # released before: nothing new, nothing spent
    STATUS_UNSUPPORTED: frozenset({"status", "silo"}),  # refused before reading the ledger
    STATUS_LEDGER_ERROR: frozenset({"status", "silo"}),  # its ledger file is damaged: fail closed
}


@dataclass
class _Worker:
    model: InterestModel
    bank: TextBank


# Per-process caches. A process holds ONE model whatever the number of silos it hosts (an in-process
# simulation hosts all of them, a Flower actor several): every message overwrites all of its
# trainable arrays (:func:`_load_global`), so nothing of one silo's training reaches another's.
# Rebuilding a model per silo was most of a many-silo round (two thirds of a 10-silo round when a
# process kept four silos' models). Silos that read the same dataset share its catalogue (tokens
# and, in ``cached`` mode, encoder vectors: both depend only on public item texts and the frozen
# encoder); every message sets the prior on it afresh. Each silo's own data is cached by load_silo.
@functools.lru_cache(maxsize=1)
def _model(cfg: Config):
    return build_model(cfg)


_CATALOGUES: dict[tuple[Config, str | None], TextBank] = {}
_MAX_CATALOGUES = 2


def _catalogue(cfg: Config, silo_cfg: SiloConfig, silo: Silo) -> TextBank:
    """The catalogue ``silo`` reads: the run's dataset (shared by every silo without a
    ``data-path``) or the silo's own directory."""
    key = (cfg, silo_cfg.data_path)
    if key not in _CATALOGUES:
        model, encoder = _model(cfg)
        bank = silo_bank(silo, encoder.tokenizer, cfg)
        if cfg.model.train_mode == "cached":
            cache_catalogue(model, bank, cfg)  # the encoder never changes in this mode
        while len(_CATALOGUES) >= _MAX_CATALOGUES:
            _CATALOGUES.pop(next(iter(_CATALOGUES)))
        _CATALOGUES[key] = bank
    return _CATALOGUES[key]


def _worker(cfg: Config, silo_cfg: SiloConfig) -> tuple[_Worker, Silo]:
    apply_threads(cfg.train.torch_threads)  # every message: Flower may reuse a process across runs
    silo = load_silo(cfg.data, silo_cfg, seed=cfg.train.seed)
    model, _ = _model(cfg)
    return _Worker(model, _catalogue(cfg, silo_cfg, silo)), silo


def cache_catalogue(model: InterestModel, bank: TextBank, cfg: Config) -> None:
    """Encode the catalogue once, or read it from the disk cache (valid while the encoder is frozen:
    the cached path, or a model that is not trained at all). The cache key is the encoder itself,
    so the zero-shot baseline and a cached-path run of the same encoder share one entry."""
    load_catalogue_vectors(model, bank, identity=f"{cfg.model.name}|{cfg.model.max_tokens}|{model.pooling}",
                           encode=encode_texts)


def catalogue_ids(silo: Silo) -> list[str]:
    """The catalogue in the order the popularity counts and the prior use (sorted ids)."""
    return sorted(silo.item_text)


def catalogue_size(cfg: Config, silo_cfg: SiloConfig) -> int:
    """How many items the silo's popularity counts cover (the length of :func:`catalogue_ids`)."""
    return len(catalogue_ids(_worker(cfg, silo_cfg)[1]))


def _load_global(worker: _Worker, silo: Silo, global_state: dict[str, np.ndarray], prior: np.ndarray | None) -> None:
    """Load the global model's arrays: every trainable one must be there (the worker's model is
    shared by the silos of a process, so a missing one would start from another silo's training);
    the frozen ones need not be, as the model was built with them (:func:`uirl.model.build.build_model`)."""
    missing = sorted(set(worker.model.trainable_state()) - set(global_state))
    if missing:
        raise UirlError(f"the global model lacks {len(missing)} trainable array(s), e.g. {missing[0]}")
    worker.model.load_adapter_state({k: torch.from_numpy(np.asarray(v)) for k, v in global_state.items()})
    attach_prior(worker.bank, silo, prior)


def attach_prior(bank: TextBank, silo: Silo, prior: np.ndarray | None) -> None:
    """Score with ``prior`` (over :func:`catalogue_ids`), or with none."""
    if prior is None:
        bank.prior = {}
        return
    ids = catalogue_ids(silo)
    if len(prior) != len(ids):
        raise UirlError(f"the popularity prior has {len(prior)} items, this silo's catalogue {len(ids)}")
    bank.set_prior(ids, np.asarray(prior, dtype=np.float64))


def silo_bank(silo: Silo, tokenizer, cfg: Config) -> TextBank:
    """The silo's item texts, plus the item categories / image features where a part reads them."""
    return TextBank(silo.item_text, tokenizer, cfg.model.max_tokens,
                    category=silo.item_category if cfg.interest.facet_heads else None,
                    image=silo.item_image if "image" in cfg.interest.view_names else None)


def new_ledger(cfg: Config, silo_cfg: SiloConfig, num_users: int) -> PrivacyLedger:
    """A silo's ledger at the start of a run: noise planned so that ``num_rounds`` rounds of local
    steps spend at most the silo's target epsilon."""
    q, steps = sampling_plan(num_users, cfg)
    target = silo_cfg.target_epsilon or cfg.privacy.target_epsilon
    sigma = cfg.privacy.noise_multiplier
    if sigma is None:
        sigma = planned_noise(cfg, target, q, steps * cfg.federation.num_rounds)
    return PrivacyLedger(accountant=cfg.privacy.accountant, noise_multiplier=sigma, sample_rate=q,
                         target_epsilon=target, target_delta=cfg.privacy.target_delta)


@functools.lru_cache(maxsize=64)
def planned_noise(cfg: Config, target: float, sample_rate: float, steps: int) -> float:
    """DP-SGD noise multiplier for the whole run (planned once per configuration and process):
    ``steps`` steps at ``sample_rate`` within ``target``, after the popularity release if the
    model uses the private prior."""
    p = cfg.privacy
    if not cfg.model.popularity_prior:
        return plan_noise_multiplier(target_epsilon=target, target_delta=p.target_delta, sample_rate=sample_rate,
                                     steps=steps, accountant=p.accountant)
    return plan_sgd_noise_after_release(release_noise_multiplier=popularity_noise(cfg, target), target_epsilon=target,
                                        target_delta=p.target_delta, sample_rate=sample_rate, steps=steps,
                                        accountant=p.accountant)


@functools.lru_cache(maxsize=64)
def popularity_noise(cfg: Config, target: float) -> float:
    p = cfg.privacy
    return release_noise(target_epsilon=target, target_delta=p.target_delta, budget=p.popularity_budget,
                         accountant=p.accountant)


class ReleasedSum(NamedTuple):
    """What the server holds after the popularity release: the sum of the silos' released count
    vectors over :func:`catalogue_ids` and the standard deviation of the noise in it (0: exact)."""

    counts: np.ndarray
    noise_std: float

    def prior(self) -> np.ndarray:
        """The prior every silo trains with (:func:`~uirl.privacy.popularity.prior_from_counts`)."""
        return prior_from_counts(self.counts, self.noise_std)


def release_arrays(release: ReleasedSum) -> dict[str, np.ndarray]:
    """The arrays an evaluate message carries the released sum in (``local-prior``)."""
    return {RELEASE_SUM_ARRAY: np.asarray(release.counts, dtype=np.float64),
            RELEASE_NOISE_ARRAY: np.asarray([release.noise_std], dtype=np.float64)}


def pop_release(arrays: dict) -> ReleasedSum | None:
    """Take the released sum out of a message's arrays (None if it has none), checking its shape."""
    counts, noise = arrays.pop(RELEASE_SUM_ARRAY, None), arrays.pop(RELEASE_NOISE_ARRAY, None)
    if counts is None and noise is None:
        return None
    counts = None if counts is None else np.asarray(counts, dtype=np.float64)
    noise = None if noise is None else np.asarray(noise, dtype=np.float64)
    if counts is None or noise is None or counts.ndim != 1 or noise.shape != (1,) or not np.isfinite(counts).all() \
            or not (np.isfinite(noise[0]) and noise[0] >= 0):
        raise UirlError("the released popularity sum in this message is malformed: expected a finite vector "
                        f"{RELEASE_SUM_ARRAY!r} and one standard deviation >= 0 {RELEASE_NOISE_ARRAY!r}")
    return ReleasedSum(counts, float(noise[0]))


def own_counts(cfg: Config, silo: Silo, *, integers: bool = False) -> np.ndarray:
    """The silo's exact popularity counts over :func:`catalogue_ids`, as its release counts them:
    the integer counts of a distributed release (``popularity-noise-shares`` > 1) when ``integers``,
    else in count units (for a distributed release, those integers over their scale, as the SecAgg+
    sum arrives), else each user's 1/sqrt(n) per training item."""
    index = {i: k for k, i in enumerate(catalogue_ids(silo))}
    user_items = [u.train_items for u in silo.users]
    if cfg.privacy.enabled and cfg.privacy.popularity_noise_shares > 1:
        scale = release_scale(cfg.federation.secagg_max_users)
        counts = integer_counts(user_items, index, scale)
        return counts if integers else counts.astype(np.float64) / scale
    if integers:
        raise ValueError("integer counts exist only for a distributed release")
    return user_normalised_counts(user_items, index)


def local_release(cfg: Config, silo_cfg: SiloConfig, *, ledger_json: str | None
                  ) -> tuple[np.ndarray | None, dict[str, float], str | None]:
    """The silo's popularity counts over :func:`catalogue_ids` (once per run), noised with the
    Gaussian mechanism and recorded in its ledger when DP is on, exact when it is off. With
    ``popularity-noise-shares`` > 1, the silo's share of a distributed release (integer counts,
    1/sqrt(k) of the noise: :func:`~uirl.privacy.popularity.distributed_release`); ``release-noise``
    is always the standard deviation this silo added, in count units.
    Returns (counts or None if refused, metrics, new ledger JSON)."""
    worker, silo = _worker(cfg, silo_cfg)
    base = {"num-examples": float(len(silo.users)), "silo": float(silo.silo_id)}
    if not cfg.privacy.enabled:
        return own_counts(cfg, silo), {**base, "status": float(STATUS_OK), **_privacy_metrics(None)}, None
    ledger = PrivacyLedger.from_json(ledger_json) if ledger_json else new_ledger(cfg, silo_cfg, len(silo.users))
    if ledger.popularity_released:
        return None, {**base, "status": float(STATUS_REPLAY_REFUSED), **_privacy_metrics(ledger)}, ledger.to_json()
    sigma = popularity_noise(cfg, ledger.target_epsilon)
    shares = cfg.privacy.popularity_noise_shares
    if shares > 1:  # distributed noise: this silo's share, seen only inside the SecAgg+ sum
        scale = release_scale(cfg.federation.secagg_max_users)
        noisy = distributed_release(own_counts(cfg, silo, integers=True), noise_multiplier=sigma, shares=shares,
                                    scale=scale, rng=secure_sampling_rng())
        added = sigma / math.sqrt(shares)
    else:
        noisy = gaussian_release(own_counts(cfg, silo), noise_multiplier=sigma, rng=secure_sampling_rng())
        added = sigma
    ledger.record_release(sigma)  # the Gaussian mechanism the (sum of the) release(s) is, at noise sigma
    return noisy, {**base, "status": float(STATUS_OK), "release-noise": added, **_privacy_metrics(ledger)}, \
        ledger.to_json()


def _ledger_file(cfg: Config, silo_cfg: SiloConfig) -> LedgerFile | None:
    return LedgerFile(silo_cfg.ledger_path) if silo_cfg.ledger_path and cfg.privacy.enabled else None


def _holding_ledger(cfg: Config, silo_cfg: SiloConfig):
    """The silo's ledger-file lock for a whole read -> spend -> write (nothing without a ledger file)."""
    file = _ledger_file(cfg, silo_cfg)
    return file.locked() if file is not None else contextlib.nullcontext()


def local_release_durable(cfg: Config, silo_cfg: SiloConfig, *, ledger_json: str | None, run: str = ""
                          ) -> tuple[np.ndarray | None, dict[str, float], str | None, str | None]:
    """:func:`local_release` under the silo's ledger lock (:meth:`~uirl.privacy.ledger_file.LedgerFile.locked`)."""
    with _holding_ledger(cfg, silo_cfg):
        return _release_durable(cfg, silo_cfg, ledger_json=ledger_json, run=run)


def _release_durable(cfg: Config, silo_cfg: SiloConfig, *, ledger_json: str | None, run: str
                     ) -> tuple[np.ndarray | None, dict[str, float], str | None, str | None]:
    """:func:`local_release` as the ClientApp calls it: never a release the silo's ledger does not record.

    ``ledger_json`` is the ledger the node's state holds, the same one :func:`local_train_durable`
    continues from, so the release composes with the silo's later DP-SGD steps. A silo that keeps
    its ledger in a file (``ledger-path``) records the release there (counts first, then the
    ledger) before the counts leave it; asked again in the same ``run`` it sends the stored counts
    (no new cost), in a new run it releases anew and the ledger composes both. A damaged file
    makes it refuse (fail closed). Returns (counts or None if refused, metrics, new ledger JSON,
    error message saying why it refused).
    """
    file = _ledger_file(cfg, silo_cfg)
    stored = None
    if file is not None:
        try:
            stored = file.read()
            if stored is not None and stored.popularity is not None and stored.popularity.run == run:
                return file.released_counts(stored.popularity), dict(stored.popularity.metrics), \
                    stored.ledger_json, None
        except PrivacyError as exc:
            return None, {"status": float(STATUS_LEDGER_ERROR), "silo": float(silo_cfg.partition_id)}, None, \
                _ledger_reason(exc, silo_cfg)
        ledger_json = stored.ledger_json if stored else None
        if ledger_json and stored.popularity is not None:  # released in an earlier run: a new run releases anew
            ledger = PrivacyLedger.from_json(ledger_json)
            ledger.popularity_released = False
            ledger_json = ledger.to_json()
    counts, metrics, new_ledger_json = local_release(cfg, silo_cfg, ledger_json=ledger_json)
    if counts is None:
        return None, metrics, new_ledger_json, ("this silo already released its popularity counts in this run; "
                                                "refusing to release twice")
    if file is not None and new_ledger_json is not None:
        file.write_popularity(new_ledger_json, PopularityRelease(run=run, counts_digest=digest_arrays(
            {"counts": counts}), metrics=metrics), counts, release=stored.release if stored else None)
    return counts, metrics, new_ledger_json, None


def _privacy_metrics(ledger: PrivacyLedger | None) -> dict[str, float]:
    if ledger is None:
        return {"epsilon": float("inf"), "delta": 0.0, "noise-multiplier": 0.0}
    return {"epsilon": ledger.epsilon(), "delta": ledger.target_delta, "target-epsilon": ledger.target_epsilon,
            "noise-multiplier": ledger.noise_multiplier, "sample-rate": ledger.sample_rate,
            "rounds-trained": float(ledger.rounds)}


def local_train(cfg: Config, silo_cfg: SiloConfig, global_state: dict[str, np.ndarray], *,
                ledger_json: str | None, server_round: int, prior: np.ndarray | None = None,
                say: Callable[[str], None] | None = None
                ) -> tuple[dict[str, np.ndarray] | None, dict[str, float], str | None]:
    """One round on one silo. Returns (trainable arrays or None if refused, metrics, new ledger JSON).
    ``say`` receives a progress line (:class:`StepProgress`) every ``progress-every`` seconds.

    Fails closed: if DP is on and this round's steps would push the silo past its target epsilon,
    nothing is trained and no arrays are returned (``status`` = budget exhausted).
    """
    worker, silo = _worker(cfg, silo_cfg)
    _load_global(worker, silo, global_state, prior)
    ledger = None
    if cfg.privacy.enabled:
        ledger = (PrivacyLedger.from_json(ledger_json) if ledger_json
                  else new_ledger(cfg, silo_cfg, len(silo.users)))
    _, steps = sampling_plan(len(silo.users), cfg)
    base = {"num-examples": float(len(silo.users)), "silo": float(silo.silo_id)}
    if ledger is not None and not ledger.can_afford(steps):
        return None, {**base, "status": float(STATUS_BUDGET_EXHAUSTED), "steps": 0.0, "replayed": 0.0,
                      **_privacy_metrics(ledger)}, ledger.to_json()
    progress = StepProgress(silo.silo_id, server_round, ledger, every=cfg.train.progress_every, say=say) if say else None
    result = train_round(worker.model, worker.bank, silo.users, silo.touched, cfg, ledger=ledger,
                         example_seed=hash_seed(cfg.train.seed, silo.silo_id, server_round), on_step=progress)
    if ledger is not None:
        ledger.rounds += 1
    arrays = {k: v.cpu().numpy().copy() for k, v in worker.model.trainable_state().items()}
    metrics = {**base, "status": float(STATUS_OK), "train-loss": result.loss, "steps": float(result.steps),
               "users-sampled": float(result.users_sampled), "replayed": 0.0, **_privacy_metrics(ledger)}
    if progress is not None:
        progress.done(result.steps, result.users_sampled, result.loss)
    if ledger is not None:
        metrics = {k: v for k, v in metrics.items() if k not in KEPT_UNDER_DP}
    return arrays, metrics, (ledger.to_json() if ledger is not None else None)


class StepProgress:
    """A silo's progress within a round, on its own console: a line every ``every`` seconds of
    training (``uirl: silo 0 round 3: step 12/40, 1,234 users, epsilon 3.21``: the users sampled and
    the epsilon spent so far), and one when the round is done, with its loss."""

    def __init__(self, silo: int, server_round: int, ledger: PrivacyLedger | None, *, every: float,
                 say: Callable[[str], None]) -> None:
        self.silo, self.server_round, self.ledger, self.every, self.say = silo, server_round, ledger, every, say
        self.last = time.monotonic()

    def __call__(self, step: int, steps: int, users: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        self.say(f"uirl: silo {self.silo} round {self.server_round}: step {step}/{steps}, {users:,} users{self._spent()}")

    def done(self, steps: int, users: int, loss: float) -> None:
        self.say(f"uirl: silo {self.silo} round {self.server_round}: trained, {steps} steps, {users:,} users, "
                 f"loss {loss:.4f}{self._spent()}")

    def _spent(self) -> str:
        return f", epsilon {self.ledger.epsilon():.2f}" if self.ledger is not None else ""


def released_update(cfg: Config, silo_cfg: SiloConfig, arrays: dict[str, np.ndarray] | None,
                    global_state: dict[str, np.ndarray], *, server_round: int) -> dict[str, np.ndarray] | None:
    """What leaves the silo for the trainable ``arrays`` :func:`local_train` returned from
    ``global_state``: the arrays themselves (``compression = none``) or their delta compressed
    (:func:`uirl.compression.encode_update`; post-processing of the DP output: no privacy cost).
    The ClientApp (through :func:`local_train_durable`) and the in-process engine both call this."""
    if arrays is None:
        return None
    rng = np.random.default_rng(hash_seed(cfg.train.seed, silo_cfg.partition_id, server_round, _ROUNDING_STREAM))
    return encode_update(arrays, global_state, cfg.federation.compression, rng=rng)


def _ledger_reason(exc: Exception, silo_cfg: SiloConfig) -> str:
    """Why a damaged ledger file makes the silo refuse, as the server may read it: the silo's own
    folder is named ``<ledger folder>`` (its path says how the silo's machine is laid out, and the
    refusal leaves the silo); the silo's console gets the full text."""
    text = str(exc)
    print(f"uirl: silo {silo_cfg.partition_id} refuses: {text}", flush=True)
    folder = str(Path(silo_cfg.ledger_path).parent) if silo_cfg.ledger_path else ""
    return text.replace(folder, "<ledger folder>") if folder and folder != "." else text


def _refuse(status: int, why: str, silo_cfg: SiloConfig) -> tuple[None, dict[str, float], None, str]:
    return None, {"status": float(status), "silo": float(silo_cfg.partition_id), "steps": 0.0}, None, why


def local_train_durable(cfg: Config, silo_cfg: SiloConfig, global_state: dict[str, np.ndarray], *,
                        ledger_json: str | None, run: str, server_round: int, expected_rounds: int = 0,
                        prior: np.ndarray | None = None, say: Callable[[str], None] | None = None
                        ) -> tuple[dict[str, np.ndarray] | None, dict[str, float], str | None, str | None]:
    """:func:`local_train` with the silo's ledger kept durably (node config ``ledger-path``), under
    the silo's ledger lock (:meth:`~uirl.privacy.ledger_file.LedgerFile.locked`), so that two
    processes of one silo never spend from the same ledger state."""
    with _holding_ledger(cfg, silo_cfg):
        return _train_durable(cfg, silo_cfg, global_state, ledger_json=ledger_json, run=run,
                              server_round=server_round, expected_rounds=expected_rounds, prior=prior, say=say)


def _train_durable(cfg: Config, silo_cfg: SiloConfig, global_state: dict[str, np.ndarray], *,
                   ledger_json: str | None, run: str, server_round: int, expected_rounds: int,
                   prior: np.ndarray | None, say: Callable[[str], None] | None
                   ) -> tuple[dict[str, np.ndarray] | None, dict[str, float], str | None, str | None]:
    """:func:`local_train` with the silo's ledger kept durably (node config ``ledger-path``).

    ``ledger_json`` is the ledger the node's own state holds (simulation); the ledger file, when
    the silo has one, takes precedence. ``expected_rounds`` is how many rounds the server has
    recorded this silo as having trained (after a resume): a ledger showing fewer means the silo
    has lost what it spent, so it refuses. ``prior`` is the server's popularity prior (as for
    :func:`local_train`). Returns (the update as it leaves the silo, :func:`released_update`;
    metrics; new ledger JSON; error message); the update is None when the silo refuses, and the
    error message then says why. The ledger file keeps the update as it was sent, so a replay
    sends the same bytes.
    See :mod:`uirl.privacy.ledger_file` for the replay/refuse rule.
    """
    file = _ledger_file(cfg, silo_cfg)
    release = popularity = None
    if file is not None:
        try:
            stored = file.read()
        except PrivacyError as exc:
            return _refuse(STATUS_LEDGER_ERROR, _ledger_reason(exc, silo_cfg), silo_cfg)
        ledger_json = stored.ledger_json if stored else None
        release = stored.release if stored else None
        popularity = stored.popularity if stored else None
    if cfg.privacy.enabled and expected_rounds:
        have = PrivacyLedger.from_json(ledger_json).rounds if ledger_json else 0
        if have < expected_rounds:
            return _refuse(STATUS_LEDGER_ERROR, f"privacy ledger shows {have} trained rounds but the server "
                           f"records {expected_rounds}: the silo's ledger was lost; refusing to train", silo_cfg)
    digest = digest_arrays(global_state)
    if file is not None and release is not None and release.run == run and server_round <= release.round:
        if server_round == release.round and digest == release.input_digest:
            try:
                return file.released_arrays(release), {**release.metrics, "replayed": 1.0}, ledger_json, None
            except PrivacyError as exc:
                return _refuse(STATUS_LEDGER_ERROR, _ledger_reason(exc, silo_cfg), silo_cfg)
        return _refuse(STATUS_REPLAY_REFUSED, f"round {server_round} of run {run!r} asked for after round "
                       f"{release.round} was released (with another global model); refusing to release twice",
                       silo_cfg)
    arrays, metrics, new_ledger_json = local_train(cfg, silo_cfg, global_state, ledger_json=ledger_json,
                                                   server_round=server_round, prior=prior, say=say)
    arrays = released_update(cfg, silo_cfg, arrays, global_state, server_round=server_round)
    if file is not None and arrays is not None and new_ledger_json is not None:
        file.write(new_ledger_json, Release(run=run, round=server_round, input_digest=digest,
                                            update_digest=digest_arrays(arrays), metrics=metrics), arrays,
                   popularity=popularity)
    return arrays, metrics, new_ledger_json, None


def local_prior(cfg: Config, silo: Silo, release: ReleasedSum) -> np.ndarray:
    """The prior a silo scores its own users with under ``local-prior``: E[log(1 + own + others)]
    given the released sum, where ``own`` is the silo's exact counts and ``others`` = sum - own
    (the other silos' counts plus all of the release's noise). Training never uses it: a user's
    DP-SGD gradient may depend only on that user's data and what was released."""
    own = own_counts(cfg, silo)
    if len(release.counts) != len(own):
        raise UirlError(f"the released popularity sum has {len(release.counts)} items, this silo's catalogue "
                        f"{len(own)}")
    return prior_from_counts(np.asarray(release.counts, dtype=np.float64) - own, release.noise_std, known=own)


def local_evaluate(cfg: Config, silo_cfg: SiloConfig, global_state: dict[str, np.ndarray], *,
                   prior: np.ndarray | None = None, release: ReleasedSum | None = None) -> dict[str, float]:
    """Ranking metrics of the global model on this silo's fixed test candidates (user averages),
    and against the whole catalogue when ``full-catalogue`` is on.

    With ``local-prior`` and the server's ``release``, the silo scores its own users with its own
    exact counts plus the other silos' part of the released sum instead of ``prior``
    (:func:`local_prior`): the silo's own data, used inside the silo, for its own users.

    These averages are not covered by the DP guarantee; what bounds one user's effect on them is
    their number: with fewer than ``eval-min-users`` users evaluated the silo reports nothing and
    raises :class:`EvaluationWithheld` (each user then moves a reported average by at most
    1 / ``eval-min-users``)."""
    worker, silo = _worker(cfg, silo_cfg)
    if cfg.model.local_prior and release is not None:
        prior = local_prior(cfg, silo, release)
    _load_global(worker, silo, global_state, prior)
    if len(silo.eval_users) < cfg.data.eval_min_users:
        raise EvaluationWithheld(f"silo {silo.silo_id} evaluates {len(silo.eval_users)} users, fewer than "
                                 f"eval-min-users {cfg.data.eval_min_users}: it reports no evaluation metrics")
    metrics = evaluate(worker.model, worker.bank, silo.eval_users, cfg, split="test", touched=silo.touched)
    out = {k: v for k, v in metrics.items() if k in EVAL_METRICS}
    return {**out, "num-examples": metrics["num-users"], "silo": float(silo.silo_id)}


def evaluate_received(cfg: Config, silo_cfg: SiloConfig, arrays: dict[str, np.ndarray], *,
                      prior: np.ndarray | None = None) -> dict[str, float]:
    """:func:`local_evaluate` on an evaluate message's arrays: the released sum the message carries
    with ``local-prior`` (:func:`pop_release`) is taken out of them first."""
    global_state = dict(arrays)
    release = pop_release(global_state)
    return local_evaluate(cfg, silo_cfg, global_state, prior=prior, release=release)


def hash_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
