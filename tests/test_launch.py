"""The launchers' pieces that need no Flower process: what the console shows, the status line's
phase from the run directory's files, the run-info file, finding only our own processes, the
server's bounded wait for its silos; and one real ``uirl run`` stopped by SIGTERM."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from uirl.errors import UirlError
from uirl.launch.output import ConciseLog, phase, read_run_info, strip_ansi
from uirl.launch.processes import app_dir, own_processes, stop_tree
from uirl.rundir import RUN_INFO_ENV, RunDirectory, announce


def test_the_concise_log_keeps_what_a_user_reads():
    out = io.StringIO()
    log = ConciseLog(out)
    for line in ["\x1b[92mINFO \x1b[0m:      Starting round 1\n",
                 "11/30/2026 10:00:01:INFO:flwr:chatter\n",
                 "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n",
                 "\x1b[93mWARNING \x1b[0m:   a real warning\n",
                 "uirl: run directory runs/x\n",
                 "round=1  loss=1.2\n"]:
        log.write(line)
    assert out.getvalue() == "WARNING :   a real warning\nuirl: run directory runs/x\nround=1  loss=1.2\n"
    verbose = io.StringIO()
    ConciseLog(verbose, verbose=True).write("\x1b[92mINFO \x1b[0m: x\n")
    assert verbose.getvalue() == "INFO : x\n"  # not a terminal: no colour codes
    assert strip_ansi("\x1b[1;31merror\x1b[0m") == "error"


def test_the_status_line_follows_the_run_directory(tmp_path, monkeypatch):
    assert phase(None, silos=3).startswith("starting")
    run = RunDirectory.create(tmp_path, "r", {"run-config": {"num-server-rounds": 2}})
    assert phase(run.path, silos=3) == "round 0: 3 silos evaluate the pretrained encoder"
    run.record_round({"round": 0})
    assert phase(run.path, silos=3) == "round 1 of 2: 3 silos train locally"
    run.record_privacy(1, "0", {"epsilon": 1.0})
    assert phase(run.path, silos=3) == "round 1 of 2: silos evaluate the new global model"
    run.record_round({"round": 1})
    run.record_round({"round": 2})
    assert phase(run.path, silos=3) == "writing the final adapter"

    info = tmp_path / "info" / "run-info.json"
    announce(run.path)  # no $UIRL_RUN_INFO: nothing written
    assert read_run_info(info) is None
    monkeypatch.setenv(RUN_INFO_ENV, str(info))
    announce(run.path, run_id=7)
    assert read_run_info(info) == run.path.resolve() and json.loads(info.read_text())["run-id"] == 7


def test_own_processes_finds_ours_by_argument_and_stop_tree_stops_them():
    marker = f"uirl-test-marker-{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        deadline = time.time() + 10  # the child's command line is its own only once it has exec'd
        while own_processes("python", marker) != [proc.pid] and time.time() < deadline:
            time.sleep(0.05)
        assert own_processes("python", marker) == [proc.pid]
        assert own_processes("python", marker + "-other") == []
    finally:
        stop_tree(proc.pid, grace=2)
    assert proc.wait(timeout=10) != 0


def test_the_app_directory_must_be_a_flower_app(tmp_path):
    assert (app_dir() / "pyproject.toml").is_file()
    with pytest.raises(UirlError, match="--app"):
        app_dir(tmp_path)


@pytest.mark.parametrize("run_config, named", [
    ("lr=-1", "field 'lr' = -1"),
    ("no-such-key=3", "unknown run-config key"),
    ("num-server-rounds=3 dp", "value 'dp': --run-config: expected space-separated key=value pairs"),
    ("seed=abc", "field 'seed' = 'abc': --run-config: expected a number"),
    ("dataset='data/ml'", "field 'dataset' = 'data/ml': expected an absolute path"),
    ("dataset='/nowhere/at/all'", "expected a directory written by `uirl data convert`"),
])
def test_a_bad_run_config_is_one_line_before_anything_starts(run_config, named, monkeypatch, capsys):
    """``uirl run`` / ``uirl deploy`` check the run config against the app's defaults first: exit
    status 2, one line naming the key, and no Flower process is started."""
    import uirl.launch.deployment as deployment
    import uirl.launch.simulation as simulation
    from uirl.cli import main

    def started(*args, **kwargs):
        raise AssertionError("a process was started for a bad run config")

    monkeypatch.setattr(simulation, "run_simulation", started)
    monkeypatch.setattr(deployment, "Deployment", started)
    assert main(["run", "--run-config", run_config]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1, err
    if "dataset" not in run_config:  # a deployment's dataset lives on the silos' machines
        assert main(["deploy", "--run-config", run_config]) == 2
        assert named in capsys.readouterr().err


def test_overrides_parse_as_flower_parses_them():
    from uirl.launch.run_config import parse_overrides

    assert parse_overrides("lr=0.01 dp=false run-name='a b' seed=3") == {
        "lr": 0.01, "dp": False, "run-name": "a b", "seed": 3}
    assert parse_overrides(None) == {} and parse_overrides("  ") == {}


def test_min_nodes_above_the_silos_started_is_refused_before_anything_starts(monkeypatch, capsys):
    import uirl.launch.deployment as deployment
    import uirl.launch.simulation as simulation
    from uirl.cli import main

    def started(*args, **kwargs):
        raise AssertionError("a process was started for a run that could never get its silos")

    monkeypatch.setattr(simulation, "run_simulation", started)
    monkeypatch.setattr(deployment, "Deployment", started)
    assert main(["run", "--supernodes", "2", "--run-config", "min-nodes=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "field 'min-nodes' = 3: expected at most the 2 silos" in err and len(err.splitlines()) == 1, err
    assert main(["deploy", "--silos", "2", "--run-config", "min-nodes=3"]) == 2
    assert "'min-nodes' = 3" in capsys.readouterr().err


def test_the_server_says_what_it_waits_for_and_fails_the_run_after_the_timeout():
    from server.nodes import wait_for_nodes
    from uirl.errors import RunFailed

    class Grid:  # two silos connect, the third never does
        def get_node_ids(self):
            return [11, 12]

    said: list[str] = []
    start = time.monotonic()
    with pytest.raises(RunFailed, match="only 2 of the 3 silos .* node-wait-timeout = 0.3 s"):
        wait_for_nodes(Grid(), 3, timeout=0.3, report_every=0.1, poll=0.02, say=said.append)
    assert time.monotonic() - start < 2
    assert len(said) >= 2 and said[0].startswith("uirl: waiting for 3 silos, 2 connected"), said
    assert wait_for_nodes(Grid(), 2, timeout=0.1, say=said.append) == [11, 12]


def test_interrupted_launch_reports_its_signal_and_exit_status():
    from uirl.commands.run import stopping_on_signals
    from uirl.launch.processes import Interrupted, describe_stopped

    def launch() -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    assert stopping_on_signals(launch) == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    assert Interrupted(signal.SIGINT).exit_status == 130
    assert describe_stopped({1: "raylet", 2: "ray::IDLE", 3: "ray::IDLE"}) == "3 processes: 2 x ray::IDLE, raylet"


def _marks(pid: int) -> str | None:
    """The launch mark (``UIRL_LAUNCH_ID``) in the environment of process ``pid``."""
    from uirl.launch.processes import LAUNCH_ENV

    try:
        for entry in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
            if entry.startswith(f"{LAUNCH_ENV}=".encode()):
                return entry.decode().split("=", 1)[1]
    except OSError:
        pass
    return None


def test_sigterm_stops_uirl_run_and_every_process_of_its_run(tmp_path, tiny_bert):
    """A real ``uirl run`` (SuperLink, Flower's simulation runtime, Ray) stopped by SIGTERM during
    round 1: exit status 143, one line saying what was stopped, and no process of the run left --
    neither one below the wrapper nor one that only carries the run's mark (Ray's)."""
    from uirl.launch.processes import _alive, descendants, executable, launch_processes, process_name

    run_config = (f"model-name='{tiny_bert}' num-server-rounds=50 synthetic-users=90 synthetic-items=300 "
                  f"max-history=4 eval-negatives=9 batch-users=8 lora-r=4 max-tokens=16 "
                  f"run-dir='{tmp_path / 'runs'}' run-name='sigterm'")
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"))
    wrapper = subprocess.Popen([executable("uirl"), "run", "--supernodes", "2", "--run-config", run_config],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        assert wrapper.stdout is not None
        for line in wrapper.stdout:  # the run is under way once round 0 is shown
            if line.startswith("round=0"):
                break
        marks = {_marks(pid) for pid in descendants(wrapper.pid)} - {None}
        assert len(marks) == 1, marks
        run = set(descendants(wrapper.pid)) | set(launch_processes(marks.pop()))
        assert any(process_name(pid).startswith("ray::") for pid in run)  # Ray's workers are among them
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=60) == 143
        rest = wrapper.stdout.read()
        assert "uirl: interrupted by SIGTERM; stopped" in rest and "flower-superlink" in rest, rest[-2000:]
        assert _alive(list(run)) == [], [process_name(pid) for pid in _alive(list(run))]
    finally:
        if wrapper.poll() is None:
            stop_tree(wrapper.pid, grace=0)
