"""A real deployment on this machine: one SuperLink and one SuperNode per silo as separate
processes on 127.0.0.1, with TLS and SuperNode authentication, then the app run on them.

``python -m simulation.deploy --silos 3 --workdir deploy-run [--run-config "k=v ..."]``

1. credentials: a CA, the SuperLink's certificate and one ECDSA key pair per silo, made by
   ``deploy/generate-credentials.sh`` into ``WORKDIR/credentials`` (kept if already there);
2. ``flower-superlink`` with TLS, ``--enable-supernode-auth`` and its state in ``WORKDIR/state.db``;
3. each silo's public key registered with ``flwr supernode register``; ``--unregistered K`` also
   starts K SuperNodes whose keys were never registered (the SuperLink must refuse them);
4. one ``flower-supernode`` per silo, node config ``partition-id``, ``num-partitions`` and
   ``ledger-path`` (``WORKDIR/silo-<i>/privacy-ledger.json``), plus ``data-path`` with ``--data-root``;
5. ``flwr run . deploy --stream``, then the run's status from ``flwr ls`` (``flwr run`` exits 0
   even when the ServerApp fails);
6. every process it started is stopped by PID, also on Ctrl-C or an error.

Exit code: 0 only if the run's status is ``finished:completed``. The run directory is under
``WORKDIR/runs`` unless ``--run-config`` sets ``run-dir``; logs of every process are in ``WORKDIR/logs``.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

from simulation.flower import ConciseLog
from simulation.processes import (ROOT, Processes, executable, flower_env, free_port, run_status, stream_run,
                                  wait_for_port)

CONNECTION = "deploy"
CREDENTIALS_SCRIPT = ROOT / "deploy" / "generate-credentials.sh"


class Deployment:
    """The processes of one deployment. Use as a context manager: leaving it stops them all."""

    def __init__(self, workdir: Path, *, silos: int, data_root: Path | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.silos = silos
        self.data_root = Path(data_root).resolve() if data_root else None
        self.credentials = self.workdir / "credentials"
        self.port = free_port()
        flwr_home = self.workdir / "flwr-home"
        flwr_home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(flwr_home)
        self.procs = Processes(self.workdir / "logs", self.env)

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.procs.stop_all()

    def make_credentials(self, num_keys: int) -> None:
        subprocess.run(["bash", str(CREDENTIALS_SCRIPT), str(self.credentials), str(num_keys), "localhost,127.0.0.1"],
                       check=True, capture_output=True, text=True)
        (self.workdir / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.credentials / "ca.crt"}"\n',
            encoding="utf-8")

    def start_superlink(self) -> None:
        c = self.credentials
        proc = self.procs.start("superlink", [
            executable("flower-superlink"), "--ssl-ca-certfile", str(c / "ca.crt"),
            "--ssl-certfile", str(c / "server.pem"), "--ssl-keyfile", str(c / "server.key"),
            "--enable-supernode-auth", "--database", str(self.workdir / "state.db"),
            "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"],
            cwd=self.workdir)
        wait_for_port(self.port, alive=lambda: proc.poll() is None)

    def register(self, silo: int) -> int | None:
        """Register silo ``silo``'s public key with the SuperLink; return its node id (None if the
        key was registered before, e.g. by an earlier run in the same work directory)."""
        out = subprocess.run([executable("flwr"), "supernode", "register", str(self.credentials / f"supernode-{silo}.pub"),
                              CONNECTION, "--format", "json"], cwd=ROOT, env=self.env, capture_output=True,
                             text=True, timeout=120)
        try:
            return int(json.loads(out.stdout)["node-id"])
        except (json.JSONDecodeError, KeyError, ValueError):
            if "already" in (out.stdout + out.stderr).lower():
                return None
            raise RuntimeError(f"registering silo {silo} failed: {out.stdout[-500:]} {out.stderr[-500:]}") from None

    def ledger_path(self, silo: int) -> Path:
        return self.workdir / f"silo-{silo}" / "privacy-ledger.json"

    def node_config(self, silo: int) -> str:
        config = (f'partition-id={silo} num-partitions={self.silos} '
                  f'ledger-path="{self.ledger_path(silo)}"')
        if self.data_root is not None:
            config += f' data-path="{self.data_root / f"silo-{silo}"}"'
        return config

    def start_supernode(self, silo: int, *, key_index: int | None = None) -> subprocess.Popen:
        """Start silo ``silo``'s SuperNode, authenticating with key ``supernode-<key_index>``."""
        self.ledger_path(silo).parent.mkdir(parents=True, exist_ok=True)
        key = self.credentials / f"supernode-{silo if key_index is None else key_index}"
        name = f"supernode-{silo}" if key_index is None else f"supernode-key-{key_index}"
        return self.procs.start(name, [
            executable("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.credentials / "ca.crt"), "--auth-supernode-private-key", str(key),
            "--port", str(free_port()), "--node-config", self.node_config(silo)], cwd=self.workdir)

    def run_command(self, run_config: str | None, app: Path = ROOT) -> list[str]:
        cmd = [executable("flwr"), "run", str(app), CONNECTION, "--stream"]
        overrides = f"run-dir='{self.workdir / 'runs'}' {run_config or ''}".strip()
        return cmd + ["--run-config", overrides]

    def run_app(self, run_config: str | None, *, log=sys.stdout, app: Path = ROOT, timeout: float | None = None
                ) -> tuple[str, str]:
        """Run the app on the SuperNodes; return (final status, everything ``flwr run`` printed)."""
        run_id, text, code = stream_run(self.run_command(run_config, app), cwd=app, env=self.env, log=log,
                                        timeout=timeout)
        status = run_status(run_id, CONNECTION, self.env) if run_id else f"no run started (flwr exit {code})"
        return status, text

    def up(self, *, unregistered: int = 0) -> None:
        """Credentials, SuperLink, registered SuperNodes (and ``unregistered`` refused ones)."""
        self.make_credentials(self.silos + unregistered)
        self.start_superlink()
        for silo in range(self.silos):
            self.register(silo)
            self.start_supernode(silo)
        for extra in range(unregistered):
            self.start_supernode(extra % self.silos, key_index=self.silos + extra)


def _stop_on_sigterm(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--silos", type=int, default=3, help="number of silos / SuperNodes (default 3)")
    parser.add_argument("--workdir", type=Path, default=Path("deploy-run"), help="where everything goes")
    parser.add_argument("--run-config", default=None, help='overrides, e.g. "num-server-rounds=3 dp=false"')
    parser.add_argument("--data-root", type=Path, default=None, help="silo i's data is DATA_ROOT/silo-i")
    parser.add_argument("--unregistered", type=int, default=0, help="extra SuperNodes with unregistered keys")
    parser.add_argument("--verbose", action="store_true", help="also show Flower's INFO/DEBUG log lines")
    args = parser.parse_args(argv)
    if args.silos < 1:
        parser.error("--silos must be >= 1")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        with Deployment(args.workdir, silos=args.silos, data_root=args.data_root) as deployment:
            deployment.up(unregistered=args.unregistered)
            print(f"uirl: SuperLink on 127.0.0.1:{deployment.port} (TLS, SuperNode authentication), "
                  f"{args.silos} SuperNodes; logs in {deployment.procs.log_dir}", flush=True)
            status, _ = deployment.run_app(args.run_config, log=sys.stdout if args.verbose else ConciseLog())
    except KeyboardInterrupt:
        print("uirl: interrupted; every process started was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"uirl: deployment failed: {exc}", file=sys.stderr)
        return 1
    print(f"uirl: flower run status: {status}", flush=True)
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
