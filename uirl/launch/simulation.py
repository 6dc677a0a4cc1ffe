"""``uirl run``: the Flower app as a local simulation, run safely, with a real success check.

Does what a careful user would do by hand with ``flwr run . local --stream``:

- uses its own Flower home (``$FLWR_HOME``, default ``.flwr-home/`` in the app directory) holding a
  ``config.toml`` with a ``local`` SuperLink connection, so nothing in ``~/.flwr`` is touched;
- turns off Flower's runtime dependency install (each run would otherwise ``uv sync`` a fresh env,
  downloading a multi-GB CUDA torch), telemetry and the update check;
- starts the local SuperLink on free ports, streams the run's logs, and then asks the SuperLink
  for the run's final status, because ``flwr run --stream`` exits 0 even when the ServerApp fails;
- learns the run directory from the file the ServerApp writes (:func:`uirl.rundir.announce`), and
  keeps Flower's full log there as ``flower.log``;
- stops the SuperLink it started (by PID, found by the port it gave it) when the run is over, and
  every other process of the run (Flower's simulation runtime, Ray's processes: found by the mark
  :func:`~uirl.launch.processes.flower_env` puts in their environment), also on SIGINT/SIGTERM
  (:class:`~uirl.launch.processes.Interrupted`) or an error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from uirl.launch.output import read_run_info, strip_ansi
from uirl.launch.processes import (Interrupted, app_dir, executable, flower_env, own_processes, run_status,
                                   stop_launch, stop_tree, stream_run)
from uirl.rundir import RUN_INFO_ENV

CONFIG_TOML = """[superlink]
default = "local"

[superlink.local]
address = ":local:"
"""


class RunResult(NamedTuple):
    status: str  # the SuperLink's final status: "finished:completed" when the run succeeded
    text: str  # everything ``flwr run`` printed
    run_dir: Path | None  # the run directory the ServerApp wrote (None if it never got that far)


def stop_superlink(env: dict[str, str]) -> dict[int, str]:
    """Stop the local SuperLink that ``flwr run`` started in the background (the one serving the
    port this wrapper chose), its children, and every other process started with ``env``; return
    the names of the processes stopped, by PID."""
    stopped: dict[int, str] = {}
    for pid in own_processes("flower-superlink", env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]):
        stopped.update(stop_tree(pid))
    stopped.update(stop_launch(env))
    return stopped


def keep_flower_log(run_dir: Path | None, text: str) -> Path | None:
    """Write Flower's output of the run, without terminal colour codes, to ``run_dir/flower.log``."""
    if run_dir is None or not run_dir.is_dir():
        return None
    path = run_dir / "flower.log"
    path.write_text(strip_ansi(text), encoding="utf-8")
    return path


def run_simulation(*, supernodes: int, run_config: str | None, cpus_per_client: int = 1,
                   app: Path | None = None, flwr_home: Path | None = None, log=sys.stdout) -> RunResult:
    """Run the app with ``supernodes`` simulated silos, each reserving ``cpus_per_client`` whole CPUs
    (Flower 1.41's simulation config takes an integer). ``log`` receives every line ``flwr run``
    prints (a :class:`~uirl.launch.output.ConciseLog` filters them and adds a status line)."""
    app = app_dir(app)
    flwr_home = Path(flwr_home or os.environ.get("FLWR_HOME") or app / ".flwr-home")
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(CONFIG_TOML, encoding="utf-8")
    env = flower_env(flwr_home)
    scratch = Path(tempfile.mkdtemp(prefix="uirl-run-"))
    run_info = scratch / "run-info.json"
    env[RUN_INFO_ENV] = str(run_info)
    cmd = [executable("flwr"), "run", str(app), "local", "--stream", "--federation-config",
           f"num-supernodes={supernodes} client-resources-num-cpus={cpus_per_client} "
           "client-resources-num-gpus=0.0"]
    if run_config:
        cmd += ["--run-config", run_config]
    watch = getattr(log, "watch", None)
    try:
        with watch(run_info, silos=supernodes) if watch else contextlib.nullcontext():
            run_id, text, code = stream_run(cmd, cwd=app, env=env, log=log)
        status = run_status(run_id, "local", env) if run_id else f"no run started (flwr exit {code})"
        run_dir = read_run_info(run_info)
        keep_flower_log(run_dir, text)
        return RunResult(status, text, run_dir)
    except Interrupted as exc:
        exc.stopped.update(stop_superlink(env))
        raise
    finally:
        stop_superlink(env)  # nothing left to stop after an interruption
        shutil.rmtree(scratch, ignore_errors=True)
