"""The README's run-config table and pyproject's defaults describe the code, key for key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from uirl.config import _KEYS, from_run_config, to_run_config

ROOT = Path(__file__).resolve().parents[1]


def _readme_keys() -> dict[str, str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Run configuration", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([a-z0-9-]+)` \| ([^|]*?) \|", section, flags=re.M))


def test_every_run_config_key_is_in_pyproject_and_the_readme():
    documented = _readme_keys()
    table = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    assert set(table) == set(_KEYS), set(table) ^ set(_KEYS)
    assert set(documented) == set(_KEYS), set(documented) ^ set(_KEYS)


def test_pyproject_defaults_equal_the_code_defaults():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    assert to_run_config(from_run_config(table)) == to_run_config(from_run_config({}))


def test_readme_defaults_equal_the_code_defaults():
    def shown(value) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return '""' if value == "" else str(value)

    defaults = {key: shown(value) for key, value in to_run_config(from_run_config({})).items()}
    assert _readme_keys() == defaults


def test_the_library_never_imports_flower():
    """uirl/ is Flower-free (DESIGN.md): importing every module, and partitioning users with the
    standalone flwr-datasets partitioners, loads no ``flwr`` module."""
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
        "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
