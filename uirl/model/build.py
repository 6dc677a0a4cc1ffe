"""Build the interest model from the config, and save/load its adapter in PEFT's own format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from uirl.config import Config, from_run_config
from uirl.errors import UirlError
from uirl.model.encoder import SHIPPED_MINILM_HUB_ID, SHIPPED_MINILM_PACKAGE, Encoder, load_encoder, portable_model_name
from uirl.model.interest import InterestModel
from uirl.rundir import PRIOR_FILE, RELEASE_FILE, read_release, write_release
from uirl.tensor_files import read_tensors

HEAD_FILE = "interest_head.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
META_FILE = "uirl_model.json"


def build_model(cfg: Config) -> tuple[InterestModel, Encoder]:
    """Encoder + LoRA + heads, every random initialisation derived from ``cfg.train.seed``."""
    encoder = load_encoder(cfg.model, seed=cfg.train.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + 1)
        model = InterestModel(encoder, temperature=cfg.model.temperature, interest=cfg.interest,
                              user_proj_rank=cfg.model.user_proj_rank, item_proj_rank=cfg.model.item_proj_rank,
                              prior_weight=cfg.model.prior_weight if cfg.model.popularity_prior else None,
                              train_encoder=cfg.model.train_mode == "lora")
    return model, encoder


def head_state(model: InterestModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if not n.startswith("encoder.")}


def save_adapter(model: InterestModel, directory: str | Path, *, meta: dict | None = None,
                 prior: np.ndarray | None = None, release: tuple[np.ndarray, float] | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format, loadable with
    ``PeftModel.from_pretrained(base, directory)``), the interest head, a small metadata file and,
    for a model trained with the popularity prior, that prior (:data:`PRIOR_FILE`) and, with
    ``local-prior``, the released sum it was built from (``release``: sum, noise standard
    deviation; :data:`RELEASE_FILE`).
    The adapter's ``base_model_name_or_path`` is a portable name (the hub id for the shipped
    MiniLM), not the path the base model was loaded from on this machine."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(str(directory))
    adapter_config = directory / "adapter_config.json"
    settings = json.loads(adapter_config.read_text(encoding="utf-8"))
    base = portable_model_name(str(settings.get("base_model_name_or_path") or (meta or {}).get("base-model", "")))
    settings["base_model_name_or_path"] = base
    adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(head_state(model), str(directory / HEAD_FILE))
    info = {"temperature": model.temperature, "pooling": model.pooling, **(meta or {})}
    if base == SHIPPED_MINILM_HUB_ID:
        info["base-model-package"] = SHIPPED_MINILM_PACKAGE  # pip package with these weights, for offline use
    (directory / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if prior is not None:
        np.save(directory / PRIOR_FILE, np.asarray(prior, dtype=np.float32), allow_pickle=False)
    if release is not None:
        write_release(directory / RELEASE_FILE, *release)
    return directory


def load_prior(directory: str | Path, cfg: Config) -> np.ndarray | None:
    """The popularity prior saved with a model trained with one (None for a model without);
    a model that scores with a prior is not loaded without it."""
    if not cfg.model.popularity_prior:
        return None
    path = Path(directory) / PRIOR_FILE
    try:
        prior = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UirlError(f"{path}: the model was trained with popularity-prior and needs this file "
                        f"({type(exc).__name__}: {exc})") from None
    if prior.ndim != 1 or not np.isfinite(prior).all():
        raise UirlError(f"{path}: expected one finite value per catalogue item")
    return prior


def load_release(directory: str | Path, cfg: Config) -> tuple[np.ndarray, float] | None:
    """The released popularity sum and its noise saved with a ``local-prior`` model (None for a
    model without); such a model is not loaded without it."""
    if not (cfg.model.popularity_prior and cfg.model.local_prior):
        return None
    path = Path(directory) / RELEASE_FILE
    try:
        return read_release(path)
    except ValueError as exc:
        raise UirlError(f"{path}: the model was trained with local-prior and needs this file ({exc})") from None


def load_head(model: InterestModel, directory: str | Path) -> None:
    model.load_adapter_state(read_tensors(Path(directory) / HEAD_FILE))


def check_adapter_shapes(adapter: dict[str, torch.Tensor], model: InterestModel, cfg: Config, path: Path,
                         trained_on: str | None = None) -> None:
    """Every array of a saved adapter has the shape the model built from ``cfg`` expects (names in
    PEFT's saved form); a mismatch means another base model or LoRA config trained it.
    ``trained_on``: the base model the saved metadata names, shown in the error."""
    expected = get_peft_model_state_dict(model.encoder)
    for name, value in adapter.items():
        want = expected.get(name)
        if want is not None and tuple(want.shape) != tuple(value.shape):
            saved = f"; its uirl_model.json names {trained_on!r}" if trained_on else ""
            raise UirlError(
                f"{path}: array {name!r} has shape {tuple(value.shape)}, but base model {cfg.model.name!r} with "
                f"lora-r {cfg.model.lora_r} expects {tuple(want.shape)}: the model was trained on another base "
                f"model or config{saved} (give the base model it was trained on with --model-name)")


def load_trained(directory: str | Path, *, model_name: str | None = None) -> tuple[InterestModel, Encoder, Config]:
    """The model saved by :func:`save_adapter` (a run's ``final/``): its run config (from the
    metadata), the base encoder (``model_name`` overrides where it lives), the LoRA adapter and
    the interest head. Raises :class:`~uirl.errors.UirlError` naming what is missing."""
    directory = Path(directory)
    for name in (META_FILE, HEAD_FILE, ADAPTER_FILE):
        if not (directory / name).is_file():
            raise UirlError(f"{directory}: not a saved uirl model (no {name}; expected a run's final/ directory)")
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        run_config = dict(meta["run-config"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UirlError(f"{directory / META_FILE}: expected a JSON object with a run-config") from None
    if model_name:
        run_config["model-name"] = model_name
    elif "model-name" not in run_config and meta.get("base-model"):
        run_config["model-name"] = meta["base-model"]
    cfg = from_run_config(run_config)
    adapter = read_tensors(directory / ADAPTER_FILE)  # a damaged file fails before the slow build
    model, encoder = build_model(cfg)
    check_adapter_shapes(adapter, model, cfg, directory / ADAPTER_FILE, trained_on=meta.get("base-model"))
    try:
        result = set_peft_model_state_dict(model.encoder, adapter)
    except RuntimeError as exc:  # shapes differ: another LoRA rank or targets than the run config says
        raise UirlError(f"{directory}: the adapter does not match the run config's model "
                        f"({str(exc).splitlines()[-1].strip()})") from None
    if any("lora_" in k for k in getattr(result, "unexpected_keys", []) or []):
        raise UirlError(f"{directory}: the adapter does not match the model {cfg.model.name!r}")
    try:
        load_head(model, directory)
    except (KeyError, ValueError) as exc:
        raise UirlError(f"{directory / HEAD_FILE}: does not match the run config's interest model ({exc})") from None
    return model, encoder, cfg
