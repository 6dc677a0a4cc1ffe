"""Single training steps and a silo's evaluation, built from the project's own functions, ready to time.

Every step is :func:`uirl.train.train_step` -- the step :func:`uirl.train.train_round` takes -- on a
fixed batch: the first ``users`` users of silo 0 (of 3) of the run config's data, one training
example each (seeded), so every kind of step sees exactly the same users and texts. Each kind gets
its own model (same config, same seed: the same initial weights), optimizer and, under DP, Opacus
hooks that stay attached across steps as they do through a round:

- ``non-private``: a plain Adam step on the summed loss;
- ``dp``: the project's user-level DP-SGD step (per-user gradients, clip, noise);
- ``dp-per-text``: plain Opacus per-sample clipping with each TEXT row as the sample (the wrong
  privacy unit for a user-level guarantee: a user with K texts gets K clipped contributions; see
  :class:`PerTextGradients`), the comparison a reader of Opacus's examples would make.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from uirl.config import Config, SiloConfig
from uirl.data.silo import Silo, load_silo
from uirl.federated import cache_catalogue, silo_bank
from uirl.model import InterestModel, TextBank
from uirl.model.build import build_model
from uirl.model.batching import Example
from uirl.model.interest import UserBatch
from uirl.privacy import PerUserGradients, PrivacyError, make_dp_optimizer
from simulation.bench.measure import interleaved, spread
from uirl.train import evaluate, resolve_device, train_step, training_example

#: The silo every step and evaluation reads (silo 0 of 3: the synthetic default's split).
SILO = SiloConfig(partition_id=0, num_partitions=3)
KINDS = ("non-private", "dp", "dp-per-text")


class PerTextGradients(PerUserGradients):
    """Per-sample gradients with one sample per text ROW, as Opacus gives them for the encoder.

    The encoder's LoRA layers see one row per text and keep Opacus's per-row gradients as they are;
    the interest model's layers see one row per user, so each user's gradient is spread evenly
    over that user's text rows (the rows then sum to the user's gradient). The optimizer then clips
    every text row on its own. For the benchmark's comparison only: it bounds one TEXT's influence,
    not one user's."""

    def regroup(self, batch: UserBatch) -> None:
        rows, users = int(batch.row_user.shape[0]), batch.num_users
        counts = torch.bincount(batch.row_user, minlength=users).to(torch.float32)
        for p in self.params:
            gs = p.grad_sample
            if gs is None or isinstance(gs, list):
                raise PrivacyError("per-sample gradient missing or accumulated over several passes")
            if gs.shape[0] == users and rows != users:
                share = (1.0 / counts)[batch.row_user].to(gs.dtype).view(-1, *([1] * (gs.dim() - 1)))
                p.grad_sample = gs[batch.row_user.to(gs.device)] * share.to(gs.device)


def fixed_batch(cfg: Config, silo: Silo, bank: TextBank, users: int) -> list[Example]:
    """One training example (seeded) for each of the silo's first ``users`` users that can train."""
    rng = np.random.default_rng(0)
    chosen = [u for u in silo.users if len(u.train_items) >= 2][:users]
    return [training_example(u, cfg, rng=rng, all_item_ids=bank.item_ids, touched=silo.touched[u.user_id])
            for u in chosen]


def model_and_bank(cfg: Config) -> tuple[InterestModel, TextBank, Silo]:
    """A fresh model of ``cfg`` and silo 0's text bank (the catalogue encoded, or read from the
    disk cache, in cached mode): what a silo's worker holds."""
    silo = load_silo(cfg.data, SILO, seed=cfg.train.seed)
    model, encoder = build_model(cfg)
    bank = silo_bank(silo, encoder.tokenizer, cfg)
    if cfg.model.train_mode == "cached":
        cache_catalogue(model, bank, cfg)
    return model, bank, silo


@dataclass
class Step:
    """One kind of step on the fixed batch: ``take()`` takes it (and returns the summed loss)."""

    take: Callable[[], float]
    users: int
    texts: int
    trainable: int  # trainable numbers (what DP-SGD clips and noises)
    close: Callable[[], None]


def make_step(cfg: Config, *, users: int, kind: str, noise_multiplier: float = 1.0) -> Step:
    """A ``kind`` step (:data:`KINDS`) of ``cfg``'s train mode on the first ``users`` users of silo 0."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    model, bank, silo = model_and_bank(cfg)
    model.train()
    examples = fixed_batch(cfg, silo, bank, users)
    texts = len(bank.make_batch(examples, tokens=False).row_keys)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.train.lr)
    device = resolve_device(cfg.train.device)
    per_user, expected = None, float(len(examples))
    if kind != "non-private":
        per_user = PerUserGradients(model) if kind == "dp" else PerTextGradients(model)
        expected = float(texts) if kind == "dp-per-text" else expected
        optimizer = make_dp_optimizer(optimizer, noise_multiplier=noise_multiplier, clip_norm=cfg.privacy.clip_norm,
                                      expected_batch_users=expected, device=device)

    def take() -> float:
        return train_step(model, bank, examples, optimizer, per_user=per_user, expected_users=expected,
                          cached=cfg.model.train_mode == "cached", device=device,
                          buckets=cfg.model.length_buckets)

    return Step(take=take, users=len(examples), texts=texts, trainable=sum(p.numel() for p in params),
                close=per_user.close if per_user is not None else (lambda: None))


def make_evaluation(cfg: Config) -> tuple[Callable[[], dict], int]:
    """Silo 0's evaluation of a fresh model (what :func:`uirl.federated.local_evaluate` runs each
    round), and the number of users it evaluates."""
    model, bank, silo = model_and_bank(cfg)

    def run() -> dict:
        return evaluate(model, bank, silo.eval_users, cfg, split="test", touched=silo.touched)

    return run, len(silo.eval_users)


def step_section(lora: Config, cached: Config, *, users: int, repeats: int) -> dict:
    """Seconds of every kind of ``lora`` step and of the ``cached`` mode's plain and DP steps on the
    same users, interleaved; their ratios, users/s and texts/s."""
    steps = {kind: make_step(lora, users=users, kind=kind) for kind in KINDS}
    steps.update({f"cached-{kind}": make_step(cached, users=users, kind=kind) for kind in ("non-private", "dp")})
    try:
        times = interleaved({name: step.take for name, step in steps.items()}, repeats=repeats)
    finally:
        for step in steps.values():
            step.close()
    med = {name: statistics.median(t) for name, t in times.items()}
    ref = steps["dp"]
    return {"model": lora.model.name, "users": ref.users, "texts": ref.texts,
            "texts-per-user": round(ref.texts / ref.users, 2), "max-tokens": lora.model.max_tokens,
            "trainable-numbers": {"lora": ref.trainable, "cached": steps["cached-dp"].trainable},
            "repeats": repeats, "torch-threads": torch.get_num_threads(),
            "seconds": {name: spread(t) for name, t in times.items()},
            "users-per-second": {name: ref.users / m for name, m in med.items()},
            "texts-per-second": {name: ref.texts / med[name] for name in KINDS},
            "ratio": {"dp/non-private": med["dp"] / med["non-private"],
                      "dp-per-text/non-private": med["dp-per-text"] / med["non-private"],
                      "dp/dp-per-text": med["dp"] / med["dp-per-text"],
                      "cached-dp/cached-non-private": med["cached-dp"] / med["cached-non-private"],
                      "dp/cached-dp": med["dp"] / med["cached-dp"]}}


def _at(threads: int, call: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        torch.set_num_threads(threads)
        return call()
    return run


def threads_section(lora: Config, cached: Config, *, users: int, repeats: int,
                    counts: Sequence[int] = (1, 2)) -> dict:
    """The ``lora`` DP and non-private steps and silo 0's evaluation (``cached`` mode, the default:
    what every round of a default run evaluates) at each torch thread count, interleaved."""
    default = torch.get_num_threads()
    steps = {"dp-step": make_step(lora, users=users, kind="dp"),
             "non-private-step": make_step(lora, users=users, kind="non-private")}
    evaluation, evaluated = make_evaluation(cached)
    work = {**{name: step.take for name, step in steps.items()}, "evaluation": evaluation}
    calls = {f"{name}@{n}": _at(n, call) for n in counts for name, call in work.items()}
    try:
        times = interleaved(calls, repeats=repeats)
    finally:
        for step in steps.values():
            step.close()
        torch.set_num_threads(default)
    med = {name: statistics.median(t) for name, t in times.items()}
    low, high = min(counts), max(counts)
    return {"thread-counts": list(counts), "torch-default-threads": default, "repeats": repeats,
            "step-users": steps["dp-step"].users, "step-texts": steps["dp-step"].texts, "evaluated-users": evaluated,
            "evaluation-train-mode": cached.model.train_mode,
            "seconds": {name: spread(t) for name, t in times.items()},
            "ratio": {name: med[f"{name}@{low}"] / med[f"{name}@{high}"] for name in work},
            "ratio-means": f"median seconds at {low} thread(s) / at {high} threads (above 1: {high} threads faster)",
            "dp/non-private": {str(n): med[f"dp-step@{n}"] / med[f"non-private-step@{n}"] for n in counts}}
