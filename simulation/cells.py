"""One sweep cell: run a method on a config, return its results row (metrics, accounting, audit)."""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uirl import baselines
from uirl.config import Config, from_run_config
from uirl.engine import FederatedResult, accounting, run_federated
from uirl.errors import UirlError
from uirl.model import TextBank
from uirl.privacy.audit import membership_audit

_FINAL = ("auc", "mrr", "ndcg@5", "ndcg@10", "recall@5", "recall@10",
          "full/recall@10", "full/recall@20", "full/ndcg@10", "full/ndcg@20")


def _final(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: rows[-1][k] for k in _FINAL if k in rows[-1]}


def audit(result: FederatedResult, cfg: Config, num_silos: int) -> dict[str, float]:
    """Membership audit of a run's final model against its own starting point as the reference."""
    silos = baselines.load_silos(cfg, num_silos)
    if not any(s.heldout for s in silos):
        raise UirlError("the membership audit needs held-out users: set holdout-users > 0 in [base]")
    banks = {s.silo_id: TextBank(s.item_text, result.encoder.tokenizer, cfg.model.max_tokens) for s in silos}
    return membership_audit(result.state, result.initial, result.model, banks, silos,
                            max_history=cfg.data.max_history, num_negatives=cfg.data.train_negatives,
                            seed=cfg.train.seed)


def _flower_federated(cfg: Config, run_config: dict[str, Any], num_silos: int) -> tuple[list[dict], dict]:
    """A federated cell through a real ``flwr run`` (simulation.flower); rows from its run directory."""
    from simulation.flower import run
    from uirl.launch.run_config import format_overrides

    with tempfile.TemporaryDirectory(prefix="uirl-sweep-") as tmp:
        overrides = {**run_config, "run-dir": tmp, "run-name": "cell", "min-nodes": num_silos}
        status, _ = run(supernodes=num_silos, run_config=format_overrides(overrides), cpus_per_client=1,
                        log=io.StringIO())
        if status != "finished:completed":
            raise UirlError(f"flwr run of a sweep cell ended with status {status}")
        run_dir = Path(tmp) / "cell"
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        ledger = json.loads((run_dir / "privacy_ledger.json").read_text()) if (run_dir / "privacy_ledger.json").exists() else {}
    privacy = accounting(cfg, {}, cfg.federation.num_rounds)
    if cfg.privacy.enabled and ledger:
        worst = max(ledger.values(), key=lambda r: r.get("epsilon", 0.0))
        privacy = {"guarantee": "user-level per silo", "unit": "one user of a silo", "epsilon": worst["epsilon"],
                   "delta": worst["delta"], "noise-multiplier": worst["noise-multiplier"],
                   "sample-rate": worst["sample-rate"], "steps": worst["steps"] * worst["rounds-trained"],
                   "accountant": cfg.privacy.accountant, "clip": cfg.privacy.clip_norm}
    return rows, privacy


def run_cell(cell, on_round: Callable[[dict], None]) -> dict[str, Any]:
    cfg = from_run_config(cell.run_config)
    silos = cell.silos
    fingerprint = baselines.candidates_fingerprint(baselines.load_silos(cfg, silos))
    out: dict[str, Any] = {"candidates": fingerprint}
    if cell.method in ("federated", "central-dp", "centralized"):
        if cell.engine == "flower" and cell.method != "centralized":
            rows, privacy = _flower_federated(cfg, cell.run_config, silos)
            out.update({**privacy, **_final(rows), "rounds": rows})
            return out
        result = (baselines.centralized(cfg, silos, on_round=on_round) if cell.method == "centralized"
                  else run_federated(cfg, silos, on_round=on_round))
        out.update({**result.privacy, **_final(result.rounds), "rounds": result.rounds})
        if cell.audit:
            out.update(audit(result, cfg, silos))
        return out
    if cell.method == "local-only":
        rows = baselines.local_only(cfg, silos, on_round=on_round)
        return {**out, **accounting(cfg, {}, cfg.federation.num_rounds), **_final(rows), "rounds": rows}
    if cell.method == "sasrec":  # trained, but centrally and without DP: no rounds, no privacy steps
        metrics = baselines.sasrec(cfg, silos)
        return {**out, **accounting(cfg, {}, 0), **metrics, "rounds": [{"round": 0, **metrics}]}
    if cell.method in ("popularity", "popularity-global"):
        metrics = baselines.popularity(cfg, silos, scope="global" if cell.method == "popularity-global" else "silo")
    else:
        metrics = baselines.zero_shot(cfg, silos)
    return {**out, **accounting(cfg, {}, 0), "steps": 0, **metrics, "rounds": [{"round": 0, **metrics}]}

