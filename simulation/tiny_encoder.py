"""A tiny random BERT-style encoder for smoke-test sweeps (built in a second, nothing downloaded).

Its word embeddings get a planted topic structure (words of one synthetic topic share a random
direction), so zero-shot ranking has some signal and training has something to improve, the way a
pretrained encoder would. Numbers from it say whether the machinery works, not how good a model is.
"""

from __future__ import annotations

import re
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def word_vocabulary() -> list[str]:
    """The special tokens, then every word of the synthetic catalogue's texts and topics, sorted."""
    from uirl.data import TOPICS, SyntheticSpec, generate

    data = generate(SyntheticSpec(num_users=60, num_items=2000, num_silos=2, seed=0))
    return SPECIAL + sorted({w for t in data.items["text"] for w in re.findall(r"[a-z]+", t.lower())}
                            | {w for words in TOPICS.values() for w in words})


def save_tiny_encoder(path: str | Path, *, seed: int = 0) -> str:
    """Write the model and its word-level tokenizer to ``path`` (reused if already there)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from uirl.data import TOPICS

    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    vocab = word_vocabulary()
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0))
    gen = torch.Generator().manual_seed(seed + 1)
    emb = model.get_input_embeddings().weight
    topic_of = {w: t for t, words in enumerate(TOPICS.values()) for w in words}
    directions = torch.randn(len(TOPICS), emb.shape[1], generator=gen)
    with torch.no_grad():
        for i, word in enumerate(vocab):
            emb[i] = 0.5 * torch.randn(emb.shape[1], generator=gen) + (
                directions[topic_of[word]] if word in topic_of else 0.0)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)
