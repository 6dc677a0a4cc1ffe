"""Where the wall time of a real ``flwr run`` goes, and how much memory its processes take.

One local simulation (:func:`uirl.launch.simulation.run_simulation`, as ``uirl run`` starts it: its
own Flower home, runtime dependency install off) of the tiny model. While it runs, a watcher notes
when each file of the run directory appears or grows: ``config.json`` (the ServerApp is up),
round r's rows in ``privacy.jsonl`` (the silos' training replies are in), its row in
``metrics.jsonl`` (the evaluation is in) and ``checkpoints/round-r`` (the round is saved). Between
those moments:

- start-up: the command started -> the ServerApp's run directory (SuperLink, simulation runtime,
  ServerApp process, model build);
- round 0: waiting for the silos and evaluating the untrained model (ClientApp processes start);
- training / evaluation: from the round's start to the replies, then to the evaluation results
  (messages, scheduling and the silos' compute together);
- checkpoints: writing each round's checkpoint;
- shut-down: the last checkpoint -> the command returned (final adapter, stopping the processes).

The same run in one process (:mod:`simulation.bench.scaling`'s cell) gives the compute a round
needs without Flower; the difference per round is Flower's orchestration and idle time. Memory:
the summed RSS and PSS of every process that carries the run's Flower home in its environment.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

from simulation.bench.measure import TreeMemory
from simulation.bench.scaling import cell


class RunWatcher:
    """Polls a run directory in a thread; :attr:`seen` maps an event name to the time.time() at
    which it was first seen (``config``, ``train-<r>``, ``evaluate-<r>``, ``checkpoint-<r>``)."""

    def __init__(self, run_dir: Path, *, every: float = 0.05) -> None:
        self.run_dir = run_dir
        self.every = every
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _note(self, name: str) -> None:
        self.seen.setdefault(name, time.time())

    def _rounds(self, name: str) -> set[int]:
        try:
            text = (self.run_dir / name).read_text(encoding="utf-8")
        except OSError:
            return set()
        rounds = set()
        for line in text.splitlines():
            try:
                rounds.add(int(json.loads(line)["round"]))
            except (ValueError, KeyError, TypeError):
                pass  # a line being written
        return rounds

    def _poll(self) -> None:
        if (self.run_dir / "config.json").exists():
            self._note("config")
        for r in self._rounds("privacy.jsonl"):
            self._note(f"train-{r}")
        for r in self._rounds("metrics.jsonl"):
            self._note(f"evaluate-{r}")
        for path in (self.run_dir / "checkpoints").glob("round-*"):
            self._note(f"checkpoint-{path.name.split('-', 1)[1]}")

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._poll()

    def __enter__(self) -> "RunWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._poll()


def phases(seen: dict[str, float], *, launched: float, returned: float, rounds: int) -> dict:
    """Seconds of each phase (see the module's docstring) from the watcher's times."""
    per_round = []
    start = seen["evaluate-0"]
    for r in range(1, rounds + 1):
        trained, evaluated, saved = seen[f"train-{r}"], seen[f"evaluate-{r}"], seen[f"checkpoint-{r}"]
        per_round.append({"round": r, "training": trained - start, "evaluation": evaluated - trained,
                          "checkpoint": saved - evaluated, "total": saved - start})
        start = saved
    totals = {k: sum(row[k] for row in per_round) for k in ("training", "evaluation", "checkpoint")}
    return {"start-up": seen["config"] - launched, "round-0": seen["evaluate-0"] - seen["config"], **totals,
            "shut-down": returned - start, "wall": returned - launched, "rounds": per_round}


def anatomy_section(tiny_model: str, *, silos: int, rounds: int, users_per_silo: int, work: Path,
                    log=lambda line: None) -> dict:
    """One ``flwr run`` of ``silos`` silos x ``rounds`` rounds, timed and measured; then the same
    run in-process for the compute it needs."""
    from uirl.launch.run_config import format_overrides
    from uirl.launch.simulation import run_simulation

    base = {"model-name": tiny_model, "synthetic-users": users_per_silo * silos, "num-server-rounds": rounds,
            "min-nodes": silos}
    flwr_home = (work / "flwr-home").resolve()
    run_dir = (work / "anatomy-runs").resolve()
    overrides = format_overrides({**base, "run-dir": str(run_dir), "run-name": "anatomy"})
    memory = TreeMemory(lambda pid, env: env.get("FLWR_HOME") == str(flwr_home))
    log(f"anatomy: flwr run, {silos} silos x {rounds} rounds")
    launched = time.time()
    with RunWatcher(run_dir / "anatomy") as watcher, memory:
        result = run_simulation(supernodes=silos, run_config=overrides, cpus_per_client=1, flwr_home=flwr_home,
                                log=io.StringIO())
    returned = time.time()
    if result.status != "finished:completed":
        raise RuntimeError(f"the anatomy's flwr run ended {result.status}:\n{result.text[-3000:]}")
    split = phases(watcher.seen, launched=launched, returned=returned, rounds=rounds)
    log("anatomy: the same run in one process")
    engine = cell(base, silos=silos, users_per_silo=users_per_silo, rounds=rounds, timeout=1800, threads=None)
    flower_round = (split["training"] + split["evaluation"] + split["checkpoint"]) / rounds
    return {"model": tiny_model, "silos": silos, "rounds": rounds, "users-per-silo": users_per_silo,
            "client-cpus": 1.0, "status": result.status, "seconds": split, "memory": memory.result(),
            "in-process": engine,
            "flower-seconds-per-round": flower_round,
            "in-process-seconds-per-round": engine.get("seconds-per-round"),
            "flower-minus-in-process-seconds-per-round": flower_round - engine.get("seconds-per-round", 0.0),
            "note": "flwr run's ClientApps run in parallel (one CPU each), the in-process engine's silos one "
                    "after another: a round can take less wall time under Flower than in one process"}
