"""Baselines on the same silos, candidates and seeds as the federated runs.

- **centralized** (upper bound): every silo's training users pooled in one place, the same model,
  no privacy, through :func:`uirl.train.train_round`, with the federated run's budget per round: the
  same ``local_epochs`` and, per step, as many users as all silos sample together (``batch_users x
  silos``), hence as many optimizer steps as one silo takes. Pooling at ``batch_users`` instead takes
  ``silos`` times more Adam steps per round, each a full ``lr`` long, which on the synthetic default
  over-fits the pooled users (training loss falls, test AUC drops below zero-shot);
- **local-only** (lower bound): each silo trains alone for the same rounds, through the client's own
  :func:`uirl.federated.local_train` (with DP if the config has it), and is evaluated on its own users;
- **popularity**: candidates ranked by how many of the silo's training users have them as a training
  positive (no model at all);
- **zero-shot**: the pretrained encoder, untrained (user = attention-pooled history, cosine score).

Every method is evaluated on each silo's fixed ``eval_users`` test candidates and averaged with
user-count weights, like the federated evaluation; :func:`candidates_fingerprint` identifies the
lists so a report can check that two rows were scored on the same ones.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from uirl.config import Config, SiloConfig
from uirl.data.silo import Silo, load_silo
from uirl.engine import FederatedResult, accounting, weighted_metrics
from uirl.federated import hash_seed, local_evaluate, local_train
from uirl.metrics import mean_metrics, ranking_metrics
from uirl.model import TextBank
from uirl.model.build import build_model
from uirl.train import evaluate, train_round

RoundHook = Callable[[dict[str, Any]], None]


def load_silos(cfg: Config, num_silos: int) -> list[Silo]:
    return [load_silo(cfg.data, SiloConfig(partition_id=k, num_partitions=num_silos), seed=cfg.train.seed)
            for k in range(num_silos)]


def candidates_fingerprint(silos: Sequence[Silo]) -> str:
    """A short hash of every evaluated user's id and test candidate list, silo by silo."""
    h = hashlib.sha256()
    for silo in silos:
        for user in silo.eval_users:
            h.update(f"{silo.silo_id}|{user.user_id}|{','.join(user.test_candidates)}\n".encode())
    return h.hexdigest()[:16]


def _evaluate_silos(model, banks: dict[int, TextBank], silos: Sequence[Silo], cfg: Config) -> dict[str, float]:
    per_silo = []
    for silo in silos:
        metrics = evaluate(model, banks[silo.silo_id], silo.eval_users, cfg, split="test")
        per_silo.append({**metrics, "num-examples": metrics["num-users"]})
    return weighted_metrics(per_silo)


def zero_shot(cfg: Config, num_silos: int) -> dict[str, float]:
    silos = load_silos(cfg, num_silos)
    model, encoder = build_model(cfg)
    banks = {s.silo_id: TextBank(s.item_text, encoder.tokenizer, cfg.model.max_tokens) for s in silos}
    return _evaluate_silos(model, banks, silos, cfg)


def popularity(cfg: Config, num_silos: int) -> dict[str, float]:
    per_silo = []
    for silo in load_silos(cfg, num_silos):
        counts = Counter(item for user in silo.users for item in set(user.train_items))
        per_user = [ranking_metrics(np.array([counts[i] for i in u.test_candidates], dtype=float))
                    for u in silo.eval_users]
        per_silo.append({**mean_metrics(per_user), "num-examples": float(len(per_user))})
    return weighted_metrics(per_silo)


def centralized(cfg: Config, num_silos: int, *, on_round: RoundHook | None = None) -> FederatedResult:
    """Rounds 0 .. R (one round = ``local_epochs`` epochs over all pooled users) and the final model."""
    silos = load_silos(cfg, num_silos)
    pooled = replace(cfg, train=replace(cfg.train, batch_users=cfg.train.batch_users * num_silos))
    model, encoder = build_model(cfg)
    initial = {n: t.cpu().numpy().copy() for n, t in model.adapter_state().items()}
    banks = {s.silo_id: TextBank(s.item_text, encoder.tokenizer, cfg.model.max_tokens) for s in silos}
    users = [u for s in silos for u in s.users]
    touched = {user: items for s in silos for user, items in s.touched.items()}
    rows = [{"round": 0, **_evaluate_silos(model, banks, silos, cfg)}]
    if on_round:
        on_round(rows[-1])
    for r in range(1, cfg.federation.num_rounds + 1):
        result = train_round(model, banks[silos[0].silo_id], users, touched, pooled, ledger=None,
                             example_seed=hash_seed(cfg.train.seed, 104729, r))
        rows.append({"round": r, "train-loss": result.loss, **_evaluate_silos(model, banks, silos, cfg)})
        if on_round:
            on_round(rows[-1])
    state = {n: t.cpu().numpy().copy() for n, t in model.adapter_state().items()}
    return FederatedResult(rounds=rows, state=state, initial=initial, model=model, encoder=encoder,
                           privacy=accounting(cfg, {}, cfg.federation.num_rounds))


def local_only(cfg: Config, num_silos: int, *, on_round: RoundHook | None = None) -> list[dict[str, Any]]:
    """Rows of round 0 .. R: every silo trains its own model from the same start, no averaging."""
    silos = [SiloConfig(partition_id=k, num_partitions=num_silos) for k in range(num_silos)]
    model, _ = build_model(cfg)
    initial = {n: t.cpu().numpy().copy() for n, t in model.adapter_state().items()}
    states = {k: dict(initial) for k in range(num_silos)}
    ledgers: dict[int, str | None] = {k: None for k in range(num_silos)}
    rows = [{"round": 0, **weighted_metrics([local_evaluate(cfg, s, initial) for s in silos])}]
    if on_round:
        on_round(rows[-1])
    for r in range(1, cfg.federation.num_rounds + 1):
        eps = {}
        for k, silo in enumerate(silos):
            arrays, metrics, ledgers[k] = local_train(cfg, silo, states[k], ledger_json=ledgers[k], server_round=r)
            if arrays is not None:
                states[k].update(arrays)
            eps[f"epsilon/silo-{k}"] = metrics["epsilon"]
        evaluated = [local_evaluate(cfg, s, states[k]) for k, s in enumerate(silos)]
        rows.append({"round": r, "epsilon": max(eps.values()), **eps, **weighted_metrics(evaluated)})
        if on_round:
            on_round(rows[-1])
    return rows
