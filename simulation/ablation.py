"""Ablation of the interest model's parts: the same federated setup with each part on or off.

``python -m simulation.ablation [--configs base,levels,...] [--out DIR] [--threads 1]`` trains every
configuration with the same data, seeds and fixed candidates, then writes ``ablation.md`` and
``ablation.csv`` (test AUC, MRR, nDCG@10 averaged over the silos' users, final train loss, and the
seconds spent training and evaluating) to ``--out``.

The default engine is the in-process one (:func:`uirl.engine.run_federated`): every silo runs
:func:`uirl.federated.local_train` (user-level DP-SGD, its own privacy ledger) from the global
arrays, the server checks and combines the replies with the ServerApp's own round function
(:func:`uirl.rounds.train_round`), and after the last round every silo runs
:func:`uirl.federated.local_evaluate`. That is the Flower app's logic without Ray or a SuperLink. ``--engine flower`` runs each configuration as
a real ``flwr run`` (``simulation.flower``) instead; slower, same numbers up to DP noise, and
"train seconds" is then the whole run's wall time (Ray start-up and evaluation included).

DP noise comes from the OS entropy pool (as it must), so two runs of a configuration differ a
little; ``--repeats N`` averages N runs of each.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

#: Configuration name -> run-config overrides on top of the base setup.
CONFIGS: dict[str, dict[str, object]] = {
    "base": {},
    "levels": {"levels": "event,short,long"},
    "facets": {"facets": 4},
    "facets+heads": {"facets": 4, "facet-heads": True},
    "views:text": {"views": "behavior,text"},
    "task-heads": {"task-heads": True},
    "vae": {"vae": True},
    "all": {"levels": "event,short,long", "facets": 4, "facet-heads": True, "views": "behavior,text",
            "task-heads": True, "vae": True},
}
DEFAULT_CONFIGS = "base,levels,facets,views:text,task-heads,vae,all"

#: The shared setup: small enough for a 2-core CPU, large enough for the parts to matter.
#: ``train-mode`` lora: the published ablation trains the encoder's LoRA adapters end to end.
BASE: dict[str, object] = {"train-mode": "lora", "synthetic-users": 360, "synthetic-items": 400, "max-history": 5, "train-negatives": 3,
                           "max-tokens": 20, "batch-users": 24, "local-epochs": 0.4, "num-server-rounds": 3,
                           "target-epsilon": 8.0, "dp": True, "seed": 0}
METRICS = ("auc", "mrr", "ndcg@10")


def fedavg(cfg, num_silos: int, *, log, zero_shot: dict | None = None) -> tuple[dict[str, float], float, float]:
    """Train ``cfg`` with the in-process engine (:func:`uirl.engine.run_federated`: the ServerApp's
    round function without Flower), evaluating after the last round only; -> (user-weighted test
    metrics, train s, eval s). Given ``zero_shot`` (a dict), round 0 (the untrained model) is
    evaluated into it too."""
    from dataclasses import replace

    from uirl.engine import run_federated

    cfg = replace(cfg, federation=replace(cfg.federation, eval_every=cfg.federation.num_rounds))

    def on_round(row: dict) -> None:
        if row["round"] > 0:
            log(f"  round {row['round']}: loss {row['train-loss']:.4f}  eps {row['epsilon']:.2f}  "
                f"({row['train-seconds']:.0f} s training)")

    rows = run_federated(cfg, num_silos, on_round=on_round, round0=zero_shot is not None).rounds
    if zero_shot is not None:
        zero_shot.update({m: rows[0][m] for m in METRICS}, **{"eval-seconds": rows[0]["eval-seconds"]})
    last = rows[-1]
    train_s = sum(row["train-seconds"] for row in rows if row["round"] > 0)
    return {**{m: last[m] for m in METRICS}, "train-loss": last["train-loss"]}, train_s, last["eval-seconds"]


def flower(overrides: dict[str, object], num_silos: int, *, log) -> tuple[dict[str, float], float, float]:
    """Run one configuration with ``flwr run``; -> (metrics of the last round, wall s, 0)."""
    from simulation.flower import ConciseLog, ROOT, run
    from uirl.launch.run_config import format_overrides

    name = f"ablation-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    status, _ = run(supernodes=num_silos, run_config=format_overrides({**overrides, "run-name": name}),
                    cpus_per_client=1, log=ConciseLog())
    wall = time.perf_counter() - t0
    if status != "finished:completed":
        raise RuntimeError(f"flwr run ended with status {status}")
    rows = [json.loads(line) for line in (ROOT / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return {**{m: rows[-1][m] for m in METRICS}, "train-loss": rows[-1]["train-loss"]}, wall, 0.0


def _value(text: str) -> object:
    """A command-line override value: bool, int, float, or the string itself (without the quotes
    that ``flwr run --run-config`` wants around strings, single or double)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def table(rows: list[dict[str, object]]) -> tuple[str, str]:
    """-> (markdown, CSV) of the result rows."""
    columns = ["config", "parts", "auc", "mrr", "ndcg@10", "train-loss", "train-seconds", "eval-seconds"]
    titles = ["config", "run-config overrides", "AUC", "MRR", "nDCG@10", "train loss", "train s", "eval s"]

    def cell(row, c):
        v = row[c]
        if isinstance(v, float) and v != v:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) and c not in ("train-seconds", "eval-seconds") else \
            f"{v:.0f}" if isinstance(v, float) else str(v)

    md = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    md += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return "\n".join(md) + "\n", buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--run-config", default="", help='extra overrides for every configuration, "k=v k2=v2"')
    parser.add_argument("--engine", choices=("fedavg", "flower"), default="fedavg")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default="runs/ablation", help="directory for ablation.md / ablation.csv")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from uirl.config import from_run_config
    from uirl.errors import UirlError

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"uirl: unknown configuration {unknown[0]!r}; known: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    extra = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.run_config.split())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        overrides = {**BASE, **extra, **CONFIGS[name]}
        try:
            cfg = from_run_config(overrides)
        except UirlError as exc:
            print(f"uirl: {exc}", file=sys.stderr)
            return 2
        print(f"{name}: {CONFIGS[name] or 'every part off'}", flush=True)
        runs = []
        for repeat in range(args.repeats):
            if args.engine == "fedavg":
                zero = {} if name == "base" and repeat == 0 else None
                runs.append(fedavg(cfg, args.silos, log=lambda s: print(s, flush=True), zero_shot=zero))
                if zero:
                    rows.append({"config": "zero-shot", "parts": "no training (pretrained encoder)", **zero,
                                 "train-loss": float("nan"), "train-seconds": 0.0})
            else:
                runs.append(flower(overrides, args.silos, log=lambda s: print(s, flush=True)))
        metrics = {k: sum(r[0][k] for r in runs) / len(runs) for k in runs[0][0]}
        row = {"config": name, "parts": " ".join(f"{k}={v}" for k, v in CONFIGS[name].items()) or "-",
               **metrics, "train-seconds": sum(r[1] for r in runs) / len(runs),
               "eval-seconds": sum(r[2] for r in runs) / len(runs)}
        rows.append(row)
        print(f"{name}: AUC {row['auc']:.4f}  MRR {row['mrr']:.4f}  nDCG@10 {row['ndcg@10']:.4f}  "
              f"train {row['train-seconds']:.0f} s", flush=True)
        md, text = table(rows)  # rewritten after every configuration: a long run keeps what it has
        (out / "ablation.md").write_text(md, encoding="utf-8")
        (out / "ablation.csv").write_text(text, encoding="utf-8")
    print(md, flush=True)
    print(f"uirl: ablation table in {out / 'ablation.md'} and {out / 'ablation.csv'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
