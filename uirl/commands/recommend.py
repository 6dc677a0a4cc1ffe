"""``uirl recommend MODEL_DIR --out recs.csv|recs.jsonl [-k 10]``: top-k items per user.

Ranks, for every user of the chosen silos, either the whole catalogue minus the items the user
already touched (``--candidates catalogue``, default; the history is the user's whole sequence),
or the user's fixed test candidates (``--candidates test``; the history stops before the test
target, as in evaluation). Scores are the model's own: the top-level interest, or the facets when
facets are on. CSV rows are ``user_id, rank, item_id, score``; JSONL lines are
``{"user_id", "items", "scores"}``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from uirl.commands.embed import add_model_arguments, atomic_output, load
from uirl.errors import UirlError


def _recommend(args: argparse.Namespace) -> int:
    import torch

    from uirl.train import represent_users

    out = Path(args.out)
    if out.suffix not in (".csv", ".jsonl"):
        raise UirlError(f"--out {out}: expected a .csv or .jsonl file name")
    if args.k < 1:
        raise UirlError(f"-k {args.k}: expected an integer >= 1")
    model, cfg, silos = load(args)
    device = next(model.parameters()).device
    results: list[tuple[str, list[str], list[float]]] = []
    with torch.no_grad():
        for silo, bank in silos:
            catalogue = bank.item_ids
            split = "full" if args.candidates == "catalogue" else "test"
            reps, vectors = represent_users(model, bank, silo.users, split=split, max_history=cfg.data.max_history,
                                            extra_keys=catalogue if split == "full" else ())
            if split == "full":
                items = torch.stack([vectors[i] for i in catalogue]).unsqueeze(0)
                everything_prior = bank.prior_row(catalogue, device)
            for user, (rep, cands) in zip(silo.users, reps):
                if split == "full":
                    ids = catalogue
                    scores = model.score_rep(rep, items.to(rep.interest.device), everything_prior)[0]
                    seen = silo.touched.get(user.user_id, frozenset())
                    scores = scores.masked_fill(torch.tensor([i in seen for i in ids], device=scores.device),
                                                float("-inf"))
                else:
                    ids = list(user.test_candidates)
                    scores = model.score_rep(rep, cands, bank.prior_row(ids, device))[0]
                k = min(args.k, int(torch.isfinite(scores).sum()))
                top = torch.topk(scores, k)
                results.append((user.user_id, [ids[i] for i in top.indices.tolist()],
                                [float(s) for s in top.values.tolist()]))
    if not results:
        raise UirlError("no users to recommend for")

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            if out.suffix == ".csv":
                writer = csv.writer(fh)
                writer.writerow(["user_id", "rank", "item_id", "score"])
                for user_id, items, scores in results:
                    writer.writerows((user_id, r, i, f"{s:.6f}") for r, (i, s) in enumerate(zip(items, scores), 1))
            else:
                for user_id, items, scores in results:
                    fh.write(json.dumps({"user_id": user_id, "items": items,
                                         "scores": [round(s, 6) for s in scores]}) + "\n")

    atomic_output(out, write)
    print(f"uirl: top-{args.k} {args.candidates} items for {len(results)} users in {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    rec = sub.add_parser("recommend", help="rank items for every user (top-k per user, CSV or JSONL)")
    add_model_arguments(rec)
    rec.add_argument("--out", required=True, help="output file: .csv or .jsonl")
    rec.add_argument("-k", type=int, default=10, help="items per user (default 10)")
    rec.add_argument("--candidates", choices=("catalogue", "test"), default="catalogue",
                     help="rank the untouched catalogue (default) or the user's fixed test candidates")
    rec.set_defaults(func=_recommend)
