"""Starting and stopping Flower's processes safely: environment, free ports, run status, PIDs.

Shared by :mod:`uirl.launch.simulation` (``uirl run``: a local simulation) and
:mod:`uirl.launch.deployment` (``uirl deploy``: a SuperLink and SuperNodes as real processes).
Flower is only ever started as a subprocess (its ``flwr``, ``flower-superlink`` and
``flower-supernode`` executables): the library never imports it. Everything started here is
stopped by its PID, together with the processes it started (found through ``/proc``) -- never by
a name pattern that could hit someone else's processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from uirl.errors import UirlError

#: The project directory: the Flower app (``pyproject.toml`` with ``[tool.flwr.app]``) when uirl is
#: installed from its source tree (``pip install -e .``).
ROOT = Path(__file__).resolve().parents[2]

FLOWER_ENV = {
    # Without this, every run `uv sync`s the project's dependencies into a new environment.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Deprecation chatter from transformers/Ray inside every simulated client; nothing to act on.
    "PYTHONWARNINGS": "ignore::FutureWarning",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def app_dir(path: str | Path | None = None) -> Path:
    """The Flower app to run: ``path``, or the project uirl was installed from. Raises
    :class:`~uirl.errors.UirlError` unless it holds a ``pyproject.toml`` with ``[tool.flwr.app]``."""
    import tomllib

    app = Path(path).resolve() if path is not None else ROOT
    try:
        project = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
        found = "app" in project["tool"]["flwr"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        found = False
    if not found:
        raise UirlError(f"{app}: not a Flower app (no pyproject.toml with [tool.flwr.app]); "
                        "pass --app with the uirl project directory")
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, *, timeout: float = 60.0, alive=lambda: True) -> None:
    """Block until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not alive():
            raise RuntimeError(f"the process that should listen on port {port} exited")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def executable(name: str) -> str:
    """``flwr``, ``flower-superlink``, ... from this interpreter's environment first."""
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else (shutil.which(name) or name)


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-"))
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    # Flower starts its own processes from this environment: put our interpreter's bin first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (Flower detaches some children into their own sessions,
    so a process group alone does not reach them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def own_processes(name: str, argument: str) -> list[int]:
    """PIDs of this user's processes whose command line has a word containing ``name`` and the exact
    word ``argument`` (e.g. the port a wrapper chose): how a wrapper finds the detached process it
    had ``flwr run`` start, without touching anyone else's."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.stat().st_uid != os.getuid():
                continue
            words = [w.decode(errors="replace") for w in (proc / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if any(name in w for w in words) and argument in words:
            pids.append(int(proc.name))
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                alive.append(pid)
        except (OSError, IndexError):
            pass
    return alive


def stop_tree(pid: int, *, grace: float = 10.0) -> None:
    """Stop process ``pid`` and every process below it: SIGTERM, then SIGKILL whatever
    is left after ``grace`` seconds (``grace=0``: SIGKILL at once, as a crash would)."""
    tree = [pid, *descendants(pid)]
    if grace > 0:
        _signal_all(tree, signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and _alive(tree):
            time.sleep(0.1)
    _signal_all(_alive(tree + descendants(pid)), signal.SIGKILL)


class Processes:
    """Long-running processes started for one deployment, each in its own session, with its
    output in a log file. ``stop_all`` (also on leaving a ``with`` block) stops every one by PID."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = Path(log_dir)
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], *, cwd: Path = ROOT) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def stop(self, name: str, *, grace: float = 10.0) -> None:
        """Stop process ``name`` and its descendants (``grace=0``: kill at once, like a crash)."""
        proc = self.procs.pop(name, None)
        if proc is not None:
            stop_tree(proc.pid, grace=grace)
            proc.wait(timeout=grace + 5)

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:  # SuperNodes before the SuperLink they talk to
            self.stop(name)

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def run_status(run_id: int, connection: str, env: dict[str, str]) -> str:
    """The SuperLink's final status of a run (``finished:completed``, ``finished:failed``, ...)."""
    out = subprocess.run([executable("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(out.stdout)["runs"]
        return str(runs[0]["status"])
    except (json.JSONDecodeError, KeyError, IndexError):
        return f"unknown ({out.stdout.strip()[:200]} {out.stderr.strip()[:200]})"


def stream_run(cmd: list[str], *, cwd: Path, env: dict[str, str], log, timeout: float | None = None
               ) -> tuple[int | None, str, int]:
    """Run ``flwr run ... --stream``; echo its output to ``log``; return (run id, output, exit code).
    After ``timeout`` seconds the command is stopped (the run's status then tells what happened)."""
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    timer = threading.Timer(timeout, stop_tree, args=(proc.pid,)) if timeout else None
    if timer is not None:
        timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            log.write(line)
            log.flush()
        proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:
            stop_tree(proc.pid)
    text = "".join(lines)
    found = re.findall(r"run(?: ID)?[ :]+(\d{3,})", text, flags=re.IGNORECASE)
    return (int(found[0]) if found else None), text, proc.returncode
