"""``uirl show`` on damaged run files: one line naming the file (and line or node), never a traceback."""

from __future__ import annotations

import json

import pytest

from uirl.cli import main
from uirl.rundir import RunDirectory

ENTRY = {"silo": 0, "status": "trained", "epsilon": 0.812, "delta": 1e-5, "target-epsilon": 8.0,
         "noise-multiplier": 1.1, "sample-rate": 0.25, "steps": 12}


def _run(tmp_path):
    run = RunDirectory.create(tmp_path / "runs", "r", {})
    run.record_round({"round": 0, "auc": 0.5})
    run.record_round({"round": 1, "auc": 0.6, "epsilon/silo-0": 0.812})
    run.record_privacy(1, "101", ENTRY)
    run.record_privacy(1, "202", {**ENTRY, "silo": 1, "epsilon": 0.9})
    return run.path


def _stderr_lines(capsys) -> tuple[str, list[str]]:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.out, captured.err.strip().splitlines()


def test_a_ledger_entry_without_epsilon_is_named_and_the_rest_is_shown(tmp_path, capsys):
    path = _run(tmp_path)
    ledger = json.loads((path / "privacy_ledger.json").read_text())
    del ledger["101"]["epsilon"]
    (path / "privacy_ledger.json").write_text(json.dumps(ledger))
    assert main(["show", str(path)]) == 2
    out, err = _stderr_lines(capsys)
    assert err == [f"uirl: {path / 'privacy_ledger.json'}, node '101': no epsilon (expected a number, found None); "
                   "this entry is damaged and not shown"]
    assert "silo 1 (node 202): epsilon 0.900 of 8.0" in out and "node 101" not in out
    assert "0.6000" in out  # the round table is still printed


@pytest.mark.parametrize("name, text, where", [
    ("privacy_ledger.json", '{"101": {"epsilon": 0.8,\n "silo" 0}}', "privacy_ledger.json line 2: not valid JSON"),
    ("privacy_ledger.json", "[1, 2]", "privacy_ledger.json: expected a JSON object, found a list"),
    ("privacy_ledger.json", '{"101": 0.8}', "privacy_ledger.json, field '101': expected a JSON object per node"),
    ("metrics.jsonl", '{"round": 0, "auc": 0.5}\n{"round": 1, "au\n', "metrics.jsonl line 2: not valid JSON"),
    ("metrics.jsonl", '{"round": 0}\n\n[1]\n', "metrics.jsonl line 3: expected a JSON object, found a list"),
])
def test_a_file_that_does_not_parse_is_one_line_with_file_and_line(tmp_path, capsys, name, text, where):
    path = _run(tmp_path)
    (path / name).write_text(text)
    assert main(["show", str(path)]) == 2
    _, err = _stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"uirl: {path / where.split()[0].rstrip(':,')}") and where in err[0]


def test_privacy_jsonl_is_not_what_show_reads(tmp_path, capsys):
    """``privacy.jsonl`` (every reply, rejected ones without epsilon) is for audits; a damaged line
    there does not stop ``uirl show``, which reads the ledger."""
    path = _run(tmp_path)
    with open(path / "privacy.jsonl", "a") as fh:
        fh.write('{"round": 2, "node-id": "303", "rejected": "bad"}\nnot json\n')
    assert main(["show", str(path)]) == 0
    out, err = _stderr_lines(capsys)
    assert err == [] and "silo 0 (node 101): epsilon 0.812" in out


def test_resuming_over_a_damaged_privacy_jsonl_names_the_line_and_rewrites_nothing(tmp_path):
    from uirl.errors import DataError

    path = _run(tmp_path)
    with open(path / "privacy.jsonl", "a") as fh:
        fh.write("not json\n")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(DataError, match=r"privacy\.jsonl line 3: not valid JSON"):
        RunDirectory.reopen(path, upto_round=1, rounds=[{"round": 0}], ledger={})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
