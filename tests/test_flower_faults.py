"""The fault matrix in real ``flwr run`` simulations (tiny model, small synthetic data).

Each run's ClientApp is the real one wrapped by ``tests/faulty_silo.py``, which breaks chosen
partitions in chosen rounds: a reply with a NaN user count, an extra metric key, a spoofed silo
label with a huge round count, an update scaled far past the norm bound or just inside it, a
training that raises with a local path and a user id in its message, a silo that answers only
after the server gave up on it. The ServerApp is the product's, unchanged.

The two runs go at the same time (one module fixture): the second spends most of its time waiting
out its ``reply-timeout``.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from uirl.launch.output import ConciseLog
from uirl.launch.processes import ROOT
from uirl.launch.simulation import run_simulation

HERE = Path(__file__).parent

FAILED_REASON = "the ClientApp failed: ValueError (details in the silo's log)"


def _app(tmp_path: Path, faults: dict[str, str]) -> Path:
    """A Flower app directory: the project's pyproject.toml with ``faulty_silo:app`` as the
    ClientApp, the wrapper, and its plan."""
    app = tmp_path / "app"
    app.mkdir()
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'clientapp = "client.app:app"' in text
    (app / "pyproject.toml").write_text(text.replace('clientapp = "client.app:app"', 'clientapp = "faulty_silo:app"'),
                                        encoding="utf-8")
    assert tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]["clientapp"] \
        == "faulty_silo:app"
    shutil.copy(HERE / "faulty_silo.py", app / "faulty_silo.py")
    record = tmp_path / "replies"
    record.mkdir()
    plan = {"faults": faults, "record": str(record)}
    (app / "faults.json").write_text(json.dumps(plan), encoding="utf-8")
    return app


def _run(tmp_path: Path, model_path: str, *, supernodes: int, faults: dict[str, str], run_name: str, extra: str):
    """``run_name``'s result and run directory; ``faults`` maps "partition:round" to what goes wrong."""
    run_config = (f"model-name='{model_path}' synthetic-users={40 * supernodes} synthetic-items=300 max-history=4 "
                  f"eval-negatives=9 eval-min-users=1 batch-users=8 lora-r=4 max-tokens=16 "
                  f"run-dir='{tmp_path / 'runs'}' run-name='{run_name}' {extra}")
    log = io.StringIO()
    result = run_simulation(supernodes=supernodes, run_config=run_config, app=_app(tmp_path, faults),
                            cpus_per_client=1,
                            flwr_home=tmp_path / "flwr-home", log=ConciseLog(log))
    return result, tmp_path / "runs" / run_name


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _server_records(run: Path) -> str:
    """Everything the server wrote about the run except Flower's log (which, in a simulation, also
    carries the silos' own consoles)."""
    files = [p for p in run.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".csv")]
    assert any(p.name == "privacy.jsonl" for p in files)
    return "\n".join(p.read_text(encoding="utf-8") for p in files)


def test_a_failing_clientapp_tells_the_server_only_the_exceptions_class(monkeypatch, caplog):
    """In process: whatever a handler raises, the reply's error names the class only; the message
    and traceback go to the silo's own log."""
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import client.app
    from client.failures import contain_failures

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    msg = Message(RecordDict(), dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})

    def failing(message, ctx):
        raise FileNotFoundError("/srv/silo-data/events.jsonl: user 'secret-user-42'")

    # Flower's logger writes to the stream it found when first imported (another test's, in a whole
    # run), so its records are read here, not from the captured console.
    flwr_log = logging.getLogger("flwr")
    flwr_log.addHandler(caplog.handler)
    try:
        reply = contain_failures(msg, context, failing)
    finally:
        flwr_log.removeHandler(caplog.handler)
    assert reply.has_error() and reply.error.reason == "FileNotFoundError (details in the silo's log)"
    assert "secret-user-42" in caplog.text and "Traceback" in caplog.text
    assert contain_failures(msg, context, lambda message, ctx: message) is msg  # no failure: passed through
    # The real ClientApp has it as its first (outermost) mod: a node config it cannot read fails there.
    reply = client.app.app(msg, context)
    assert reply.error.reason == "ConfigError (details in the silo's log)"


#: Five silos, two rounds, ``aggregation = median``, ``min-nodes = 2``. Round 1: silo 1 sends NaN as its
#: user count, silo 3 an extra metric key, silo 4 its update x 10,000; silos 0 and 2 are honest. Round 2:
#: silo 1's training raises, silo 2 claims to be silo 0 with a billion rounds trained, silo 4 scales its
#: update to just inside the norm bound; silos 0 and 3 are honest.
HOSTILE = {"1:1": "nan-count", "3:1": "extra-key", "4:1": "scale-huge",
           "1:2": "raise", "2:2": "spoof", "4:2": "scale-to-bound"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert):
    """(the hostile run, the run whose only silo answers too late), each (result, run directory)."""
    with ThreadPoolExecutor(2) as pool:
        late = pool.submit(_run, tmp_path_factory.mktemp("late"), tiny_bert, supernodes=1, faults={"0:1": "hang"},
                           run_name="late",
                           extra="num-server-rounds=1 min-nodes=1 fraction-evaluate=0.0 reply-timeout=20")
        hostile = pool.submit(_run, tmp_path_factory.mktemp("hostile"), tiny_bert, supernodes=5, faults=HOSTILE,
                              run_name="faults", extra="num-server-rounds=2 min-nodes=2 aggregation='median'")
        return hostile.result(), late.result()


def test_hostile_and_broken_silos_are_dropped_and_the_run_completes(runs):
    (result, run), _ = runs
    assert result.status == "finished:completed", result.text[-3000:]

    rows = _jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert (rows[1]["silos-trained"], rows[1]["silos-replied"], rows[1]["silos-rejected"]) == (2, 5, 3)
    assert (rows[2]["silos-trained"], rows[2]["silos-replied"], rows[2]["silos-rejected"]) == (3, 5, 2)
    assert rows[1]["silos-no-reply"] == rows[2]["silos-no-reply"] == 0

    # Each bad reply: rejected, with its reason, under its node id and the label it had from round 0.
    privacy = _jsonl(run / "privacy.jsonl")
    rejected = {(r["round"], r["silo"]): r for r in privacy if "rejected" in r}
    assert sorted(rejected) == [(1, 1), (1, 3), (1, 4), (2, 1), (2, 2)]
    assert all(r["task"] == "train" for r in rejected.values())
    assert rejected[1, 1]["rejected"] == "num-examples = nan is not finite"
    assert "extra ['user-ids']" in rejected[1, 3]["rejected"]
    assert "exceeds max-update-norm" in rejected[1, 4]["rejected"]
    assert rejected[2, 1]["rejected"] == FAILED_REASON
    assert rejected[2, 2]["rejected"] == "rounds-trained went from 1 (round 1) to 1e+09 in round 2"
    nodes = {r["silo"]: r["node-id"] for r in privacy if r.get("accepted")}
    assert sorted(nodes) == [0, 2, 3, 4] and len(set(nodes.values())) == 4
    assert all(r["node-id"] == nodes[silo] for (_, silo), r in rejected.items() if silo in nodes)

    # The spoofed label touched nothing of silo 0.
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    assert ledger[nodes[0]]["silo"] == 0 and ledger[nodes[0]]["rounds-trained"] == 2
    assert ledger[nodes[2]]["rounds-trained"] == 1  # its round-2 reply was dropped

    # The silo's exception text stayed in its own log: the server recorded the class name only.
    records = _server_records(run)
    assert "secret-user-42" not in records and "/srv/silo-data" not in records
    assert "secret-user-42" in (run / "flower.log").read_text()  # the traceback, on the silo's console

    # Round 2: the update scaled to the bound passed the checks, and the median kept the aggregate
    # within the honest silos' spread, coordinate by coordinate, where a mean would have left it.
    updates = {silo: dict(np.load(run.parent.parent / "replies" / f"round-2-silo-{silo}.npz")) for silo in (0, 3, 4)}
    after = load_file(str(run / "checkpoints" / "round-2" / "arrays.safetensors"))
    outside_mean = 0
    for name, hostile in updates[4].items():
        honest = np.stack([updates[0][name], updates[3][name]])
        low, high = honest.min(axis=0) - 1e-6, honest.max(axis=0) + 1e-6
        assert np.all((low <= after[name]) & (after[name] <= high)), name
        mean = np.mean(np.concatenate([honest, hostile[None]]), axis=0)
        outside_mean += int(np.sum((mean < low) | (mean > high)))
    assert outside_mean > 0

    final = run / "final"
    assert all(np.isfinite(v).all() for v in load_file(str(final / "adapter_model.safetensors")).values())


def test_a_silo_that_answers_after_the_reply_timeout_is_left_out_of_the_round(runs):
    """One silo, one round, no evaluation, ``reply-timeout = 20``: the silo trains, but answers only
    after the server gave up on it. The round has no valid update, so the run fails, saying that the
    silo sent no reply; a late answer is never recorded.

    A single silo, because every silo's reply must otherwise beat the timeout, and the first message
    to a simulated silo (its process imports torch, builds the model, encodes the items) takes 30 to
    over 90 seconds on a busy 2-core machine: an honest silo next to the hanging one would make
    the timeout, and the test, that long. That the other silos' round goes on without a silent one
    is shown in process (``tests/test_replies.py::test_a_silo_that_sends_no_reply_in_time_is_named_and_counted``)."""
    _, (result, run) = runs
    assert result.status == "finished:failed", result.text[-3000:]
    text = result.text
    assert ("round 1: 0 valid update(s) from 1 silo(s) asked, fewer than the 1 needed (min-nodes 1); "
            "0 reply(ies) rejected, 0 refused, 1 sent no reply within reply-timeout") in text, text[-3000:]
    given_up = text.index("sent no train reply within reply-timeout (20 s): left out of the round")
    # It had not trained when the server gave up (whether its late answer still reaches the log
    # before the simulation shuts down depends on the machine's load).
    assert "uirl: silo 0 round 1: trained" not in text[:given_up]
    assert not (run / "privacy.jsonl").exists()  # nothing it said reached the run's records
    assert not (run / "final").exists() and not (run / "checkpoints").exists()
