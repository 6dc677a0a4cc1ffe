"""``uirl run``: the federated job as a local Flower simulation (``flwr run . local --stream``,
made safe), with a real success check. See :mod:`uirl.launch.simulation`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from uirl.errors import UirlError

_DESCRIPTION = """Run the federated job as a local Flower simulation: N simulated silos (SuperNodes) on
this machine, the run config from pyproject.toml plus --run-config overrides. Prints one line per
round and the final table; the run directory (metrics, privacy ledger, checkpoints, final adapter,
flower.log) is under runs/. Exit status 0 only if Flower reports the run as finished:completed."""


def _run(args: argparse.Namespace) -> int:
    from uirl.launch.output import ConciseLog
    from uirl.launch.processes import app_dir
    from uirl.launch.run_config import check_run_config
    from uirl.launch.simulation import run_simulation

    if args.supernodes < 1:
        raise UirlError("--supernodes must be >= 1")
    check_run_config(app_dir(args.app), args.run_config, nodes=args.supernodes)  # before anything starts
    if args.cpus_per_client < 1:
        raise UirlError(f"--cpus-per-client must be a whole number >= 1, not {args.cpus_per_client}")
    print(f"uirl: {args.supernodes} simulated silos (SuperNodes), {args.cpus_per_client} CPU each", flush=True)

    def launch() -> int:
        result = run_simulation(supernodes=args.supernodes, run_config=args.run_config,
                                cpus_per_client=args.cpus_per_client, app=args.app,
                                log=ConciseLog(verbose=args.verbose))
        if result.run_dir is not None and (result.run_dir / "flower.log").is_file():
            print(f"uirl: full Flower log in {result.run_dir / 'flower.log'}", flush=True)
        print(f"uirl: flower run status: {result.status}", flush=True)
        return 0 if result.status == "finished:completed" else 1

    return stopping_on_signals(launch)


def stopping_on_signals(launch: Callable[[], int]) -> int:
    """``launch()``'s exit status; on SIGINT or SIGTERM, once every process it started is stopped,
    one line saying so and exit status 130 (SIGINT) or 143 (SIGTERM)."""
    from uirl.launch.processes import Interrupted, describe_stopped, interruptible

    try:
        with interruptible():
            return launch()
    except Interrupted as exc:
        print(f"uirl: interrupted by {exc.signal_name}; stopped {describe_stopped(exc.stopped)}",
              file=sys.stderr, flush=True)
        return exc.exit_status


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-config", default=None,
                        help='run-config overrides, e.g. "num-server-rounds=3 dp=false" (see README, Run configuration)')
    parser.add_argument("--verbose", action="store_true", help="also show Flower's INFO/DEBUG log lines")
    parser.add_argument("--app", type=Path, default=None,
                        help="the Flower app directory (default: the uirl project this command was installed from)")


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run the federated job as a local Flower simulation",
                         description=_DESCRIPTION)
    run.add_argument("--supernodes", type=int, default=3, help="number of simulated silos (default 3)")
    run.add_argument("--cpus-per-client", type=int, default=1,
                     help="whole CPUs Ray reserves per simulated silo (default 1)")
    add_common_arguments(run)
    run.set_defaults(func=_run)
