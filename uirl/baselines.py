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
- **zero-shot**: the pretrained encoder, untrained (user = attention-pooled history, cosine score);
- **sasrec**: the peer baseline, a standard sequential recommender on item ids only
  (:mod:`uirl.sasrec`), trained centrally on every silo's users' training sequences, no privacy.
  It is the only row that also reports ``full/*`` metrics: the target ranked against the whole
  catalogue minus the items the user touched (:func:`uirl.metrics.full_catalogue_metrics`).

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
import torch

from uirl.config import Config, SiloConfig
from uirl.data.silo import Silo, load_silo
from uirl.engine import FederatedResult, accounting, reported_metrics, weighted_metrics
from uirl.errors import DataError
from uirl.federated import cache_catalogue, hash_seed, local_train
from uirl.metrics import FULL_KS, full_catalogue_metrics, mean_metrics, ranking_metrics
from uirl.model import TextBank
from uirl.model.build import build_model
from uirl.sasrec import SASRec, SASRecConfig, fit, last_outputs
from uirl.train import evaluate, resolve_device, train_round

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
        metrics = evaluate(model, banks[silo.silo_id], silo.eval_users, cfg, split="test", touched=silo.touched)
        per_silo.append({**metrics, "num-examples": metrics["num-users"]})
    return weighted_metrics(per_silo)


def zero_shot(cfg: Config, num_silos: int) -> dict[str, float]:
    """The pretrained encoder, untrained (what round 0 of a run without the prior scores). Its
    catalogue vectors come from the disk cache the cached training path fills."""
    silos = load_silos(cfg, num_silos)
    model, encoder = build_model(cfg)
    banks = {s.silo_id: TextBank(s.item_text, encoder.tokenizer, cfg.model.max_tokens) for s in silos}
    for bank in banks.values():
        cache_catalogue(model, bank, cfg)
    return _evaluate_silos(model, banks, silos, cfg)


def popularity(cfg: Config, num_silos: int, *, scope: str = "silo") -> dict[str, float]:
    """Rank by how many training users have an item as a training positive (no model, no privacy):
    counted in the user's own silo (``scope="silo"``) or over every silo (``"global"``: what a
    server would know if the silos shared exact counts). Sampled lists and, with
    ``full-catalogue``, the whole catalogue minus what the user touched."""
    if scope not in ("silo", "global"):
        raise ValueError(f"scope must be silo or global, not {scope!r}")
    silos = load_silos(cfg, num_silos)
    pooled = Counter(item for silo in silos for user in silo.users for item in set(user.train_items))
    per_silo = []
    for silo in silos:
        counts = pooled if scope == "global" else Counter(
            item for user in silo.users for item in set(user.train_items))
        catalogue = sorted(silo.item_text)
        position = {item: k for k, item in enumerate(catalogue)}
        everything = np.array([counts[i] for i in catalogue], dtype=float)
        per_user = []
        for u in silo.eval_users:
            metrics = ranking_metrics(np.array([counts[i] for i in u.test_candidates], dtype=float))
            if cfg.data.full_catalogue and u.test_target in position:
                seen = [position[i] for i in silo.touched.get(u.user_id, ()) if i in position]
                full = full_catalogue_metrics(everything, position[u.test_target], seen)
                metrics.update({k: v for k, v in full.items() if k != "full/rank"})
            per_user.append(metrics)
        per_silo.append({**mean_metrics(per_user), "num-examples": float(len(per_user))})
    return weighted_metrics(per_silo)


#: The full-catalogue metrics the sasrec row reports (next to the sampled-candidate ones).
FULL_METRICS = tuple(f"full/{m}@{k}" for k in FULL_KS for m in ("recall", "ndcg"))


def sasrec(cfg: Config, num_silos: int, *, sas: SASRecConfig | None = None) -> dict[str, float]:
    """SASRec trained on the pooled users of all silos (centralized, no privacy), evaluated on each
    silo's fixed test candidates and on the full catalogue, averaged with user-count weights.
    ``sas`` defaults to :class:`~uirl.sasrec.SASRecConfig` with the run's seed."""
    silos = load_silos(cfg, num_silos)
    return sasrec_on_silos(silos, sas or SASRecConfig(seed=cfg.train.seed), device=resolve_device(cfg.train.device))


def sasrec_on_silos(silos: Sequence[Silo], sas: SASRecConfig, *, device: str | torch.device = "cpu"
                    ) -> dict[str, float]:
    """Train on every user's ``train_items``, choose the epoch by validation nDCG@10 (input = the
    training items, the user's ``valid_candidates``), then test: input = training items + validation
    target, the last ``sas.max_len`` of them (so the validation item is an input, never a training
    target, as in the paper). Returns the ranking metrics, :data:`FULL_METRICS`, ``best-epoch`` and
    ``epochs-run``."""
    catalogue = sorted({item for s in silos for item in s.item_text})
    index = {item: k + 1 for k, item in enumerate(catalogue)}  # item id -> SASRec id (0 = padding)

    def ids(items: Sequence[str]) -> list[int]:
        try:
            return [index[i] for i in items]
        except KeyError as exc:
            raise DataError("item of a user's sequence or candidates is not in the catalogue",
                            field="item_id", value=exc.args[0]) from None

    users = [u for s in silos for u in s.users]
    train = [ids(u.train_items) for u in users]
    valid = [ids(u.valid_candidates) for u in users]

    def valid_ndcg(model: SASRec) -> float:
        full = _catalogue_scores(model, train)
        return float(np.mean([ranking_metrics(row[np.asarray(c) - 1])["ndcg@10"] for row, c in zip(full, valid)]))

    model, log = fit(train, len(catalogue), sas, validate=valid_ndcg, device=device)
    per_silo = []
    for silo in silos:
        histories = [ids(u.train_items + (u.valid_target,)) for u in silo.eval_users]
        per_user = []
        for u, row in zip(silo.eval_users, _catalogue_scores(model, histories)):
            target = index[u.test_target] - 1
            touched = np.asarray([index[i] - 1 for i in silo.touched.get(u.user_id, ()) if i in index],
                                 dtype=np.int64)
            per_user.append({**ranking_metrics(row[np.asarray(ids(u.test_candidates)) - 1]),
                             **full_catalogue_metrics(row, target, excluded=touched)})
        per_silo.append({**mean_metrics(per_user), "num-examples": float(len(per_user))})
    return {**weighted_metrics(per_silo), "best-epoch": log["best-epoch"],
            "epochs-run": log["epochs-run"]}


def _catalogue_scores(model: SASRec, histories: Sequence[Sequence[int]], chunk: int = 256):
    """Yield, per history, a float64 (num_items,) array: the score of every catalogue item."""
    for start in range(0, len(histories), chunk):
        with torch.no_grad():
            scores = model.catalogue_scores(last_outputs(model, histories[start:start + chunk]))
        yield from scores.double().cpu().numpy()


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
    rows = [{"round": 0, **weighted_metrics(reported_metrics(cfg, silos, initial, None))}]
    if on_round:
        on_round(rows[-1])
    for r in range(1, cfg.federation.num_rounds + 1):
        eps = {}
        for k, silo in enumerate(silos):
            arrays, metrics, ledgers[k] = local_train(cfg, silo, states[k], ledger_json=ledgers[k], server_round=r)
            if arrays is not None:
                states[k].update(arrays)
            eps[f"epsilon/silo-{k}"] = metrics["epsilon"]
        evaluated = [m for k, s in enumerate(silos) for m in reported_metrics(cfg, [s], states[k], None)]
        rows.append({"round": r, "epsilon": max(eps.values()), **eps, **weighted_metrics(evaluated)})
        if on_round:
            on_round(rows[-1])
    return rows
