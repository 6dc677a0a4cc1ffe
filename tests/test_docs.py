"""The README's run-config table and pyproject's defaults describe the code, key for key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from uirl.cli import main
from uirl.config import _KEYS, from_run_config, run_config_rows, run_config_table, to_run_config

ROOT = Path(__file__).resolve().parents[1]


def _readme_table() -> str:
    """The first table of the README's "Run configuration" section, with a final newline."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Run configuration", 1)[1].split("\n## ", 1)[0]
    return re.search(r"^\|.*?\n(?!\|)", section, flags=re.M | re.S).group(0)


def _pyproject_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]


def test_the_readme_table_is_the_one_rendered_from_the_config_fields():
    """Keys, defaults, meanings and their order: a changed field must be pasted into the README
    (``uirl config --markdown`` prints the table)."""
    assert _readme_table() == run_config_table()


def test_every_run_config_key_is_declared_once_and_is_in_pyproject():
    declared = [key for key, _, _ in run_config_rows()]
    assert len(declared) == len(set(declared)) == len(_KEYS), declared
    table = _pyproject_table()
    assert set(table) == set(_KEYS), set(table) ^ set(_KEYS)


def test_pyproject_defaults_equal_the_code_defaults():
    assert to_run_config(from_run_config(_pyproject_table())) == to_run_config(from_run_config({}))


def test_uirl_config_prints_the_table(capsys):
    assert main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == run_config_table()
    assert main(["config"]) == 0
    assert "popularity-budget" in capsys.readouterr().out


def test_the_library_never_imports_flower():
    """uirl/ is Flower-free (DESIGN.md): importing every module, and partitioning users every way
    (uirl's own numpy partitioners), loads no ``flwr``, ``flwr_datasets`` or ``datasets`` module."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys, pandas as pd, uirl\n"
        "for m in pkgutil.walk_packages(uirl.__path__, 'uirl.'):\n"
        "    importlib.import_module(m.name)\n"
        "from uirl.data.partition import assign\n"
        "users = pd.DataFrame({'user_id': [f'u{i}' for i in range(12)], 'job': list('ab') * 6})\n"
        "for p in ('iid', 'natural', 'dirichlet'):\n"
        "    assign(users, partitioning=p, partition_by='job', alpha=0.5, num_partitions=2, seed=0)\n"
        "names = ('flwr', 'flwr_datasets', 'datasets')\n"
        "print(sorted(m for m in sys.modules if m in names or m.startswith(tuple(n + '.' for n in names))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_readme_lists_what_a_silo_sends_as_the_model_card_does():
    """The README's list of what leaves a silo is the one :mod:`uirl.privacy.guarantee` writes into
    every model card, and it names what the wire really carries: the metric keys an honest silo
    under DP sends (:data:`uirl.federated.TRAIN_REPLY_KEYS` less what it keeps)."""
    from uirl.federated import KEPT_UNDER_DP, STATUS_OK, TRAIN_REPLY_KEYS
    from uirl.privacy.guarantee import released_text

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for line in released_text({"popularity-prior": True}).splitlines():
        assert "   " + line in readme, line
    sent = TRAIN_REPLY_KEYS[STATUS_OK] - KEPT_UNDER_DP
    assert not sent & {"train-loss", "users-sampled"}
    assert "not its training loss or the size of its Poisson samples" in released_text({})
    assert "training loss and the number of users it sampled (exact" in released_text({"dp": False})
