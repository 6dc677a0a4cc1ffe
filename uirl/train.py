"""Local training and evaluation: the one loop the federated client and every baseline call.

A local round on a silo takes ``ceil(local_epochs / q)`` steps; at each step every user of the silo
is included independently with probability ``q = batch_users / num_users`` (Poisson sampling, as
the DP accountant assumes). Each sampled user contributes one training example built from their own
sequence: a random position t, history = the items before t, candidates = item t + negatives the
user never touched. With DP on, each user's gradient is clipped and noise is added
(:mod:`uirl.privacy`); without it, the same loop takes plain steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from uirl.config import Config
from uirl.data import UserData, sample_training_example
from uirl.errors import UirlError
from uirl.metrics import full_catalogue_metrics, mean_metrics, ranking_metrics
from uirl.model import InterestModel, TextBank
from uirl.model.batching import Example, eval_example, user_example
from uirl.model.interest import UserRep
from uirl.privacy import PerUserGradients, PrivacyError, PrivacyLedger, make_dp_optimizer, secure_sampling_rng


class TrainingError(UirlError):
    """Training produced something unusable (non-finite or silently unchanged adapters)."""


@dataclass(frozen=True)
class RoundResult:
    loss: float  # mean per-user training loss over the round's sampled users
    steps: int
    users_sampled: int  # summed over steps (a user can be sampled at several steps)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sampling_plan(num_users: int, cfg: Config) -> tuple[float, int]:
    """(Poisson sample rate q, local steps per round) for a silo of ``num_users`` users."""
    if num_users < 1:
        raise UirlError("a silo with no users cannot train")
    q = min(1.0, cfg.train.batch_users / num_users)
    return q, max(1, math.ceil(cfg.train.local_epochs / q))


def _check_update(before: list[torch.Tensor], params: list[torch.nn.Parameter]) -> None:
    """Guard against silent adapter corruption after a DP step (a reported Opacus+PEFT failure mode):
    every adapter must stay finite, and a step with a non-zero gradient must move something."""
    moved = False
    for old, p in zip(before, params):
        if not torch.isfinite(p).all():
            raise TrainingError("an adapter parameter became non-finite after an optimizer step")
        moved = moved or not torch.equal(old, p.detach())
    has_grad = any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)
    if has_grad and not moved:
        raise TrainingError("an optimizer step with a non-zero gradient left every adapter unchanged")


def train_round(model: InterestModel, bank: TextBank, users: Sequence[UserData],
                touched: dict[str, frozenset], cfg: Config, *, ledger: PrivacyLedger | None,
                example_seed: int, on_step: Callable[[int, int, int], None] | None = None) -> RoundResult:
    """One local round. With ``ledger`` (DP on), steps use its noise multiplier and sample rate and
    are recorded in it; the caller must have checked ``ledger.can_afford(steps)``.

    ``example_seed`` fixes which training positions/negatives are drawn (not secret). The Poisson
    user sampling under DP uses OS entropy: the amplification-by-sampling argument needs it secret.
    ``on_step(step, steps, users_so_far)`` is called after every step (and its accounting).
    """
    device = resolve_device(cfg.train.device)
    model.to(device).train()
    q, steps = sampling_plan(len(users), cfg)
    if ledger is not None and abs(ledger.sample_rate - q) > 1e-12:
        raise PrivacyError(f"ledger sample rate {ledger.sample_rate} != this round's {q}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.train.lr)
    expected = q * len(users)
    example_rng = np.random.default_rng(example_seed)
    sample_rng = secure_sampling_rng() if ledger is not None else np.random.default_rng(example_seed)
    all_items = bank.item_ids
    pug = None
    if ledger is not None:
        pug = PerUserGradients(model)
        optimizer = make_dp_optimizer(optimizer, noise_multiplier=ledger.noise_multiplier,
                                      clip_norm=cfg.privacy.clip_norm, expected_batch_users=expected,
                                      device=device)
    cached = cfg.model.train_mode == "cached"
    total_loss, seen = 0.0, 0

    try:
        for step in range(steps):
            chosen = [u for u in users if sample_rng.random() < q]
            chosen = [u for u in chosen if len(u.train_items) >= 2]  # too short to make an example
            if chosen or pug is not None:  # without DP, an empty sample is no step at all
                each = cfg.examples_per_user
                examples = [training_example(u, cfg, rng=example_rng, all_item_ids=all_items,
                                             touched=touched[u.user_id]) for u in chosen for _ in range(each)]
                owners = [k for k in range(len(chosen)) for _ in range(each)] if each > 1 else None
                total_loss += train_step(model, bank, examples, optimizer, per_user=pug, expected_users=expected,
                                         cached=cached, device=device, owners=owners,
                                         buckets=cfg.model.length_buckets)
                seen += len(chosen)
                if ledger is not None:
                    ledger.record(1)
            if on_step is not None:
                on_step(step + 1, steps, seen)
    finally:
        if pug is not None:
            pug.close()
    return RoundResult(loss=total_loss / max(seen, 1), steps=steps, users_sampled=seen)


def train_step(model: InterestModel, bank: TextBank, examples: Sequence[Example], optimizer: torch.optim.Optimizer,
               *, per_user: PerUserGradients | None, expected_users: float, cached: bool,
               device: torch.device, owners: Sequence[int] | None = None, buckets: int = 1) -> float:
    """One optimizer step on ``examples`` (one per sampled user, or several: ``owners[b]`` is the
    user of example b, see :meth:`TextBank.make_batch`); returns the users' summed loss, a user's
    loss being the mean of its examples' losses.

    With ``per_user`` (DP on; ``optimizer`` from :func:`~uirl.privacy.make_dp_optimizer`) each user's
    gradient is computed on its own, then clipped and noised by the optimizer; no examples is then a
    noise-only step. Without it, a plain step on the summed loss over ``expected_users``.
    ``cached``: the rows' vectors come from the frozen encoder's cache (``train-mode = cached``);
    else ``buckets``: the texts are encoded in that many calls of similar token length
    (``length-buckets``, :meth:`InterestModel.encode_in_buckets`).
    Raises :class:`TrainingError` if the step leaves a parameter non-finite or silently unchanged."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in params]
    loss = 0.0
    if not examples:
        if per_user is None:
            raise ValueError("a plain step needs at least one example")
        per_user.empty()  # noise-only step: still one DP step, still accounted
    else:
        batch = bank.make_batch(examples, tokens=not cached, owners=owners).to(device)
        # Cached mode: the rows' vectors come from the frozen encoder's cache. They are functions of
        # public item texts (and the user's own texts) only, so each user's loss still depends on
        # nothing but that user's rows and the shared parameters.
        vectors = row_vectors(model, bank, batch.row_keys).to(device) if cached else None
        if cached or buckets <= 1:
            losses = per_user.loss(batch, vectors) if per_user is not None else model.batch_loss(batch, vectors)
        elif per_user is not None:
            losses = per_user.loss_in_buckets(batch, buckets)
        else:
            vectors, _ = model.encode_in_buckets(batch.input_ids, batch.attention_mask, buckets)
            losses = model.batch_loss(batch, vectors)
        if (weight := batch.example_weight()) is not None:
            losses = losses * weight.to(losses)  # a user's loss: the mean of its examples'
        if per_user is not None:
            per_user.backward(losses, batch)
        else:
            (losses.sum() / expected_users).backward()
        loss = float(losses.detach().sum())
    optimizer.step()
    _check_update(before, params)
    return loss


def training_example(user: UserData, cfg: Config, *, rng: np.random.Generator, all_item_ids: Sequence[str],
                     touched: frozenset) -> Example:
    """A random training example of ``user`` (:func:`~uirl.data.sample_training_example`), with the
    side data the enabled parts read and, when the VAE is on, a per-user noise seed."""
    history, candidates = sample_training_example(user, max_history=cfg.data.max_history,
                                                  num_negatives=cfg.data.train_negatives, rng=rng,
                                                  all_item_ids=all_item_ids, touched=touched)
    seed = int(rng.integers(2**62)) if cfg.interest.vae else 0
    return user_example(user, user.train_items.index(candidates[0]), candidates,
                        max_history=cfg.data.max_history, parts=cfg.interest, seed=seed)


@torch.no_grad()
def encode_texts(model: InterestModel, bank: TextBank, item_ids: Sequence[str], *,
                 batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Item id (or user-text key) -> the encoder's unit-norm text vector (d,), each encoded once.

    With ``bank.vectors`` (cached mode: frozen encoder) vectors come from and go into that cache.
    Texts are encoded in order of token length so a chunk carries little padding."""
    device = next(model.parameters()).device
    cache = bank.vectors
    out: dict[str, torch.Tensor] = {}
    unique = list(dict.fromkeys(item_ids))
    todo = [k for k in unique if cache is None or k not in cache]
    lengths = {k: bank.token_count(k) for k in todo}
    todo.sort(key=lengths.__getitem__)
    was_training = model.training
    model.eval()
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        ids, mask = bank.tokens(chunk)
        vecs = model.encode_texts(ids.to(device), mask.to(device)).cpu()
        out.update(zip(chunk, vecs))
        if cache is not None:
            cache.update(zip(chunk, vecs))
    model.train(was_training)
    if cache is not None:
        out.update((k, cache[k]) for k in unique if k not in out)
    return out


def row_vectors(model: InterestModel, bank: TextBank, keys: Sequence[str]) -> torch.Tensor:
    """(len(keys), d) encoder vectors of a batch's rows (no gradient: the encoder is frozen)."""
    vectors = encode_texts(model, bank, keys)
    return torch.stack([vectors[k] for k in keys])


@torch.no_grad()
def encode_items(model: InterestModel, bank: TextBank, item_ids: Sequence[str], *,
                 batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Item id (or user-text key) -> the model's unit-norm item vector (d,): the encoder's text
    vector through the model's item projection (evaluation only)."""
    device = next(model.parameters()).device
    raw = encode_texts(model, bank, item_ids, batch_size=batch_size)
    if not raw:
        return {}
    keys = list(raw)
    return dict(zip(keys, model.item_vectors(torch.stack([raw[k] for k in keys]).to(device))))


@torch.no_grad()
def represent_users(model: InterestModel, bank: TextBank, users: Sequence[UserData], *, split: str,
                    max_history: int, extra_keys: Sequence[str] = ()
                    ) -> tuple[list[tuple[UserRep, torch.Tensor]], dict[str, torch.Tensor]]:
    """Each user's :class:`UserRep` from the history before the ``split`` target ("test", "valid",
    or "full": the whole sequence, no candidates) and the vectors (1, C, d) of their candidates,
    plus the vector of every text encoded (including ``extra_keys``)."""
    device = next(model.parameters()).device
    model.eval()
    examples = [eval_example(u, split, max_history=max_history, parts=model.parts) for u in users]
    # Every text is encoded once: histories, then candidates, then users' texts and neighbours' items.
    keys = [i for e in examples for i in e.history] + [i for e in examples for i in e.candidates]
    keys += [k for e in examples for k in bank.make_batch([e], tokens=False).row_keys] + list(extra_keys)
    vectors = encode_items(model, bank, keys)
    out = []
    for example in examples:  # one user at a time: a user's vectors never depend on another's padding
        batch = bank.make_batch([example], tokens=False).to(device)
        events = torch.stack([vectors[k] for k in batch.row_keys]).to(device)
        out.append((model.represent(batch, events), events[batch.candidate_index]))
    return out, vectors


def score_users(model: InterestModel, bank: TextBank, users: Sequence[UserData], *, split: str,
                max_history: int) -> list[np.ndarray]:
    """Scores (C,) of each user's fixed ``split`` candidates (positive first)."""
    return [fixed for fixed, _ in score_users_full(model, bank, users, split=split, max_history=max_history)]


def score_users_full(model: InterestModel, bank: TextBank, users: Sequence[UserData], *, split: str,
                     max_history: int, catalogue: bool = False) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per user: scores (C,) of the fixed ``split`` candidates (positive first) and, with
    ``catalogue``, scores (N,) of every item of ``bank.item_ids`` (else None)."""
    items = bank.item_ids
    reps, vectors = represent_users(model, bank, users, split=split, max_history=max_history,
                                    extra_keys=items if catalogue else ())
    device = next(model.parameters()).device
    everything = torch.stack([vectors[i] for i in items]).unsqueeze(0).to(device) if catalogue else None
    everything_prior = bank.prior_row(items, device) if catalogue else None
    out = []
    with torch.no_grad():
        for user, (rep, cands) in zip(users, reps):
            target = user.test_candidates if split == "test" else user.valid_candidates
            fixed = model.score_rep(rep, cands, bank.prior_row(target, device))[0]
            full = None
            if everything is not None:
                full = model.score_rep(rep, everything, everything_prior)[0].cpu().numpy()
            out.append((fixed.cpu().numpy(), full))
    return out


def evaluate(model: InterestModel, bank: TextBank, users: Sequence[UserData], cfg: Config, *,
             split: str = "test", touched: dict[str, frozenset] | None = None) -> dict[str, float]:
    """Per-user ranking metrics on the fixed candidate lists, averaged over users (+ ``num-users``).

    With ``cfg.data.full_catalogue`` and ``touched`` (user id -> items the user interacted with),
    also the full-catalogue metrics (:func:`~uirl.metrics.full_catalogue_metrics`) of the test
    target against every catalogue item the user has not touched."""
    if split not in ("test", "valid"):
        raise ValueError(f"split must be test or valid, not {split!r}")
    model.to(resolve_device(cfg.train.device))
    users = [u for u in users if (u.train_items if split == "valid" else True)]
    if not users:
        raise UirlError("no users to evaluate")
    catalogue = cfg.data.full_catalogue and touched is not None and split == "test"
    position = {item: k for k, item in enumerate(bank.item_ids)} if catalogue else {}
    per_user = []
    for user, (fixed, full) in zip(users, score_users_full(model, bank, users, split=split,
                                                      max_history=cfg.data.max_history, catalogue=catalogue)):
        metrics = ranking_metrics(fixed)
        if full is not None and user.test_target in position:
            seen = [position[i] for i in touched.get(user.user_id, ()) if i in position]
            metrics.update({k: v for k, v in full_catalogue_metrics(full, position[user.test_target], seen).items()
                            if k != "full/rank"})
        per_user.append(metrics)
    if catalogue and any(len(m) != len(per_user[0]) for m in per_user):
        per_user = [{k: v for k, v in m.items() if not k.startswith("full/")} for m in per_user]
    return {**mean_metrics(per_user), "num-users": float(len(users))}
