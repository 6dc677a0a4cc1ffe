"""Starting and stopping Flower's processes safely: environment, free ports, run status, PIDs.

Shared by :mod:`uirl.launch.simulation` (``uirl run``: a local simulation) and
:mod:`uirl.launch.deployment` (``uirl deploy``: a SuperLink and SuperNodes as real processes).
Flower is only ever started as a subprocess (its ``flwr``, ``flower-superlink`` and
``flower-supernode`` executables): the library never imports it. Everything started here is
stopped by its PID, together with the processes it started (found through ``/proc``) -- never by
a name pattern that could hit someone else's processes.

Not every process of a launch stays a descendant of the wrapper: ``flwr run`` starts the local
SuperLink in a session of its own, and the SuperLink outlives ``flwr run`` (re-parented to init
once ``flwr run`` ends or is stopped); Flower's simulation runtime and Ray's processes (GCS server,
raylet, dashboard, workers) hang below the SuperLink, in yet another session. Every one of them
inherits the environment, so :func:`flower_env` marks the launch there (``UIRL_LAUNCH_ID``, unique per launch)
and :func:`stop_launch` stops every process of this user that carries the mark.
:func:`interruptible` turns SIGINT and SIGTERM into :class:`Interrupted`, so that the launchers'
clean-up runs on a signal as on any error.
"""

from __future__ import annotations

import contextlib
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
import uuid
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
    # Ray folds similar lines of different actors into "[repeated Nx across cluster]": the silos'
    # progress lines (one per silo, same shape) would be folded away.
    "RAY_DEDUP_LOGS": "0",
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


#: The environment variable that marks every process of one launch (see the module's docstring).
LAUNCH_ENV = "UIRL_LAUNCH_ID"


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env[LAUNCH_ENV] = uuid.uuid4().hex
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


def process_name(pid: int) -> str:
    """What a user would call process ``pid``: the program it runs (``flower-superlink``, ``raylet``,
    ``ray::ClientAppActor``), or the module or script a Python interpreter runs."""
    try:
        words = [w.decode(errors="replace") for w in (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0") if w]
    except OSError:
        return "?"
    if not words:
        return "?"
    words = words[0].split() + words[1:]  # a process that set its title writes it as one word
    name = os.path.basename(words[0])
    if name.startswith("python"):
        name = next((os.path.basename(w) for w in words[1:] if not w.startswith("-")), name)
    return name


def _kill(pids: list[int], *, grace: float) -> dict[int, str]:
    """SIGTERM ``pids``, SIGKILL whatever is left after ``grace`` seconds (``grace=0``: at once);
    return the living ones' names."""
    names = {pid: process_name(pid) for pid in _alive(pids)}
    if grace > 0:
        _signal_all(list(names), signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and _alive(list(names)):
            time.sleep(0.1)
    _signal_all(_alive(list(names)), signal.SIGKILL)
    return names


def stop_tree(pid: int, *, grace: float = 10.0) -> dict[int, str]:
    """Stop process ``pid`` and every process below it: SIGTERM, then SIGKILL whatever
    is left after ``grace`` seconds (``grace=0``: SIGKILL at once, as a crash would).
    Returns the names of the processes it stopped, by PID."""
    stopped = _kill([pid, *descendants(pid)], grace=grace)
    stopped.update(_kill(descendants(pid), grace=0))  # any started meanwhile
    return stopped


def launch_processes(launch_id: str) -> list[int]:
    """PIDs of this user's processes whose environment marks them as started by launch ``launch_id``
    (``UIRL_LAUNCH_ID``; see the module's docstring), never the calling process."""
    mark = f"{LAUNCH_ENV}={launch_id}".encode()
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.stat().st_uid != os.getuid() or int(proc.name) == os.getpid():
                continue
            if mark in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def stop_launch(env: dict[str, str], *, grace: float = 10.0) -> dict[int, str]:
    """Stop every process started with ``env`` (a :func:`flower_env`), wherever it sits in the
    process tree: the SuperLink, Flower's simulation runtime, Ray's processes. Returns the names of
    the processes it stopped, by PID."""
    stopped: dict[int, str] = {}
    for _ in range(5):  # a dying process may still start another (Ray restarts its workers)
        pids = _alive(launch_processes(env[LAUNCH_ENV]))
        if not pids:
            break
        stopped.update(_kill(pids, grace=grace))
    return stopped


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached a launcher. ``stopped`` collects the names of the processes the
    clean-up stopped, by PID, as the exception passes through it; the command exits ``128 + signum``
    (130 for SIGINT, 143 for SIGTERM), as a shell reports a process killed by the signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.stopped: dict[int, str] = {}
        super().__init__(self.signal_name)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def interruptible():
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, so every
    ``finally``/``with`` clean-up runs. Further signals are ignored while the clean-up runs."""
    def interrupt(signum, _frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def describe_stopped(stopped: dict[int, str]) -> str:
    """``"5 processes: flower-superlink, flwr, raylet, 2 x ray::ClientAppActor"``."""
    if not stopped:
        return "no process was running yet"
    counts: dict[str, int] = {}
    for name in stopped.values():
        counts[name] = counts.get(name, 0) + 1
    names = ", ".join(name if n == 1 else f"{n} x {name}" for name, n in sorted(counts.items()))
    return f"{len(stopped)} process{'es' if len(stopped) > 1 else ''}: {names}"


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

    def stop(self, name: str, *, grace: float = 10.0) -> dict[int, str]:
        """Stop process ``name`` and its descendants (``grace=0``: kill at once, like a crash);
        return the names of the processes stopped, by PID."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return {}
        stopped = stop_tree(proc.pid, grace=grace)
        proc.wait(timeout=grace + 5)
        return stopped

    def stop_all(self) -> dict[int, str]:
        """Stop every process, then any other process started with this environment (see
        :func:`stop_launch`); return the names of the processes stopped, by PID."""
        stopped: dict[int, str] = {}
        for name in list(self.procs)[::-1]:  # SuperNodes before the SuperLink they talk to
            stopped.update(self.stop(name))
        if LAUNCH_ENV in self.env:
            stopped.update(stop_launch(self.env))
        return stopped

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        stopped = self.stop_all()
        if isinstance(exc, Interrupted):
            exc.stopped.update(stopped)


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
    except Interrupted as exc:
        exc.stopped.update(stop_tree(proc.pid))
        raise
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:
            stop_tree(proc.pid)
    text = "".join(lines)
    found = re.findall(r"run(?: ID)?[ :]+(\d{3,})", text, flags=re.IGNORECASE)
    return (int(found[0]) if found else None), text, proc.returncode
