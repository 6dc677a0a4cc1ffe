"""The sweep runner: cells from a grid, one key per distinct run, resume after an interruption."""

from __future__ import annotations

import json

import pytest

from simulation import sweep as sw
from simulation.cells import run_cell
from uirl.errors import ConfigError

SWEEP = """
[sweep]
silos = 2
methods = [{methods}]
audit = false

[base]
model-name = "{model}"
synthetic-users = 40
synthetic-items = 300
max-history = 4
train-negatives = 3
eval-negatives = 9
eval-max-users = 5
eval-min-users = 5
batch-users = 8
lora-r = 4
max-tokens = 16
num-server-rounds = 1
local-epochs = 0.5
device = "cpu"

[grid]
target-epsilon = [2.0, inf]
seed = [0, 1]
"""


def _write(tmp_path, model, methods='"popularity", "zero-shot"', extra=""):
    path = tmp_path / "s.toml"
    path.write_text(SWEEP.format(model=model, methods=methods) + extra, encoding="utf-8")
    return path


def test_grid_expands_per_method_and_dedupes_what_does_not_apply(tiny_bert, tmp_path):
    cells = sw.load_sweep(_write(tmp_path, tiny_bert, '"federated", "central-dp", "popularity"')).cells
    by = {}
    for c in cells:
        by.setdefault(c.method, []).append(c)
    assert len(by["federated"]) == 4  # 2 eps x 2 seeds; eps=inf is the non-private run
    assert {c.run_config["dp"] for c in by["federated"]} == {True, False}
    assert len(by["central-dp"]) == 2  # eps=inf has no central DP cell
    assert all(c.run_config["central-dp"] == "fixed" and not c.run_config["dp"] for c in by["central-dp"])
    assert len(by["popularity"]) == 2  # privacy keys do not apply: one per seed
    assert len({c.key for c in cells}) == len(cells)
    # The key covers the full resolved config: a changed value is a different cell.
    a = sw.Cell("federated", {"seed": 0}, {}, 2, "inprocess", False)
    b = sw.Cell("federated", {"seed": 1}, {}, 2, "inprocess", False)
    assert sw.cell_key(a) != sw.cell_key(b) and sw.cell_key(a) == sw.cell_key(sw.Cell(**a.__dict__))


def test_interrupted_sweep_resumes_without_recomputing_a_cell(tiny_bert, tmp_path):
    sweep = sw.load_sweep(_write(tmp_path, tiny_bert), out=tmp_path / "out")
    assert len(sweep.cells) == 4
    calls = []

    def counting(cell, on_round):
        calls.append(cell.key)
        return run_cell(cell, on_round)

    def interrupt(cell, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sw.run_sweep(sweep, run_cell=counting, after_cell=interrupt)
    assert len(calls) == 1
    results = tmp_path / "out" / "results.jsonl"
    assert len(sw.read_results(results)) == 1
    # A sweep killed while writing leaves a torn last line: it is dropped, not fatal, not kept.
    with open(results, "a", encoding="utf-8") as fh:
        fh.write('{"key": "torn", "meth')
    rows = sw.run_sweep(sw.load_sweep(_write(tmp_path, tiny_bert), out=tmp_path / "out"), run_cell=counting)
    assert len(calls) == 4 and len(set(calls)) == 4  # the first cell was not run again
    assert sorted(r["key"] for r in rows) == sorted(c.key for c in sweep.cells)
    lines = results.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    assert (tmp_path / "out" / "results.csv").read_text().count("\n") == 5
    # Every row records its accounting explicitly.
    for row in rows:
        assert row["guarantee"] == "none" and row["epsilon"] == float("inf")
        assert {"delta", "noise-multiplier", "sample-rate", "steps", "accountant", "run-config"} <= set(row)
    # Run again: nothing to do.
    sw.run_sweep(sw.load_sweep(_write(tmp_path, tiny_bert), out=tmp_path / "out"), run_cell=counting)
    assert len(calls) == 4


def test_private_cells_record_their_guarantee(tiny_bert, tmp_path):
    sweep = sw.load_sweep(_write(tmp_path, tiny_bert, '"federated"', extra=""), out=tmp_path / "out")
    cell = next(c for c in sweep.cells if c.run_config["dp"] and c.run_config["seed"] == 0)
    row = run_cell(cell, lambda r: None)
    assert row["guarantee"] == "user-level per silo" and row["accountant"] == "rdp"
    assert 0 < row["epsilon"] <= 2.0 and row["delta"] == 1e-5 and row["noise-multiplier"] > 0
    assert 0 < row["sample-rate"] <= 1 and row["steps"] >= 1
    assert [r["round"] for r in row["rounds"]] == [0, 1] and "epsilon/silo-1" in row["rounds"][1]


@pytest.mark.parametrize("text, field", [
    ("[sweep]\nmethods = ['federated', 'nope']\n", "sweep.methods"),
    ("[sweep]\nsilos = 0\n", "sweep.silos"),
    ("[grid]\nlr = 0.1\n", "grid.lr"),
    ("[base]\nlr = -1.0\n", "lr"),
    ("[base]\nno-such-key = 1\n", "no-such-key"),
    ("[sweep\n", None),
])
def test_bad_sweep_files_fail_with_one_clear_error(tmp_path, text, field, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        sw.load_sweep(path)
    assert str(path) in str(err.value) and (field is None or field in str(err.value))
    assert sw.main([str(path)]) == 2
    assert capsys.readouterr().err.startswith("uirl: ")


def test_a_sweep_runs_on_a_converted_dataset(tiny_bert, tmp_path):
    """``dataset`` in [base] points every cell at a directory written by ``uirl data convert``."""
    import publisher_files as pf
    from uirl.data.convert import ConvertOptions, convert

    data = tmp_path / "ml"
    convert("movielens", pf.write_ml100k_synthetic(tmp_path / "src", num_users=30, num_items=100), data,
            ConvertOptions(negatives=9))
    text = SWEEP.format(model=tiny_bert, methods='"federated", "centralized", "popularity"')
    text = text.replace("synthetic-users = 40\nsynthetic-items = 300\n", f'dataset = "{data.as_posix()}"\n')
    text = text.replace("target-epsilon = [2.0, inf]\nseed = [0, 1]", "target-epsilon = [inf]\nseed = [0]")
    path = tmp_path / "s.toml"
    path.write_text(text, encoding="utf-8")
    sweep = sw.load_sweep(path, out=tmp_path / "out")
    assert {c.method for c in sweep.cells} == {"federated", "centralized", "popularity"}
    sw.run_sweep(sweep)
    rows = sw.read_results(tmp_path / "out" / "results.jsonl")
    assert len(rows) == 3 and all(r["run-config"]["dataset"] == str(data.as_posix()) for r in rows)
    assert len({r["candidates"] for r in rows}) == 1  # every method scored on the same converted lists
    assert all(0.0 <= r["auc"] <= 1.0 for r in rows)
    # Each cell ran in its own process and measured its own peak memory.
    assert all(0.0 < r["peak-rss-gb"] < 24.0 for r in rows)


def test_the_ablation_trains_through_the_engine_and_reports_round_zero(tiny_bert):
    """The ablation has no round loop of its own: its FedAvg is the in-process engine (the
    ServerApp's round function), evaluated after the last round, with round 0 as the zero-shot row."""
    from helpers import tiny_config
    from simulation.ablation import METRICS, fedavg

    lines, zero = [], {}
    metrics, train_s, eval_s = fedavg(tiny_config(tiny_bert), 2, log=lines.append, zero_shot=zero)
    assert set(METRICS) <= set(metrics) and set(METRICS) <= set(zero)
    assert all(0.0 <= metrics[m] <= 1.0 for m in METRICS)
    assert metrics["train-loss"] != metrics["train-loss"]  # NaN: under DP a silo keeps its loss to itself
    assert train_s > 0 and eval_s > 0 and zero["eval-seconds"] > 0
    assert [line.split(":")[0].strip() for line in lines] == ["round 1", "round 2"]


def test_a_round_line_names_only_the_numbers_a_round_has():
    dp = sw.round_summary("cell", {"round": 3, "train-loss": float("nan"), "auc": 0.81234, "epsilon": 6.5})
    assert dp == "cell | round 3 auc=0.8123 eps=6.50"
    plain = sw.round_summary("cell", {"round": 1, "train-loss": 1.5, "epsilon": float("inf")})
    assert plain == "cell | round 1 train-loss=1.5000 eps=inf"
