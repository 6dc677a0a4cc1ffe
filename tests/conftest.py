"""Shared fixtures: tiny random encoders (BERT-style and Llama-style) saved to disk, built offline
from a config in well under a second, with a word-level tokenizer over the synthetic vocabulary."""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _vocab() -> list[str]:
    from uirl.data import SyntheticSpec, generate

    data = generate(SyntheticSpec(num_users=60, num_items=300, num_silos=2, seed=0))
    words = sorted({w for t in data.items["text"] for w in re.findall(r"[a-z]+", t.lower())})
    return SPECIAL + words


def _save_tiny(path, kind: str) -> str:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaModel

    vocab = _vocab()
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    else:
        model = LlamaModel(LlamaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=37,
                                       max_position_embeddings=64, pad_token_id=0))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(params=["bert", "llama"])
def tiny_model(request, tiny_bert, tiny_llama) -> str:
    return tiny_bert if request.param == "bert" else tiny_llama
