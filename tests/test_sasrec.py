"""SASRec, the centralized non-private peer baseline: config checks, causality, it learns a
sequential pattern, and it is scored on the same candidate lists as every other row."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from uirl import baselines
from uirl.config import from_run_config
from uirl.data import build_users, touched_items
from uirl.data.silo import Silo
from uirl.errors import ConfigError
from uirl.metrics import mean_metrics, ranking_metrics
from uirl.sasrec import SASRec, SASRecConfig, fit

SMALL = SASRecConfig(hidden=32, blocks=2, heads=2, max_len=12, dropout=0.1, lr=5e-3, epochs=3, batch_size=64)


@pytest.mark.parametrize("field, value", [("hidden", 0), ("blocks", 0), ("max_len", -1), ("epochs", 0),
                                          ("batch_size", 2.5), ("patience", 0), ("heads", 3), ("dropout", 1.0),
                                          ("lr", 0.0), ("seed", "0")])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        SASRecConfig(**{field: value})
    assert err.value.field == field and repr(value) in str(err.value)


def test_output_at_t_does_not_see_items_after_t():
    torch.manual_seed(0)
    model = SASRec(30, SMALL).eval()
    seq = torch.tensor([[0, 0, 0, 0, 3, 7, 1, 9, 4, 12, 5, 8]])
    changed = seq.clone()
    changed[0, 8:] = torch.tensor([20, 21, 22, 23])
    with torch.no_grad():
        a, b = model(seq), model(changed)
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-6)
    assert not torch.allclose(a[0, 8:], b[0, 8:], atol=1e-3)  # later positions do see the change
    assert torch.isfinite(a).all()  # padding positions attend to themselves: no all-blocked row


def _walk_silos(num_users=150, num_items=50, length=12, num_silos=2, seed=0) -> list[Silo]:
    """Each user walks item k -> k+1 -> ... (mod num_items) from a random start: the next item is
    fully determined by the last one, and popularity is flat."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"item_id": [f"i{k:02d}" for k in range(num_items)],
                          "text": [f"item {k}" for k in range(num_items)]})
    rows = [(f"u{u:03d}", f"i{(start + t) % num_items:02d}", t, "click")
            for u, start in enumerate(rng.integers(num_items, size=num_users)) for t in range(length)]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "behavior"])
    users = build_users(events, items, num_negatives=19, seed=seed)
    touched = touched_items(events)
    item_text = dict(zip(items["item_id"], items["text"]))
    return [Silo(silo_id=k, item_text=item_text, users=tuple(users[k::num_silos]), touched=touched,
                 eval_users=tuple(users[k::num_silos])) for k in range(num_silos)]


def test_learns_a_deterministic_sequence_far_above_popularity():
    silos = _walk_silos()
    cfg = SASRecConfig(hidden=32, max_len=12, lr=5e-3, epochs=40, patience=5, batch_size=64, dropout=0.1)
    got = baselines.sasrec_on_silos(silos, cfg)
    popular = []
    for silo in silos:
        counts = Counter(i for u in silo.users for i in u.train_items)
        popular += [ranking_metrics(np.array([counts[i] for i in u.test_candidates], float)) for u in silo.eval_users]
    pop = mean_metrics(popular)
    assert pop["mrr"] < 0.4 and got["mrr"] > 0.8 and got["recall@5"] > 0.95, (got, pop)
    # 50 items, the user's 12 touched ones excluded: chance recall@10 would be about 10 / 39.
    assert got["full/recall@10"] > 0.9 and 1 <= got["best-epoch"] <= got["epochs-run"] <= 40


def test_fit_is_deterministic_and_leaves_the_global_rng_alone():
    seqs = [[1 + (s + t) % 20 for t in range(8)] for s in range(20)]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, _ = fit(seqs, 20, SMALL)
    after = torch.rand(1)
    b, _ = fit(seqs, 20, SMALL)
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_baseline_scores_the_popularity_candidate_lists_and_reports_full_catalogue_keys(monkeypatch):
    cfg = from_run_config({"synthetic-users": 40, "synthetic-items": 300, "eval-negatives": 9,
                           "eval-max-users": 6, "eval-min-users": 5, "device": "cpu"})
    small = SASRecConfig(hidden=16, max_len=10, epochs=2, batch_size=32)
    got = baselines.sasrec(cfg, 2, sas=small)
    assert set(got) >= set(baselines.FULL_METRICS) | {"auc", "mrr", "ndcg@5", "ndcg@10", "recall@5", "recall@10"}
    assert all(0.0 <= got[k] <= 1.0 for k in baselines.FULL_METRICS)
    # Score item k of the sorted catalogue with k: every scored list then names its own items.
    silos = baselines.load_silos(cfg, 2)
    catalogue = sorted(silos[0].item_text)
    monkeypatch.setattr(SASRec, "catalogue_scores", lambda self, h: torch.arange(len(catalogue)).expand(len(h), -1))
    scored = []
    real = baselines.ranking_metrics
    monkeypatch.setattr(baselines, "ranking_metrics", lambda s: scored.append(s) or real(s))
    baselines.sasrec(cfg, 2, sas=small)
    test_lists = [tuple(catalogue[int(k)] for k in s) for s in scored[-sum(len(s.eval_users) for s in silos):]]
    assert test_lists == [u.test_candidates for s in silos for u in s.eval_users]  # popularity's lists
    assert len(test_lists) == 12


def test_sweep_cell_records_a_non_private_row_with_full_catalogue_metrics(tmp_path):
    from simulation import sweep as sw
    from simulation.cells import run_cell

    path = tmp_path / "s.toml"
    path.write_text('[sweep]\nsilos = 2\nmethods = ["sasrec", "popularity"]\n[base]\nsynthetic-users = 40\n'
                    'synthetic-items = 300\neval-negatives = 9\ndevice = "cpu"\n[grid]\ntarget-epsilon = [2.0, inf]\n',
                    encoding="utf-8")
    cells = {c.method: c for c in sw.load_sweep(path).cells}
    assert len(cells) == 2 and not cells["sasrec"].run_config["dp"]  # privacy keys do not apply: one cell
    rows = {m: run_cell(c, lambda row: None) for m, c in cells.items()}
    row = rows["sasrec"]
    assert row["guarantee"] == "none" and row["candidates"] == rows["popularity"]["candidates"]
    assert set(baselines.FULL_METRICS) <= set(row) and row["rounds"][0]["auc"] == row["auc"]
