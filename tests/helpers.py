"""Small builders shared by tests (not fixtures: plain functions)."""

from __future__ import annotations

from uirl.config import Config, from_run_config


def tiny_config(model_path: str, **overrides) -> Config:
    base = {"model-name": model_path, "synthetic-users": 60, "synthetic-items": 300, "max-history": 4,
            "train-negatives": 3, "eval-negatives": 9, "batch-users": 8, "lora-r": 4, "max-tokens": 16,
            "num-server-rounds": 2, "device": "cpu"}
    base.update(overrides)
    return from_run_config(base)
