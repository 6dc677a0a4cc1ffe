"""A deployment round on this machine, with and without silo workers (:mod:`uirl.silo_worker`).

Each run is a real ``uirl deploy`` (:class:`uirl.launch.deployment.Deployment`): SuperLink, Fleet
gateway and one SuperNode per silo on 127.0.0.1 with TLS and SuperNode authentication, the tiny
model on synthetic data. With workers, each SuperNode's silo has a ``uirl silo-worker`` that keeps
its model and data in memory; without, every message's ``flwr-clientapp`` process imports torch and
rebuilds them; the workers' logs say how long the silos' own work took. The two take turns (``pairs`` times each, workers first), and the run directory's
watcher (:class:`simulation.bench.anatomy.RunWatcher`) times each round from one checkpoint to the
next. The round time's median is what the performance target (a round under 15 s) is about.
"""

from __future__ import annotations

import io
import re
import statistics
import time
from pathlib import Path

from simulation.bench.anatomy import RunWatcher, phases

ROUND_SECONDS_TARGET = 15.0


def one_deployment(tiny_model: str, *, workers: bool, silos: int, rounds: int, users_per_silo: int,
                   work: Path) -> dict:
    from uirl.launch.deployment import SUPEREXEC_POLL_ENV, Deployment
    from uirl.launch.run_config import format_overrides

    run_config = format_overrides({"model-name": tiny_model, "synthetic-users": users_per_silo * silos,
                                   "num-server-rounds": rounds, "min-nodes": silos, "run-name": "bench"})
    with Deployment(work, silos=silos, silo_workers=workers) as dep:
        began = time.time()
        dep.up()
        launched = time.time()
        with RunWatcher(dep.workdir / "runs" / "bench") as watcher:
            status, text = dep.run_app(run_config, log=io.StringIO(), timeout=3600)
        returned = time.time()
        poll = dep.env.get(SUPEREXEC_POLL_ENV)
        # The silos' own work: what each worker logged as the duration of the calls it answered.
        answered = {silo: [float(x) for x in re.findall(r"answered in ([0-9.]+) s", dep.procs.log(f"silo-worker-{silo}"))]
                    for silo in range(silos)} if workers else {}
    if status != "finished:completed":
        raise RuntimeError(f"the deployment ({'with' if workers else 'without'} workers) ended {status}:\n"
                           f"{text[-3000:]}")
    split = phases(watcher.seen, launched=launched, returned=returned, rounds=rounds)
    per_round = [row["total"] for row in split["rounds"]]
    out = {"silo-workers": workers, "up-seconds": launched - began, "seconds": split,
           "round-seconds": per_round, "median-round-seconds": statistics.median(per_round),
           "superexec-poll-seconds": poll}
    if workers:  # the release (if any), round 0's evaluation, then a train and an evaluate call a round
        out["worker-call-seconds"] = answered
        out["slowest-silo-work-per-round-seconds"] = max(sum(calls[-2 * rounds:]) / rounds
                                                         for calls in answered.values())
    return out


def deployment_section(tiny_model: str, *, silos: int = 3, rounds: int = 3, users_per_silo: int = 30,
                       pairs: int = 1, work: Path, log=lambda line: None) -> dict:
    runs = []
    for i in range(pairs):
        for workers in (True, False):
            log(f"deployment {i + 1}/{pairs}, {'with' if workers else 'without'} silo workers")
            runs.append(one_deployment(tiny_model, workers=workers, silos=silos, rounds=rounds,
                                       users_per_silo=users_per_silo, work=work / f"deploy-{i}-{int(workers)}"))

    def median_round(workers: bool) -> float:
        return statistics.median(s for r in runs if r["silo-workers"] is workers for s in r["round-seconds"])

    with_workers, without = median_round(True), median_round(False)
    return {"model": tiny_model, "silos": silos, "rounds": rounds, "users-per-silo": users_per_silo, "pairs": pairs,
            "runs": runs, "median-round-seconds": {"silo-workers": with_workers, "no-silo-workers": without},
            "ratio": with_workers / without,
            "note": "a round: from one checkpoint (or round 0's evaluation) to the next, so a train and an "
                    "evaluate message per silo, the server's aggregation and its checkpoint"}
