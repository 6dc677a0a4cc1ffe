"""Shared fixtures: tiny random encoders (BERT-style and Llama-style) saved to disk, built offline
from a config in well under a second, with a word-level tokenizer over the synthetic vocabulary."""

from __future__ import annotations

import os
import re
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Cached item vectors (train-mode = cached) go to a per-session folder, never the user's cache.
os.environ.setdefault("UIRL_CACHE", tempfile.mkdtemp(prefix="uirl-test-cache-"))

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
    tok = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    assert len(tok) == len(vocab)
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    else:
        model = LlamaModel(LlamaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=37,
                                       max_position_embeddings=64, pad_token_id=0))
    _plant_topics(model.get_input_embeddings().weight, vocab)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def _plant_topics(embedding, vocab: list[str]) -> None:
    """Give the random model a little 'pretraining': words of one synthetic topic get nearby
    embeddings (a shared random topic direction + noise), as a real pretrained encoder would. With
    the default small init of the other layers, the residual stream carries this to the pooled
    text vector, so zero-shot ranking has signal and fine-tuning has something to build on."""
    import torch

    from uirl.data import TOPICS

    gen = torch.Generator().manual_seed(1)
    dim = embedding.shape[1]
    topic_of = {w: t for t, words in enumerate(TOPICS.values()) for w in words}
    directions = torch.randn(len(TOPICS), dim, generator=gen)
    with torch.no_grad():
        for i, word in enumerate(vocab):
            noise = 0.5 * torch.randn(dim, generator=gen)
            embedding[i] = noise + (directions[topic_of[word]] if word in topic_of else 0.0)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(params=["bert", "llama"])
def tiny_model(request, tiny_bert, tiny_llama) -> str:
    return tiny_bert if request.param == "bert" else tiny_llama
