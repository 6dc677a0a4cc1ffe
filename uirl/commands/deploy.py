"""``uirl deploy``: SuperLink + one SuperNode per silo as processes on 127.0.0.1 (TLS, SuperNode
authentication), then the app run on them. See :mod:`uirl.launch.deployment`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from uirl.errors import UirlError

from uirl.commands.run import add_common_arguments, stopping_on_signals

_DESCRIPTION = """Deploy on this machine: make credentials, start flower-superlink (TLS, SuperNode
authentication), the fleet gateway in front of it (the only address SuperNodes are given: it forwards
Fleet calls only) and one flower-supernode per silo on 127.0.0.1, register the silos' keys, run the
app, check its status, and stop every process it started (by PID), also on Ctrl-C or an error. Each
SuperNode gets a silo worker (uirl silo-worker) that keeps its silo's model in memory between messages.
Exit status 0 only if Flower reports the run as finished:completed."""


def _deploy(args: argparse.Namespace) -> int:
    from uirl.launch.deployment import Deployment
    from uirl.launch.output import ConciseLog
    from uirl.launch.processes import app_dir
    from uirl.launch.run_config import check_run_config

    if args.silos < 1:
        raise UirlError("--silos must be >= 1")
    check_run_config(app_dir(args.app), args.run_config, local_data=False, nodes=args.silos)  # before anything starts

    def launch() -> int:
        try:
            with Deployment(args.workdir, silos=args.silos, data_root=args.data_root, app=args.app,
                            silo_workers=args.silo_workers) as deployment:
                deployment.up(unregistered=args.unregistered)
                print(f"uirl: SuperLink's Control API on 127.0.0.1:{deployment.control_port}, Fleet API (for "
                      f"SuperNodes) on 127.0.0.1:{deployment.fleet_port} (TLS, SuperNode authentication), "
                      f"{args.silos} SuperNodes{' with silo workers' if args.silo_workers else ''}; logs in "
                      f"{deployment.procs.log_dir}", flush=True)
                status, _ = deployment.run_app(args.run_config, log=ConciseLog(verbose=args.verbose))
                if deployment.run_dir is not None:
                    print(f"uirl: run directory {deployment.run_dir} (Flower's log: flower.log)", flush=True)
        except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
            print(f"uirl: deployment failed: {exc}", file=sys.stderr)
            return 1
        print(f"uirl: flower run status: {status}", flush=True)
        return 0 if status == "finished:completed" else 1

    return stopping_on_signals(launch)


def register(sub: argparse._SubParsersAction) -> None:
    deploy = sub.add_parser("deploy", help="deploy on this machine: SuperLink + one SuperNode per silo (TLS)",
                            description=_DESCRIPTION)
    deploy.add_argument("--silos", type=int, default=3, help="number of silos / SuperNodes (default 3)")
    deploy.add_argument("--workdir", type=Path, default=Path("deploy-run"),
                        help="where credentials, state, logs, ledgers and runs go (default deploy-run)")
    deploy.add_argument("--data-root", type=Path, default=None, help="silo i's data is DATA_ROOT/silo-i")
    deploy.add_argument("--unregistered", type=int, default=0,
                        help="extra SuperNodes with unregistered keys (to see them refused)")
    deploy.add_argument("--no-silo-workers", dest="silo_workers", action="store_false",
                        help="no silo worker per SuperNode: each message's ClientApp process imports torch and "
                             "rebuilds the model itself (see uirl silo-worker)")
    add_common_arguments(deploy)
    deploy.set_defaults(func=_deploy)
