"""The silo worker (uirl/silo_worker.py): a ClientApp whose node config names one hands it the
silo's work and replies exactly as one that works in process; the ClientApp then starts without
torch; the worker refuses callers without its key, other versions and unsafe directories; failures
inside it reach the server as the same class names as in-process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client.app import app as client_app
from helpers import tiny_config
from test_popularity_release import _LocalGrid, _context, flower_task  # noqa: F401 (a fixture)
from uirl.launch.processes import ROOT
from uirl.silo_worker import AUTHKEY, PROTOCOL, SOCKET, SiloWorkerError, prepare_directory, run_call

LOCAL_PRIOR = {"popularity-prior": True, "local-prior": True, "prior-weight": 5.0}


def _start_worker(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "uirl.cli", "silo-worker", str(directory)], cwd=ROOT,
                            stdout=open(directory.parent / f"{directory.name}.log", "ab"), stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while not _listening(directory):
        assert proc.poll() is None, (directory.parent / f"{directory.name}.log").read_text()
        assert time.time() < deadline, "the silo worker did not start"
        time.sleep(0.05)
    return proc


def _listening(directory: Path) -> bool:
    return "listening on" in _log(directory)


def _log(directory: Path) -> str:
    path = directory.parent / f"{directory.name}.log"
    return path.read_text() if path.exists() else ""


def _logged(directory: Path, text: str, count: int = 1, timeout: float = 30.0) -> bool:
    """Whether the worker's log shows ``text`` ``count`` times within ``timeout`` seconds (it logs an
    answer after sending it, so a caller can be back before the line is written)."""
    deadline = time.time() + timeout
    while _log(directory).count(text) < count and time.time() < deadline:
        time.sleep(0.05)
    return _log(directory).count(text) == count


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture
def worker_home():
    """A short directory (Unix socket paths are limited to 107 bytes) holding worker directories."""
    home = Path(tempfile.mkdtemp(prefix="uirl-w-"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def worker(worker_home):
    directory = worker_home / "silo"
    proc = _start_worker(directory)
    yield directory
    _stop(proc)


def _arrays(reply: Message) -> dict:
    return {n: a.numpy() for n, a in reply.content["arrays"].items()} if "arrays" in reply.content else {}


def _rounds(cfg, grid: _LocalGrid, tmp_path: Path, name: str):
    """The server's side of a run, in process: the popularity release, then a train and an evaluate
    round, as the ServerApp builds their messages. Returns (prior, train replies, evaluate replies)."""
    from server.app import _Recorder, build_strategy
    from server.popularity import release_prior
    from uirl.federated import ReleasedSum
    from uirl.model.build import build_model
    from uirl.rundir import RunDirectory

    run = RunDirectory.create(tmp_path / name, "r", {})
    prior = release_prior(grid, cfg, run, on_release=lambda rows: None, timeout=60.0)
    model, _ = build_model(cfg)
    strategy = build_strategy(cfg, set(model.trainable_state()), _Recorder(run), prior, set(),
                              ReleasedSum(*run.load_release()))
    arrays = ArrayRecord({n: Array(v.detach().cpu().numpy().copy()) for n, v in model.adapter_state().items()})
    trained = grid.send_and_receive(list(strategy.configure_train(1, arrays, ConfigRecord(), grid)))
    evaluated = grid.send_and_receive(list(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid)))
    return prior, trained, evaluated


def test_a_client_app_with_a_silo_worker_replies_as_one_that_works_in_process(tiny_bert, flower_task, worker,
                                                                              tmp_path, capfd):
    """Release, train and evaluate (with the local prior, so the evaluate message carries the released
    sum) through the worker give the in-process replies; the worker's progress reaches this process's
    output, and its log shows it did the work."""
    cfg = tiny_config(tiny_bert, dp=False, **LOCAL_PRIOR)
    here = _LocalGrid([_context(cfg, 11, 0), _context(cfg, 12, 1)])
    there = _LocalGrid([_context(cfg, 11, 0, **{"silo-worker": str(worker)}),
                        _context(cfg, 12, 1, **{"silo-worker": str(worker)})])
    prior_here, trained_here, evaluated_here = _rounds(cfg, here, tmp_path, "here")
    capfd.readouterr()
    prior_there, trained_there, evaluated_there = _rounds(cfg, there, tmp_path, "there")
    said = capfd.readouterr().out
    np.testing.assert_array_equal(prior_here, prior_there)
    assert len(trained_here) == len(trained_there) == 2
    for a, b in zip(sorted(trained_here, key=lambda m: m.metadata.src_node_id),
                    sorted(trained_there, key=lambda m: m.metadata.src_node_id)):
        assert not a.has_error() and not b.has_error()
        assert dict(a.content["metrics"]) == pytest.approx(dict(b.content["metrics"]), rel=1e-9)
        left, right = _arrays(a), _arrays(b)
        assert left and set(left) == set(right)
        for name in left:
            np.testing.assert_allclose(left[name], right[name], rtol=1e-6, atol=1e-9)
    for a, b in zip(sorted(evaluated_here, key=lambda m: m.metadata.src_node_id),
                    sorted(evaluated_there, key=lambda m: m.metadata.src_node_id)):
        assert dict(a.content["metrics"]) == pytest.approx(dict(b.content["metrics"]), abs=1e-9)
    assert "silo 0 round 1: trained" in said and "silo 1 round 1: trained" in said
    assert _logged(worker, "release answered", 2) and _logged(worker, "train answered", 2)
    assert _logged(worker, "evaluate answered", 2)


def test_under_dp_the_worker_writes_the_silos_ledger_and_spends_as_in_process(tiny_bert, flower_task, worker,
                                                                              tmp_path):
    from uirl.privacy import PrivacyLedger

    cfg = tiny_config(tiny_bert, **{"target-epsilon": 4.0, "num-server-rounds": 2})
    ledgers = {where: tmp_path / where / "ledger.json" for where in ("here", "there")}
    contexts = {"here": _context(cfg, 11, 0, **{"ledger-path": str(ledgers["here"])}),
                "there": _context(cfg, 11, 0, **{"ledger-path": str(ledgers["there"]), "silo-worker": str(worker)})}
    from uirl.model.build import build_model

    model, _ = build_model(cfg)
    sent = ArrayRecord({n: Array(v.detach().cpu().numpy().copy()) for n, v in model.trainable_state().items()})
    metrics = {}
    for where, context in contexts.items():
        for server_round in (1, 2):
            msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": server_round,
                                                                              "run-name": "r"})}),
                          dst_node_id=11, message_type="train")
            reply = client_app(msg, context)
            assert not reply.has_error() and reply.content["metrics"]["status"] == 0
        metrics[where] = dict(reply.content["metrics"])
    assert metrics["there"]["epsilon"] == pytest.approx(metrics["here"]["epsilon"], rel=1e-12)
    assert 0 < metrics["there"]["epsilon"] <= 4.0
    on_disk = json.loads(ledgers["there"].read_text())["ledger"]
    assert on_disk["rounds"] == 2  # written by the worker, before each reply left
    state = PrivacyLedger.from_json(str(contexts["there"].state.config_records["uirl-privacy"]["ledger"]))
    assert state.epsilon() == pytest.approx(metrics["here"]["epsilon"], rel=1e-12)


def test_failures_in_the_worker_reach_the_server_as_they_would_in_process(tiny_bert, flower_task, worker):
    cfg = tiny_config(tiny_bert, **{"eval-min-users": 10_000})
    context = _context(cfg, 11, 0, **{"silo-worker": str(worker)})
    # A message without the trainable arrays: the same refusal as in process (tests/test_compression.py).
    bare = Message(RecordDict({"arrays": ArrayRecord({}), "config": ConfigRecord({"server-round": 1})}),
                   dst_node_id=11, message_type="train")
    refused = client_app(bare, context)
    assert refused.has_error() and refused.error.reason == "UirlError (details in the silo's log)"
    assert "train failed" in _log(worker) and "lacks" in _log(worker)  # the traceback stays in the worker's log
    # Too few users to report: the reason, and no numbers, exactly as in process.
    from uirl.model.build import build_model

    model, _ = build_model(cfg)
    arrays = ArrayRecord({n: Array(v.detach().cpu().numpy().copy()) for n, v in model.trainable_state().items()})
    withheld = client_app(Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                                  dst_node_id=11, message_type="evaluate"), context)
    assert not withheld.has_error() and "metrics" not in withheld.content
    assert "fewer than eval-min-users" in withheld.content["error"]["message"]


def test_the_worker_refuses_callers_without_its_key_other_versions_and_unsafe_directories(worker, worker_home):
    # No worker in a directory: a clear error naming the command that starts one.
    with pytest.raises(SiloWorkerError, match="uirl silo-worker"):
        run_call(worker_home / "nobody", "catalogue-size")
    # A caller with the wrong key is refused before anything it sends is read.
    with pytest.raises(Exception):
        Client(str(worker / SOCKET), family="AF_UNIX", authkey=b"not the key")
    assert _logged(worker, "did not prove the key")
    # Another protocol or version: refused with the reason.
    with Client(str(worker / SOCKET), family="AF_UNIX", authkey=(worker / AUTHKEY).read_bytes()) as conn:
        conn.send((PROTOCOL, "0.0.0-other", "catalogue-size", (), {}))
        kind, why = conn.recv()
    assert kind == "refused" and "0.0.0-other" in why
    assert oct((worker / AUTHKEY).stat().st_mode & 0o777) == oct(0o600)
    assert oct(worker.stat().st_mode & 0o777) == oct(0o700)
    # A directory others may enter is refused.
    shared = worker_home / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with pytest.raises(SiloWorkerError, match="chmod 700"):
        prepare_directory(shared)
    a_file = worker_home / "a-file"
    a_file.write_text("")
    with pytest.raises(SiloWorkerError, match="cannot create it"):
        prepare_directory(a_file)


def test_a_worker_that_crashes_mid_call_is_reported_and_a_restarted_one_takes_over(tiny_bert, worker_home):
    from uirl.config import SiloConfig

    cfg = tiny_config(tiny_bert)
    silo = SiloConfig(partition_id=0, num_partitions=2)
    directory = worker_home / "silo"
    first = _start_worker(directory)
    # The worker dies mid-call (its first call loads the silo's data and model: seconds).
    outcome: list = []
    caller = threading.Thread(target=lambda: outcome.append(_outcome(directory, cfg, silo)))
    caller.start()
    time.sleep(0.5)
    first.kill()  # SIGKILL: the socket file stays behind
    first.wait()
    caller.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], SiloWorkerError), outcome
    assert "closed the connection during the 'catalogue-size' call" in str(outcome[0])
    expected = run_call(None, "catalogue-size", cfg, silo)
    assert (directory / SOCKET).exists()
    with pytest.raises(SiloWorkerError, match="not running"):
        run_call(directory, "catalogue-size", cfg, silo)
    (directory.parent / "silo.log").write_text("")
    second = _start_worker(directory)
    try:
        assert run_call(directory, "catalogue-size", cfg, silo) == expected
        # A second worker on the same directory is refused while the first listens.
        dup = subprocess.run([sys.executable, "-m", "uirl.cli", "silo-worker", str(directory)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert dup.returncode == 2 and "already listens" in dup.stderr
    finally:
        _stop(second)
    assert not (directory / SOCKET).exists()  # a clean stop removes its socket


def _outcome(directory: Path, cfg, silo):
    try:
        return run_call(directory, "catalogue-size", cfg, silo)
    except SiloWorkerError as exc:
        return exc


def test_the_client_app_imports_no_torch():
    """What makes the worker pay: a ClientApp process (one per message) that hands its work to a
    worker never loads torch, transformers, peft or opacus."""
    out = subprocess.run([sys.executable, "-c", "import sys, client.app; print(sorted(m for m in ('torch', "
                          "'transformers', 'peft', 'opacus') if m in sys.modules))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
