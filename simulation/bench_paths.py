"""Users per second of one DP-SGD step, end-to-end LoRA path vs cached-vector path, side by side.

    python -m simulation.bench_paths [--users 32] [--repeats 7] [--out results/bench_paths.json]

Both paths take the same user-level DP step (Poisson-free: a fixed batch of ``--users`` users of
the synthetic default, per-user gradients, clipping, noise) on all-MiniLM-L6-v2 with the project
defaults; the LoRA path encodes every history and candidate text through the encoder, the cached
path reads the frozen encoder's vectors (encoded once, timed separately). Steps alternate between
the paths so machine drift hits both; the JSON holds every step time, medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from uirl.config import SiloConfig, from_run_config
from uirl.federated import _worker
from uirl.privacy import PerUserGradients, make_dp_optimizer
from uirl.train import row_vectors, training_example


def _step_fn(cfg, users: int):
    worker, silo = _worker(cfg, SiloConfig(0, 3))
    model, bank = worker.model, worker.bank
    model.train()
    rng = np.random.default_rng(0)
    chosen = [u for u in silo.users if len(u.train_items) >= 2][:users]
    examples = [training_example(u, cfg, rng=rng, all_item_ids=bank.item_ids, touched=silo.touched[u.user_id])
                for u in chosen]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_dp_optimizer(torch.optim.Adam(params, lr=1e-3), noise_multiplier=1.0, clip_norm=1.0,
                            expected_batch_users=float(users))
    cached = cfg.model.train_mode == "cached"

    def step() -> float:
        start = time.perf_counter()
        pug = PerUserGradients(model)
        try:
            opt.zero_grad(set_to_none=True)
            batch = bank.make_batch(examples, tokens=not cached)
            vectors = row_vectors(model, bank, batch.row_keys) if cached else None
            pug.backward(pug.loss(batch, vectors), batch)
            opt.step()
        finally:
            pug.close()
        return time.perf_counter() - start

    return step, sum(p.numel() for p in params)


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
    cached_step, cached_dims = _step_fn(from_run_config({**base, "train-mode": "cached", "user-proj-rank": 16}),
                                        args.users)
    setup_cached = time.perf_counter() - t0
    lora_step, lora_dims = _step_fn(from_run_config({**base, "train-mode": "lora"}), args.users)
    cached_step(), lora_step()  # warm-up
    times: dict[str, list[float]] = {"lora": [], "cached": []}
    for _ in range(args.repeats):
        times["lora"].append(lora_step())
        times["cached"].append(cached_step())
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "load-average": os.getloadavg(), "torch": torch.__version__},
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
