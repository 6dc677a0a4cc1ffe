"""Every command in the README works as written in a fresh shell (no virtualenv on PATH).

The commands are the lines of the README's ``bash`` blocks and the inline code spans that start
with ``.venv/bin/``. Each one must call an executable of the virtualenv (``.venv/bin/X`` exists, a
``python -m`` module is found) or a system tool named below; a bare ``uirl ...`` or ``python -m ...``
would fail in a fresh shell. Cheap commands then run for real, in a fresh environment (minimal
PATH, empty HOME): every subcommand's and module's ``--help``, ``uirl config``, the MovieLens-layout
data through ``uirl data convert`` and ``uirl data stats``, and ``uirl show/export/embed/recommend``
on a run directory with the tiny test model. The README's test command is the one ``.ci/run`` runs.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
#: The README's ``.venv/bin/`` is the virtualenv running these tests (in CI it is ``ROOT/.venv``).
VENV_BIN = Path(sys.executable).parent

#: Commands a fresh shell has without the virtualenv (or that the README runs as root / in Docker).
SYSTEM = {"export", "mkdir", "printf", "docker", "sudo", "source", "cd", "python3.11",
          "deploy/generate-credentials.sh"}
#: README commands run exactly as written (``<run>``/``<timestamp>`` is a run made with the tiny model).
RUN_AS_WRITTEN = [
    ".venv/bin/python -m simulation.movielens_demo data/ml100k-demo",
    ".venv/bin/uirl data convert --format movielens data/ml100k-demo data/ml100k-demo-uirl",
    ".venv/bin/uirl config",
    ".venv/bin/uirl show runs/<timestamp>",
    ".venv/bin/uirl export runs/<run> exported-model",
    ".venv/bin/uirl embed runs/<run>/final --out users.parquet",
    ".venv/bin/uirl recommend runs/<run>/final --out recs.csv -k 10",
]


def _bash_lines() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)  # backslash continuations
        for line in joined.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()  # trailing comments
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _inline_commands() -> list[str]:
    return [span for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", README) if span.startswith(".venv/bin/")
            and span != ".venv/bin/..."]


def readme_commands() -> list[str]:
    return _bash_lines() + _inline_commands()


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line: split at ``&&``, ``||``, ``;`` and ``|``, without
    redirections, ``for`` headers, ``do``/``done``, environment assignments and ``nice -n N``."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out, words = [], []
    for token in list(lexer) + [";"]:
        if token in ("&&", "||", ";", "|"):
            if words:
                out.append(words)
            words = []
        else:
            words.append(token)
    commands = []
    for words in out:
        if ">" in words:
            words = words[:words.index(">")]
        while words and (re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]) or words[0] in ("do", "done")):
            words = words[1:]
        if words[:2] == ["nice", "-n"]:
            words = words[3:]
        if words and words[0] != "for":
            commands.append(words)
    return commands


def test_every_readme_command_names_something_that_exists():
    problems = []
    commands = [words for line in readme_commands() for words in simple_commands(line)]
    assert len(commands) > 30
    for words in commands:
        exe = words[0]
        if exe.startswith(".venv/bin/"):
            name = exe.removeprefix(".venv/bin/")
            if not (VENV_BIN / name).exists():
                problems.append(f"{' '.join(words)}: no {name} in the virtualenv")
            elif name.startswith("python") and words[1:2] == ["-m"] and importlib.util.find_spec(words[2]) is None:
                problems.append(f"{' '.join(words)}: no module {words[2]}")
        elif exe not in SYSTEM:
            problems.append(f"{' '.join(words)}: {exe!r} is not on a fresh shell's PATH (write .venv/bin/{exe})")
        elif exe == "python3.11" and words[1:3] != ["-m", "venv"]:
            problems.append(f"{' '.join(words)}: use .venv/bin/python")
    assert not problems, "\n".join(problems)


def test_no_bare_commands_in_the_text():
    """Inline commands with arguments are written with ``.venv/bin/`` too."""
    spans = [span for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", README) if re.match(r"(uirl|python3?) ", span)]
    bare = [span for span in spans if "/" in span or " -" in re.sub(r"^python3? -m \S+", "", span)]
    assert not bare, bare


def test_the_readme_test_command_is_what_ci_runs():
    readme = next(line for line in _bash_lines() if line.endswith("python -m pytest -q") and "whl/cpu" in line)
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip().startswith(('"$PY" -m venv', ".venv/bin/"))]
    ci = [line.replace('"$PY"', "python3.11").replace(" -q ", " ").replace(" -q\n", "") for line in ci]
    ci = [line.replace("pytest", "pytest -q") if line.endswith("pytest") else line for line in ci]
    assert [c.strip() for c in readme.split("&&")] == ci


def _fresh_env(home: Path) -> dict[str, str]:
    # PYTHONPATH: the checkout under test (in CI the editable install points there anyway).
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1"}


def _run(words: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = [str(VENV_BIN / words[0].removeprefix(".venv/bin/")), *words[1:]]
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(words)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out


def test_help_of_every_subcommand_and_module(tmp_path):
    helps = set()
    for line in readme_commands():
        for words in simple_commands(line):
            if words[0] == ".venv/bin/uirl":
                sub = [w for w in words[1:3] if re.fullmatch(r"[a-z]+", w)]
                helps.add((words[0], *(sub[:2] if sub[:1] == ["data"] else sub[:1])))
            elif words[0] == ".venv/bin/python" and words[1] == "-m" and words[2] != "pytest":
                helps.add((words[0], "-m", words[2]))
    assert (".venv/bin/uirl", "run") in helps and (".venv/bin/uirl", "deploy") in helps
    env = _fresh_env(tmp_path)
    with ThreadPoolExecutor(2) as pool:  # each a fresh interpreter; two at a time on a 2-core machine
        outs = list(pool.map(lambda words: _run([*words, "--help"], tmp_path, env), sorted(helps)))
    for words, out in zip(sorted(helps), outs):
        assert "usage:" in out.stdout, words


def test_uirl_help_does_not_import_torch():
    """``uirl --help`` and every subcommand's parser load without torch (10 s on a 2-core machine):
    the heavy imports belong inside the commands that use them."""
    code = ("import sys, uirl.cli; uirl.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'opacus', 'flwr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.fixture()
def run_dir(tmp_path, tiny_bert):
    """``runs/<run>/`` as a finished run leaves it, with the tiny model."""
    from helpers import tiny_config
    from uirl.config import to_run_config
    from uirl.model.build import build_model, save_adapter
    from uirl.rundir import RunDirectory

    cfg = tiny_config(tiny_bert, **{"synthetic-users": 30, "synthetic-items": 120})
    model, encoder = build_model(cfg)
    run = RunDirectory.create(tmp_path / "runs", "20261201-120000", {"run-config": to_run_config(cfg)})
    run.record_round({"round": 0, "auc": 0.5})
    run.record_round({"round": 1, "auc": 0.6, "epsilon/silo-0": 1.0})
    run.record_privacy(1, "0", {"epsilon": 1.0, "delta": 1e-5, "target-epsilon": 8.0, "rounds-trained": 1})
    save_adapter(model, run.path / "final", meta={"base-model": encoder.model_name, "run-config": to_run_config(cfg)})
    return run.path


def test_cheap_readme_commands_run_as_written(tmp_path, run_dir):
    written = readme_commands()
    env = _fresh_env(tmp_path)
    for command in RUN_AS_WRITTEN:
        assert command in written, f"the README no longer has {command!r}"
        command = command.replace("<timestamp>", run_dir.name).replace("<run>", run_dir.name)
        _run(shlex.split(command), tmp_path, env)
    assert (tmp_path / "data" / "ml100k-demo-uirl" / "split.parquet").is_file()
    assert (tmp_path / "exported-model" / "README.md").is_file()
    assert (tmp_path / "users.parquet").is_file() and (tmp_path / "recs.csv").is_file()
    # The inline `uirl data stats DIR --silos N --partitioning ...` on the converted data.
    assert any(c.startswith(".venv/bin/uirl data stats DIR") for c in written)
    stats = _run([".venv/bin/uirl", "data", "stats", "data/ml100k-demo-uirl", "--silos", "3", "--partitioning", "iid"],
                 tmp_path, env)
    assert "users" in stats.stdout
