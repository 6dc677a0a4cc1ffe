"""An outsider cannot let itself into a deployment: it holds the CA certificate, a key pair of its
own and the published (Fleet) address, as anyone who ever saw a silo's set-up would. Real
``flower-superlink``, Fleet gateway, ``flower-supernode`` and ``flwr`` CLI processes on 127.0.0.1."""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from uirl.launch.deployment import CONNECTION, Deployment
from uirl.launch.fleet_gateway import allowed
from uirl.launch.processes import executable, free_port


def test_the_gateway_lets_only_exact_fleet_posts_through():
    assert allowed("POST", b"/v1/fleet/pull-messages", b"")
    assert not allowed("GET", b"/v1/fleet/pull-messages", b"")
    assert not allowed("POST", b"/v1/fleet/pull-messages", b"x=1")
    for path in (b"/v1/control/register-node", b"/v1/fleet/../control/register-node",
                 b"/v1/fleet/%2e%2e/control/register-node", b"/v1/fleet/pull-messages/", b"/v1/runtime/pull-messages",
                 b"//v1/fleet/pull-messages", b"https://x/v1/fleet/pull-messages"):
        assert not allowed("POST", path, b""), path


def _flwr_home(root: Path, address: str, ca: Path) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f'address = "{address}"\nroot-certificates = "{ca}"\n', encoding="utf-8")
    return {"FLWR_HOME": str(root)}


def _flwr(env: dict[str, str], *args: str) -> dict:
    out = subprocess.run([executable("flwr"), *args, CONNECTION, "--format", "json"], env=env, capture_output=True,
                         text=True, timeout=120)
    return json.loads(out.stdout)  # `flwr` exits 0 also when it fails: "success" says


def _nodes(env: dict[str, str]) -> dict[str, str]:
    listing = _flwr(env, "supernode", "ls")
    assert listing["success"], listing
    return {str(n["node-id"]): n["status"] for n in listing["nodes"]}


def _raw_exchange(port: int, ca: Path, requests: list[bytes]) -> bytes:
    """Send HTTP/1.1 requests as written (no client normalises the path) on one TLS connection; the
    last one must say ``Connection: close``."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"".join(requests))
        received = b""
        while chunk := tls.recv(65536):  # until the server closes (the last request asks it to)
            received += chunk
    return received


def _post(path: str, *, close: bool = False) -> bytes:
    headers = ["Host: 127.0.0.1", "Content-Type: application/protobuf", "Content-Length: 0"]
    headers += ["Connection: close"] if close else []
    return ("\r\n".join([f"POST {path} HTTP/1.1", *headers]) + "\r\n\r\n").encode()


def test_an_outsider_cannot_register_its_key_or_connect_through_the_fleet_address(tmp_path):
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is needed")
    with Deployment(tmp_path / "deploy", silos=1) as dep:
        dep.make_credentials(1)
        dep.start_superlink()
        silo_node = str(dep.register(0))
        dep.start_supernode(0)
        operator = dep.env  # the coordinator's CLI: the Control address, 127.0.0.1 only

        outsider = tmp_path / "outsider"
        outsider.mkdir()
        ca = outsider / "ca.crt"
        shutil.copy(dep.credentials / "ca.crt", ca)
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(outsider / "key")],
                       check=True)
        fleet = f"127.0.0.1:{dep.fleet_port}"
        env = dict(dep.env, **_flwr_home(outsider / "flwr-home", fleet, ca))

        # 1. Registering its key at the published address: the Control API is not served there.
        refused = _flwr(env, "supernode", "register", str(outsider / "key.pub"))
        assert not refused["success"] and "404" in refused["error-message"], refused

        # 2. Connecting a SuperNode with that key: the SuperLink refuses to activate it.
        node = subprocess.Popen([executable("flower-supernode"), "--superlink", fleet, "--root-certificates", str(ca),
                                 "--auth-supernode-private-key", str(outsider / "key"), "--port", str(free_port())],
                                env=env, stdout=open(outsider / "supernode.log", "w"), stderr=subprocess.STDOUT)
        assert node.wait(timeout=90) != 0
        assert "[code: 2004] Failed to activate SuperNode" in (outsider / "supernode.log").read_text()

        # 3. Control, Runtime and path tricks on the Fleet address, also pipelined after a Fleet call on a
        #    kept-alive connection, are answered by the gateway and never reach the SuperLink.
        replies = _raw_exchange(dep.fleet_port, ca, [
            _post("/v1/fleet/get-run"), _post("/v1/control/list-nodes"), _post("/v1/fleet/../control/list-nodes"),
            _post("/v1/fleet/%2e%2e/control/register-node"), _post("/v1/runtime/pull-messages", close=True)])
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", replies)
        assert statuses[0] != b"404" and statuses[1:] == [b"404"] * 4, replies[-2000:]
        assert replies.count(b"this address serves the Fleet API only") == 4

        # 4. The operator sees the silo's node online through the gateway, and nothing of the outsider's.
        deadline = time.time() + 60
        while (nodes := _nodes(operator)).get(silo_node) != "online":
            assert time.time() < deadline, nodes
            time.sleep(2)
        assert set(nodes) == {silo_node}

        # The same command at the Control address works: it is that address, and nothing else, that
        # keeps the outsider out (whoever reaches it can register keys: see README "What remains trusted").
        inside = dict(dep.env, **_flwr_home(outsider / "flwr-home-inside", f"127.0.0.1:{dep.control_port}", ca))
        accepted = _flwr(inside, "supernode", "register", str(outsider / "key.pub"))
        assert accepted["success"], accepted
        assert set(_nodes(operator)) == {silo_node, str(accepted["node-id"])}
