"""Run ``flwr run .`` as a local simulation safely and report whether the run really succeeded.

``python -m simulation.flower [--supernodes N] [--run-config "k=v ..."]`` does what a careful user
would do by hand:

- uses its own Flower home (``$FLWR_HOME``, default ``.flwr-home/`` in the project) holding a
  ``config.toml`` with a ``local`` SuperLink connection, so nothing in ``~/.flwr`` is touched;
- turns off Flower's runtime dependency install (each run would otherwise ``uv sync`` a fresh env,
  downloading a multi-GB CUDA torch), telemetry and the update check;
- starts the local SuperLink on free ports, streams the run's logs, and then asks the SuperLink
  for the run's final status, because ``flwr run --stream`` exits 0 even when the ServerApp fails;
- stops the SuperLink it started (by PID) when the run is over.

Exit code: 0 only if the run's status is ``finished:completed``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from simulation.processes import ROOT, executable, flower_env, run_status, stop_tree, stream_run

#: Flower's per-round INFO/DEBUG log lines (printed twice: console and file format). The concise
#: view hides them; ``--verbose`` shows everything, and the full log is always kept (see main).
_CHATTER = re.compile(r"^(\x1b\[\d+m)?(INFO|DEBUG)\b|^\d\d/\d\d/\d{4} [\d:]+:(INFO|DEBUG):")


class ConciseLog:
    """Writes the lines a user wants to see (uirl's round lines and table, Flower's warnings and
    errors, tracebacks) to ``out``; drops Flower's INFO/DEBUG chatter."""

    def __init__(self, out=sys.stdout) -> None:
        self.out = out

    def write(self, line: str) -> None:
        if not _CHATTER.match(line):
            self.out.write(line)

    def flush(self) -> None:
        self.out.flush()


CONFIG_TOML = """[superlink]
default = "local"

[superlink.local]
address = ":local:"
"""


def _superlink_pids(port: str) -> list[int]:
    """PIDs of flower-superlink processes serving ``port`` (the one this script started)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [c.decode(errors="replace") for c in cmd]
        if any("flower-superlink" in w for w in words) and port in words:
            pids.append(int(proc.name))
    return pids


def stop_superlink(env: dict[str, str]) -> None:
    """Stop the local SuperLink that ``flwr run`` started in the background, and its children."""
    for pid in _superlink_pids(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]):
        stop_tree(pid)


def run(*, supernodes: int, run_config: str | None, cpus_per_client: float, app: Path = ROOT,
        flwr_home: Path | None = None, log=sys.stdout) -> tuple[str, str]:
    """Run the app; return (final status, everything the run printed)."""
    flwr_home = Path(flwr_home or os.environ.get("FLWR_HOME") or ROOT / ".flwr-home")
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(CONFIG_TOML, encoding="utf-8")
    env = flower_env(flwr_home)
    cmd = [executable("flwr"), "run", str(app), "local", "--stream", "--federation-config",
           f"num-supernodes={supernodes} client-resources-num-cpus={cpus_per_client:g} "
           "client-resources-num-gpus=0.0"]
    if run_config:
        cmd += ["--run-config", run_config]
    try:
        run_id, text, code = stream_run(cmd, cwd=app, env=env, log=log)
        status = run_status(run_id, "local", env) if run_id else f"no run started (flwr exit {code})"
        return status, text
    finally:
        stop_superlink(env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation.flower", description=__doc__.split("\n\n")[0])
    parser.add_argument("--supernodes", type=int, default=3, help="number of simulated silos (default 3)")
    parser.add_argument("--run-config", default=None, help='overrides, e.g. "num-server-rounds=3 dp=false"')
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--verbose", action="store_true", help="also show Flower's INFO/DEBUG log lines")
    args = parser.parse_args(argv)
    status, text = run(supernodes=args.supernodes, run_config=args.run_config, cpus_per_client=args.cpus_per_client,
                       log=sys.stdout if args.verbose else ConciseLog())
    run_dir = re.findall(r"^uirl: run directory (.+)$", text, flags=re.MULTILINE)
    if run_dir and (ROOT / run_dir[0]).is_dir():
        (ROOT / run_dir[0] / "flower.log").write_text(text, encoding="utf-8")
        print(f"uirl: full Flower log in {run_dir[0]}/flower.log", flush=True)
    print(f"uirl: flower run status: {status}", flush=True)
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
