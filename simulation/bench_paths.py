"""Users per second of one DP-SGD step, end-to-end LoRA path vs cached-vector path, side by side.

    python -m simulation.bench_paths [--users 32] [--repeats 7] [--out results/bench_paths.json]

Both paths take the same user-level DP step (:func:`uirl.train.train_step`, Poisson-free: a fixed batch of ``--users`` users of
the synthetic default, per-user gradients, clipping, noise) on all-MiniLM-L6-v2 with the project
defaults; the LoRA path encodes every history and candidate text through the encoder, the cached
path reads the frozen encoder's vectors (encoded once, timed separately). Steps alternate between
the paths so machine drift hits both; the JSON holds every step time, medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from simulation.bench.measure import interleaved, machine
from simulation.bench.steps import make_step
from uirl.config import from_run_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation.bench_paths", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/bench_paths.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = {"device": "cpu", "synthetic-users": 600}
    t0 = time.perf_counter()
    cached = make_step(from_run_config({**base, "train-mode": "cached", "user-proj-rank": 16}), users=args.users,
                       kind="dp")
    setup_cached = time.perf_counter() - t0
    lora = make_step(from_run_config({**base, "train-mode": "lora"}), users=args.users, kind="dp")
    times = interleaved({"lora": lora.take, "cached": cached.take}, repeats=args.repeats)
    lora.close()
    cached.close()
    lora_dims, cached_dims = lora.trainable, cached.trainable
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": machine(),
        "users-per-step": args.users, "step-seconds": times, "median-step-seconds": med,
        "users-per-second": {k: args.users / v for k, v in med.items()},
        "speed-up": med["lora"] / med["cached"],
        "trainable-numbers": {"lora": lora_dims, "cached": cached_dims},
        "cached-setup-seconds (catalogue encoding or disk cache read, model load)": setup_cached,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"DP step, {args.users} users, {args.threads} thread(s): LoRA {med['lora']:.3f} s "
          f"({args.users / med['lora']:.1f} users/s), cached {med['cached']:.4f} s "
          f"({args.users / med['cached']:.0f} users/s): {result['speed-up']:.0f}x; trainable numbers "
          f"{lora_dims:,} vs {cached_dims:,}; written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
