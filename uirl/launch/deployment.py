"""``uirl deploy``: a real deployment on this machine: one SuperLink and one SuperNode per silo as
separate processes on 127.0.0.1, with TLS and SuperNode authentication, then the app run on them.

1. credentials: a CA, the SuperLink's certificate and one ECDSA key pair per silo, made by
   ``deploy/generate-credentials.sh`` into ``WORKDIR/credentials`` (kept if already there);
2. ``flower-superlink`` with TLS, ``--enable-supernode-auth`` and its state in ``WORKDIR/state.db``,
   listening on 127.0.0.1 only (``control_port``: Flower 1.41 serves its Control API, which has no
   authentication, on the same port as the Fleet API), and the Fleet gateway
   (:mod:`uirl.launch.fleet_gateway`, ``fleet_port``) that forwards only the SuperNodes' Fleet calls:
   the one address SuperNodes are given;
3. each silo's public key registered with ``flwr supernode register`` over the Control address;
   ``unregistered`` extra SuperNodes use keys that were never registered (the SuperLink must refuse them);
4. one ``flower-supernode`` per silo, connected to the Fleet gateway, node config ``partition-id``, ``num-partitions`` and
   ``ledger-path`` (``WORKDIR/silo-<i>/privacy-ledger.json``), plus ``data-path`` with a data root, and
   ``silo-worker``: the directory of the silo's worker (``uirl silo-worker``, :mod:`uirl.silo_worker`), started
   first, which keeps the silo's model and data in memory between the messages Flower starts a process for
   (``silo_workers=False``: none, each message's process does the work itself);
5. ``flwr run . deploy --stream``, then the run's status from ``flwr ls`` (``flwr run`` exits 0
   even when the ServerApp fails); the run directory from the file the ServerApp writes, where
   Flower's output is kept as ``flower.log``;
6. every process it started is stopped by PID (and any other process started with its environment,
   e.g. the ClientApps the SuperNodes start), also on SIGINT/SIGTERM or an error.

The run directory is under ``WORKDIR/runs`` unless the run config sets ``run-dir``; logs of every
process are in ``WORKDIR/logs``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from uirl.launch.output import read_run_info
from uirl.launch.processes import (Processes, app_dir, executable, flower_env, free_port, run_status, stream_run,
                                   wait_for_port)
from uirl.launch.simulation import keep_flower_log
from uirl.rundir import RUN_INFO_ENV

CONNECTION = "deploy"
SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2"
CREDENTIALS_SCRIPT = Path("deploy") / "generate-credentials.sh"  # relative to the app directory


class Deployment:
    """The processes of one deployment. Use as a context manager: leaving it stops them all."""

    def __init__(self, workdir: Path, *, silos: int, data_root: Path | None = None, app: Path | None = None,
                 silo_workers: bool = True) -> None:
        self.app = app_dir(app)
        self.workdir = Path(workdir).resolve()
        self.silos = silos
        self.data_root = Path(data_root).resolve() if data_root else None
        self.credentials = self.workdir / "credentials"
        # The SuperLink's own port (Control, Fleet and Runtime APIs: the operator's, never published)
        # and the Fleet gateway's (the only one SuperNodes are given).
        self.control_port = free_port()
        self.fleet_port = free_port()
        flwr_home = self.workdir / "flwr-home"
        flwr_home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(flwr_home)
        # The ServerApp (started by the SuperLink, with this environment) names its run directory here.
        self.run_info = self.workdir / "run-info.json"
        self.env[RUN_INFO_ENV] = str(self.run_info)
        # How often a SuperNode's (and the SuperLink's) SuperExec looks for a ClientApp (ServerApp) to
        # start: Flower's default of 1 s is waited out twice a round by every silo.
        self.env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS)
        self.run_dir: Path | None = None  # the directory of the last run, once the ServerApp named it
        self.procs = Processes(self.workdir / "logs", self.env)
        # The silo workers' sockets: a short private directory (a Unix socket path has at most 107 bytes).
        self.worker_root = Path(tempfile.mkdtemp(prefix="uirl-workers-")) if silo_workers else None

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.procs.__exit__(exc_type, exc, tb)  # stops every process, and says so to an Interrupted
        finally:
            if self.worker_root is not None:
                shutil.rmtree(self.worker_root, ignore_errors=True)

    def make_credentials(self, num_keys: int) -> None:
        script = self.app / CREDENTIALS_SCRIPT
        subprocess.run(["bash", str(script), str(self.credentials), str(num_keys), "localhost,127.0.0.1"],
                       check=True, capture_output=True, text=True)
        (self.workdir / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.control_port}"\nroot-certificates = "{self.credentials / "ca.crt"}"\n',
            encoding="utf-8")

    def start_superlink(self) -> None:
        """The SuperLink on 127.0.0.1:``control_port`` and the Fleet gateway on ``fleet_port``."""
        c = self.credentials
        tls = ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem"),
               "--ssl-keyfile", str(c / "server.key")]
        proc = self.procs.start("superlink", [
            executable("flower-superlink"), *tls,
            "--enable-supernode-auth", "--database", str(self.workdir / "state.db"),
            "--host", "127.0.0.1", "--port", str(self.control_port), "--disable-runtime-dependency-installation"],
            cwd=self.workdir)
        wait_for_port(self.control_port, alive=lambda: proc.poll() is None)
        if "fleet-gateway" not in self.procs.procs:  # it outlives a SuperLink restart
            gateway = self.procs.start("fleet-gateway", [
                sys.executable, "-m", "uirl.launch.fleet_gateway", "--listen", f"127.0.0.1:{self.fleet_port}",
                "--superlink", f"127.0.0.1:{self.control_port}", *tls], cwd=self.workdir)
            wait_for_port(self.fleet_port, alive=lambda: gateway.poll() is None)

    def register(self, silo: int) -> int | None:
        """Register silo ``silo``'s public key over the Control address; return its node id (None if the
        key was registered before, e.g. by an earlier run in the same work directory)."""
        out = subprocess.run([executable("flwr"), "supernode", "register", str(self.credentials / f"supernode-{silo}.pub"),
                              CONNECTION, "--format", "json"], cwd=self.app, env=self.env, capture_output=True,
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
        if self.worker_root is not None:
            config += f' silo-worker="{self.worker_dir(silo)}"'
        return config

    def worker_dir(self, silo: int) -> Path:
        return self.worker_root / f"silo-{silo}"

    def start_worker(self, silo: int, *, timeout: float = 120.0) -> None:
        """Start silo ``silo``'s worker (unless it runs) and wait until it listens."""
        name = f"silo-worker-{silo}"
        if name in self.procs.procs and self.procs.procs[name].poll() is None:
            return
        before = len(self.procs.log(name))  # the log is appended to: look only at this start's lines
        proc = self.procs.start(name, [sys.executable, "-m", "uirl.cli", "silo-worker", str(self.worker_dir(silo))],
                                cwd=self.workdir)
        deadline = time.time() + timeout
        while "listening on" not in self.procs.log(name)[before:]:
            if proc.poll() is not None:
                raise RuntimeError(f"silo {silo}'s worker exited: {self.procs.log(name)[before:][-500:]}")
            if time.time() > deadline:
                raise TimeoutError(f"silo {silo}'s worker did not listen after {timeout:g} s")
            time.sleep(0.1)

    def start_supernode(self, silo: int, *, key_index: int | None = None) -> subprocess.Popen:
        """Start silo ``silo``'s SuperNode, authenticating with key ``supernode-<key_index>``."""
        self.ledger_path(silo).parent.mkdir(parents=True, exist_ok=True)
        if self.worker_root is not None:
            self.start_worker(silo)
        key = self.credentials / f"supernode-{silo if key_index is None else key_index}"
        name = f"supernode-{silo}" if key_index is None else f"supernode-key-{key_index}"
        return self.procs.start(name, [
            executable("flower-supernode"), "--superlink", f"127.0.0.1:{self.fleet_port}",
            "--root-certificates", str(self.credentials / "ca.crt"), "--auth-supernode-private-key", str(key),
            "--port", str(free_port()), "--node-config", self.node_config(silo)], cwd=self.workdir)

    def run_command(self, run_config: str | None) -> list[str]:
        cmd = [executable("flwr"), "run", str(self.app), CONNECTION, "--stream"]
        overrides = f"run-dir='{self.workdir / 'runs'}' {run_config or ''}".strip()
        return cmd + ["--run-config", overrides]

    def run_app(self, run_config: str | None, *, log=sys.stdout, timeout: float | None = None
                ) -> tuple[str, str]:
        """Run the app on the SuperNodes; return (final status, everything ``flwr run`` printed).
        Flower's output is kept in the run directory as ``flower.log``."""
        self.run_info.unlink(missing_ok=True)
        watch = getattr(log, "watch", None)
        with watch(self.run_info, silos=self.silos) if watch else contextlib.nullcontext():
            run_id, text, code = stream_run(self.run_command(run_config), cwd=self.app, env=self.env, log=log,
                                            timeout=timeout)
        status = run_status(run_id, CONNECTION, self.env) if run_id else f"no run started (flwr exit {code})"
        self.run_dir = read_run_info(self.run_info)
        keep_flower_log(self.run_dir, text)
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
