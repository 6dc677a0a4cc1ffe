"""ServerApp: FedAvg over LoRA adapter arrays, federated evaluation from round 0, a run directory.

Round 0 evaluates the untrained (zero-shot pretrained) model on every silo, so the table shows
what federated training added. Each later round: silos train locally with user-level DP, the
server validates and averages their adapter updates, then every silo evaluates the new global
model on its fixed test candidates.
"""

from __future__ import annotations

import math
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from server.strategy import ValidatingFedAvg, with_central_dp
from uirl.config import from_run_config, to_run_config
from uirl.model.build import build_model, save_adapter
from uirl.rundir import RunDirectory
from uirl.tables import print_table, round_line

app = ServerApp()


class _Recorder:
    """Collects per-silo replies into one row per round, prints it, writes the run directory."""

    def __init__(self, run: RunDirectory) -> None:
        self.run = run
        self.pending: dict[int, dict] = {}
        self.t0 = time.time()

    def on_train(self, server_round: int, per_silo: list[dict]) -> None:
        accepted = [m for m in per_silo if m.get("accepted")]
        users = sum(m.get("num-examples", 0.0) for m in accepted)
        loss = sum(m["train-loss"] * m["num-examples"] for m in accepted) / users if users else math.nan
        eps = {}
        for m in per_silo:
            silo = str(int(m.get("silo", -1)))
            eps[f"epsilon/silo-{silo}"] = m.get("epsilon", math.inf)
            self.run.record_privacy(server_round, silo, {
                k: m.get(k) for k in ("status", "epsilon", "delta", "target-epsilon", "noise-multiplier",
                                      "sample-rate", "steps", "rounds-trained", "accepted", "rejected")
                if k in m})
        self.pending[server_round] = {"train-loss": loss, "epsilon": max(eps.values(), default=math.nan),
                                      **dict(sorted(eps.items())),
                                      "silos-trained": len(accepted), "silos-replied": len(per_silo)}

    def on_evaluate(self, server_round: int, per_silo: list[dict], aggregated: dict) -> None:
        row = {"round": server_round, **self.pending.pop(server_round, {}), **aggregated,
               "seconds": round(time.time() - self.t0, 1)}
        row.pop("num-examples", None)
        row.pop("silo", None)  # an average of silo ids means nothing
        self.run.record_round(row)
        print(round_line(row), flush=True)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = from_run_config(context.run_config)
    fed = cfg.federation
    run = RunDirectory.create(fed.run_dir, fed.run_name, {"run-config": to_run_config(cfg)})
    print(f"uirl: run directory {run.path}", flush=True)
    model, encoder = build_model(cfg)
    initial = {name: t.cpu().numpy() for name, t in model.adapter_state().items()}
    trainable = set(model.trainable_state())
    recorder = _Recorder(run)
    strategy = ValidatingFedAvg(
        trainable=trainable, max_update_norm=fed.max_update_norm,
        on_train=recorder.on_train, on_evaluate=recorder.on_evaluate,
        fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=fed.min_nodes)
    strategy = with_central_dp(strategy, cfg)
    arrays = ArrayRecord({name: Array(value) for name, value in initial.items()})

    # Round 0: the pretrained model before any federated training.
    replies = grid.send_and_receive(strategy.configure_evaluate(0, arrays, ConfigRecord(), grid))
    strategy.aggregate_evaluate(0, replies)

    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=fed.num_rounds,
                            train_config=ConfigRecord(), evaluate_config=ConfigRecord())
    final = result.arrays if result.arrays is not None and len(result.arrays) else arrays
    model.load_adapter_state({name: np.asarray(a.numpy()) for name, a in final.items()})
    save_adapter(model, run.path / "final", meta={"base-model": encoder.model_name,
                                                  "run-config": to_run_config(cfg)})
    print_table(recorder.run.rounds, title=f"uirl run {run.path.name}")
    print(f"uirl: final adapter (PEFT format) in {run.path / 'final'}", flush=True)
