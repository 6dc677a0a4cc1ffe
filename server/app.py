"""ServerApp: an explicit train / aggregate / evaluate / checkpoint loop over the Grid.

Round 0 evaluates the untrained (zero-shot pretrained) model on every silo, so the table shows
what federated training added. Each later round: silos train locally with user-level DP, the
strategy (:mod:`server.strategy`) checks every reply and combines the valid updates, every silo
evaluates the new global model (every ``eval-every``-th round, and the last), and the server writes
a checkpoint of the round (:mod:`uirl.checkpoint`). With run-config ``resume`` the loop starts after
the last complete checkpoint of that run instead of at round 1, so no round is lost or counted
twice. With ``popularity-prior`` each silo first releases its item counts once
(:mod:`server.popularity`), and the prior built from them goes out with every message.

The server holds the whole global adapter (frozen LoRA A matrices included: checkpoints, resume
and ``final/`` have it all) but sends the silos only its trainable arrays (:func:`uirl.wire.downlink`).

Every message waits at most ``reply-timeout`` seconds for the silos' replies; a silo that has not
answered by then is left out of that round (:mod:`server.strategy` names it on the console).

The run fails (the ServerApp raises :class:`uirl.errors.RunFailed`, Flower reports the run as
failed, and no ``final/`` is written) when a round has fewer valid updates than ``min-nodes``, when
fewer than ``min-nodes`` silos are connected ``node-wait-timeout`` seconds after the server started
waiting for them (:mod:`server.nodes`), or when the model is no longer finite.

The loop is written out (rather than ``strategy.start``) so checkpoints and resume sit between
rounds; the strategy object is built in one place (:func:`build_strategy`). With run-config ``secagg`` the
training step of each round runs Flower's SecAgg+ protocol instead (:mod:`server.secagg`), so the
server learns only the mean of the silos' updates; everything else in the loop is unchanged.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from server.nodes import wait_for_nodes
from server.popularity import release_prior
from server.secagg import secagg_train
from server.strategy import ValidatingFedAvg
from uirl.aggregation import require_finite
from uirl.checkpoint import CheckpointError, load_checkpoint, resolve_resume, save_checkpoint
from uirl.config import Config, from_run_config, to_run_config
from uirl.federated import ReleasedSum
from uirl.model.build import build_model, save_adapter
from uirl.rounds import round_summary, silo_epsilons
from uirl.rundir import RunDirectory, announce
from uirl.tables import print_table, round_line

app = ServerApp()

#: The privacy numbers of a silo's reply that go to ``privacy.jsonl``.
_PRIVACY_KEYS = ("silo", "status", "epsilon", "delta", "target-epsilon", "noise-multiplier", "sample-rate", "steps",
                 "rounds-trained", "release-noise", "accepted", "replayed", "error", "notes")


class _Recorder:
    """Collects per-silo replies into one row per round, prints it, writes the run directory.
    Rows are keyed by Flower's node id (see :mod:`server.strategy`); ``silo`` is only a label."""

    def __init__(self, run: RunDirectory) -> None:
        self.run = run
        self.pending: dict[int, dict] = {}
        self.t0 = time.time()

    def _record(self, server_round: int, m: dict) -> None:
        """A checked reply's privacy row and the node's ledger entry. A refusal carries no ledger
        numbers: the last known ones (what the silo has spent) are kept."""
        node = str(m["node-id"])
        previous = self.run.ledger.get(node, {})
        row = {k: m[k] for k in _PRIVACY_KEYS if m.get(k) is not None}
        self.run.record_privacy(server_round, node, {**{k: v for k, v in previous.items() if k != "round"}, **row})

    def on_release(self, per_silo: list[dict]) -> None:
        """The popularity release, before round 0: each silo's epsilon after it (shown in round 0's row)."""
        released = [m for m in per_silo if not self._rejected(0, m)]
        for m in released:
            self._record(0, m)
        self.pending[0] = silo_epsilons(released)

    def on_train(self, server_round: int, per_silo: list[dict], asked: int) -> None:
        """A rejected reply gets a row with its reason in privacy.jsonl and nothing else: none of
        its numbers reach the ledger or the round. A silo asked that did not reply gets no row; the
        round row counts it (``silos-no-reply``)."""
        for m in per_silo:
            if not self._rejected(server_round, m):
                self._record(server_round, m)
        self.pending[server_round] = round_summary(per_silo, asked=asked)

    def _rejected(self, server_round: int, m: dict) -> bool:
        """Record a rejected reply (its node, label and the reason only); True if ``m`` was one."""
        if "rejected" in m:
            self.run.record_rejected(server_round, str(m["node-id"]),
                                     {k: m[k] for k in ("silo", "task", "rejected") if m.get(k) is not None})
        return "rejected" in m

    def on_evaluate(self, server_round: int, per_silo: list[dict], aggregated: dict) -> None:
        for m in per_silo:
            self._rejected(server_round, m)
        self.finish_round(server_round, aggregated)

    def finish_round(self, server_round: int, evaluated: dict) -> None:
        """Write and print the round's row (``evaluated`` is empty in a round without evaluation)."""
        row = {"round": server_round, **self.pending.pop(server_round, {}), **evaluated,
               "seconds": round(time.time() - self.t0, 1)}
        row.pop("num-examples", None)
        row.pop("silo", None)  # an average of silo ids means nothing
        self.run.record_round(row)
        print(round_line(row), flush=True)


def build_strategy(cfg: Config, trainable: set[str], recorder: _Recorder, prior: np.ndarray | None = None,
                   silent: set[int] | None = None, release: ReleasedSum | None = None) -> Strategy:
    fed = cfg.federation
    return ValidatingFedAvg(
        cfg=cfg, trainable=trainable, on_train=recorder.on_train, on_evaluate=recorder.on_evaluate, prior=prior,
        silent=silent, release=release,
        fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=2 if fed.secagg else 1, min_evaluate_nodes=1, min_available_nodes=fed.min_nodes)


def _silo_rounds(ledger: dict[str, dict]) -> str:
    """"silo:rounds,..." -- what each silo must at least show in its own ledger (fail closed if not):
    per silo label, the most rounds any node with that label was recorded as having trained."""
    rounds: dict[int, int] = {}
    for entry in ledger.values():
        if entry.get("silo") is not None and entry.get("rounds-trained") is not None:
            silo = int(entry["silo"])
            rounds[silo] = max(rounds.get(silo, 0), int(entry["rounds-trained"]))
    return ",".join(f"{silo}:{n}" for silo, n in sorted(rounds.items()))


def _to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: np.asarray(a.numpy()) for name, a in record.items()}


def _start(cfg: Config, initial: dict[str, np.ndarray], trainable: set[str]
           ) -> tuple[RunDirectory, int, dict[str, np.ndarray]]:
    """A new run directory at round 0, or the resumed run at its last complete checkpoint. The
    checkpoint's frozen arrays must be the ones this run's model rebuilds from its seed: silos are
    never sent them (:func:`uirl.wire.downlink`), they build their own."""
    fed = cfg.federation
    if not fed.resume:
        return RunDirectory.create(fed.run_dir, fed.run_name, {"run-config": to_run_config(cfg)}), 0, initial
    ckpt = load_checkpoint(resolve_resume(fed.run_dir, fed.resume))
    if {k: (v.shape, v.dtype) for k, v in ckpt.arrays.items()} != {k: (v.shape, v.dtype) for k, v in initial.items()}:
        raise CheckpointError(f"{ckpt.path}: the checkpoint's arrays do not fit this run's model")
    changed = sorted(k for k in initial if k not in trainable and not np.array_equal(ckpt.arrays[k], initial[k]))
    if changed:
        raise CheckpointError(f"{ckpt.path}: the frozen array {changed[0]} differs from the one this run's model "
                              "builds from its seed (another seed, base model or train-mode?); the silos, which "
                              "build their own, would not train the checkpoint's model")
    run = RunDirectory.reopen(ckpt.path.parent.parent, upto_round=ckpt.round, rounds=ckpt.rounds, ledger=ckpt.ledger)
    print(f"uirl: resuming {run.path} after round {ckpt.round}", flush=True)
    return run, ckpt.round, ckpt.arrays


def _evaluates(cfg: Config, server_round: int) -> bool:
    """Round 0, every ``eval-every``-th round and the last round evaluate (as the in-process engine)."""
    fed = cfg.federation
    return server_round in (0, fed.num_rounds) or server_round % fed.eval_every == 0


def _prior(grid: Grid, context: Context, cfg: Config, run: RunDirectory, recorder: _Recorder, silent: set[int]
           ) -> np.ndarray | None:
    """The run's popularity prior: released by the silos on a fresh run, read back on a resumed one.
    ``silent`` receives the nodes that did not answer the release in time."""
    if not cfg.model.popularity_prior:
        return None
    if cfg.federation.resume:
        return run.load_prior()
    return release_prior(grid, cfg, run, on_release=recorder.on_release, timeout=cfg.federation.reply_timeout,
                         on_silent=silent.add, context=context)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = from_run_config(context.run_config)
    fed = cfg.federation
    model, encoder = build_model(cfg)
    initial = {name: t.cpu().numpy() for name, t in model.adapter_state().items()}
    trainable = set(model.trainable_state())
    run, done, state = _start(cfg, initial, trainable)
    announce(run.path, run_id=context.run_id)
    print(f"uirl: run directory {run.path}", flush=True)
    recorder = _Recorder(run)

    def nodes_ready() -> None:  # Flower's own wait (in the strategy) has no end and no visible message
        wait_for_nodes(grid, fed.min_nodes, timeout=fed.node_wait_timeout)

    nodes_ready()
    silent: set[int] = set()
    prior = _prior(grid, context, cfg, run, recorder, silent)
    # local-prior: each silo also gets the released sum the prior was built from (saved with it).
    release = ReleasedSum(*run.load_release()) if prior is not None and cfg.model.local_prior else None
    strategy = build_strategy(cfg, trainable, recorder, prior, silent, release)
    arrays = ArrayRecord({name: Array(value) for name, value in state.items()})

    def write_adapter(directory, values: dict[str, np.ndarray]) -> None:
        require_finite(values)
        model.load_adapter_state(values)
        save_adapter(model, directory, meta={"base-model": encoder.model_name, "run-config": to_run_config(cfg)},
                     prior=strategy.prior, release=strategy.release)

    def evaluate(server_round: int) -> None:
        if not _evaluates(cfg, server_round):
            recorder.finish_round(server_round, {})
            return
        nodes_ready()
        replies = grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
                                        timeout=fed.reply_timeout)
        strategy.aggregate_evaluate(server_round, replies)

    if done == 0:  # round 0: the pretrained model before any federated training
        evaluate(0)
    for server_round in range(done + 1, fed.num_rounds + 1):
        train_config = ConfigRecord({"run-name": run.path.name, "silo-rounds": _silo_rounds(run.ledger)})
        nodes_ready()
        if fed.secagg:
            aggregated = secagg_train(grid, context, cfg, strategy, server_round, arrays, train_config,
                                      timeout=fed.reply_timeout)
        else:
            replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, train_config, grid),
                                            timeout=fed.reply_timeout)
            aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        evaluate(server_round)
        values = _to_numpy(arrays)
        save_checkpoint(run.path, server_round, values,
                        strategy={"name": type(strategy).__name__, "secagg": fed.secagg},
                        rounds=run.rounds, ledger=run.ledger, keep=fed.checkpoint_keep,
                        write_adapter=lambda directory: write_adapter(directory, values))

    write_adapter(run.path / "final", _to_numpy(arrays))
    print_table(run.rounds, title=f"uirl run {run.path.name}")
    print(f"uirl: final adapter (PEFT format) in {run.path / 'final'}", flush=True)
