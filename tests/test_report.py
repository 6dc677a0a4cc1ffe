"""The report builds its plots and tables from a small results file."""

from __future__ import annotations

import json
import math

from simulation import report


def _row(method, eps, auc, *, guarantee=None, mia=None, key=None):
    guarantee = guarantee or ("none" if math.isinf(eps) else "user-level per silo")
    rounds = [{"round": 0, "auc": 0.6}, {"round": 1, "auc": auc, "epsilon/silo-0": eps / 2, "epsilon/silo-1": eps / 2},
              {"round": 2, "auc": auc, "epsilon/silo-0": eps, "epsilon/silo-1": eps}]
    row = {"key": key or f"{method}-{eps}", "method": method, "guarantee": guarantee, "epsilon": eps,
           "delta": 0.0 if math.isinf(eps) else 1e-5, "noise-multiplier": 0.0 if math.isinf(eps) else 1.2,
           "sample-rate": None if math.isinf(eps) else 0.3, "steps": None if math.isinf(eps) else 9,
           "accountant": None if math.isinf(eps) else "rdp", "auc": auc, "mrr": auc / 2, "ndcg@10": auc / 1.5,
           "recall@10": auc, "rounds": rounds, "candidates": "abc", "seconds": 3.0,
           "run-config": {"target-epsilon": 8.0 if math.isinf(eps) else eps, "seed": 0}}
    if mia is not None:
        row.update({"mia-loss-auc": mia, "mia-calibrated-auc": mia - 0.02, "mia-loss-tpr@1%": 0.02,
                    "mia-loss-tpr@0.1%": 0.0, "mia-calibrated-tpr@1%": 0.01, "mia-calibrated-tpr@0.1%": 0.0,
                    "mia-loss-auc-reference": 0.51, "members": 80, "nonmembers": 20})
    return row


def test_report_builds_plots_and_tables(tmp_path):
    rows = [_row("federated", 1.0, 0.70, mia=0.52), _row("federated", 8.0, 0.74, mia=0.55),
            _row("federated", 8.0, 0.76, mia=0.57, key="seed-1"), _row("federated", math.inf, 0.78, mia=0.66),
            _row("central-dp", 8.0, 0.61, guarantee="client-level", mia=0.5),
            _row("centralized", math.inf, 0.80, mia=0.7), _row("local-only", math.inf, 0.68),
            _row("popularity", math.inf, 0.65), _row("zero-shot", math.inf, 0.66),
            {**_row("sasrec", math.inf, 0.81), "full/recall@10": 0.1, "full/ndcg@10": 0.05,
             "full/recall@20": 0.1875, "full/ndcg@20": 0.07}]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "sweep.toml").write_text("[sweep]\nsilos = 2\n", encoding="utf-8")
    assert report.main([str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    out = tmp_path / "rep"
    for name in report.PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "same test candidate lists: yes" in md and "silos = 2" in md
    # Two seeds of eps=8 are averaged into one line; every method has its line.
    line = next(l for l in md.splitlines() if l.startswith("| federated | user-level per silo | 8.0"))
    assert "0.7500" in line and "| 2 |" in line
    # The headline: mean ± sample sd over the two seeds, in points.
    head = next(l for l in md.splitlines() if l.startswith("| federated | 8.0 |"))
    assert "| 50.0 ± 0.9 | 75.0 ± 1.4 |" in head and head.endswith("| 2 |")
    for label in ("centralized", "local only", "popularity", "zero-shot", "federated + central DP",
                  "SASRec (centralized)"):
        assert f"| {label} |" in md
    # Only the row that has full-catalogue metrics gets a line in their table.
    full = md.split("whole catalogue", 1)[1].split("\n\n", 2)[1].splitlines()
    assert len(full) == 3 and full[2].startswith("| SASRec (centralized) | none | inf | 0.1000 | 0.0500 | 0.1875")
    mia = [l for l in md.splitlines() if l.startswith("| federated | none | inf") and "0.6600" in l]
    assert mia, md


def test_report_without_results_fails_with_one_line(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("uirl: ")


def test_candidate_lists_are_compared_within_a_seed(tmp_path):
    """Seeds assign users to silos, so each seed has its own lists; within a seed they must agree."""
    seed1 = {**_row("popularity", math.inf, 0.6, key="p1"), "candidates": "other"}
    seed1["run-config"] = {**seed1["run-config"], "seed": 1}
    rows = [_row("federated", 8.0, 0.7), _row("popularity", math.inf, 0.6), seed1]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert "same test candidate lists: yes" in (report.build_report(results) / "report.md").read_text()
    rows.append({**_row("zero-shot", math.inf, 0.5), "candidates": "mismatch"})
    results.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert "lists: NO (seed 0:" in (report.build_report(results) / "report.md").read_text()


def test_a_distributed_release_is_named_in_the_guarantee():
    shared = _row("federated", 8.0, 0.74)
    shared["run-config"]["popularity-noise-shares"] = 3
    groups = report.group([shared, _row("federated", 1.0, 0.70), _row("popularity", math.inf, 0.6)])
    labels = {g["target"]: g["guarantee"] for g in groups}
    assert labels == {8.0: "user-level per silo, release: SecAgg+ sum of 3 noise shares",
                      1.0: "user-level per silo", math.inf: "none"}
    local = _row("federated", 8.0, 0.76)
    local["run-config"]["local-prior"] = True
    assert report.group([local])[0]["guarantee"] == "user-level per silo; silos score with their own counts (local prior)"
