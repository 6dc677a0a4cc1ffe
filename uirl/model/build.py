"""Build the interest model from the config, and save/load its adapter in PEFT's own format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from uirl.config import Config
from uirl.model.encoder import Encoder, load_encoder
from uirl.model.interest import InterestModel

HEAD_FILE = "interest_head.safetensors"
META_FILE = "uirl_model.json"


def build_model(cfg: Config) -> tuple[InterestModel, Encoder]:
    """Encoder + LoRA + heads, every random initialisation derived from ``cfg.train.seed``."""
    encoder = load_encoder(cfg.model, seed=cfg.train.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + 1)
        model = InterestModel(encoder, temperature=cfg.model.temperature, interest=cfg.interest)
    return model, encoder


def head_state(model: InterestModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if not n.startswith("encoder.")}


def save_adapter(model: InterestModel, directory: str | Path, *, meta: dict | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format, loadable with
    ``PeftModel.from_pretrained(base, directory)``), the interest head, and a small metadata file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(str(directory))
    save_file(head_state(model), str(directory / HEAD_FILE))
    info = {"temperature": model.temperature, "pooling": model.pooling, **(meta or {})}
    (directory / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory


def load_head(model: InterestModel, directory: str | Path) -> None:
    state = load_file(str(Path(directory) / HEAD_FILE))
    model.load_adapter_state(state)
