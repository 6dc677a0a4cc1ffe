"""A disk cache of the frozen encoder's item vectors, shared by every process of a machine.

In cached training mode the encoder (its LoRA adapter included) does not change during a run, so an
item's vector is a function of the encoder weights and the item's public text only. Encoding a
catalogue of 10k titles with MiniLM takes about two minutes on one CPU thread; every silo process
and every run of a sweep would repeat it. The cache key is a hash of everything the vectors depend
on -- the model name, token limit, pooling, every encoder parameter that can differ between runs
(the LoRA arrays) and the (id, text) list -- so a stale entry can never be read. Files are written
to a temp name and renamed, so a reader sees a whole file or none.

Where: ``$UIRL_CACHE`` or ``~/.cache/uirl``, under ``item-vectors/``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from uirl.atomic import atomic_file
from uirl.model.batching import TextBank
from uirl.model.interest import InterestModel


def cache_dir() -> Path:
    return Path(os.environ.get("UIRL_CACHE") or Path.home() / ".cache" / "uirl") / "item-vectors"


def _key(model: InterestModel, bank: TextBank, ids: list[str], identity: str) -> str:
    h = hashlib.sha256(identity.encode())
    for name, p in sorted(model.encoder.named_parameters()):
        if "lora_" in name:
            h.update(name.encode())
            h.update(p.detach().cpu().numpy().tobytes())
    for item in ids:
        h.update(item.encode() + b"\x00" + np.asarray(bank.token_ids(item), dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def load_catalogue_vectors(model: InterestModel, bank: TextBank, *, identity: str, encode) -> None:
    """Fill ``bank.vectors`` with every catalogue item's encoder vector, from the disk cache when an
    entry for exactly this encoder and catalogue exists, else by ``encode(model, bank, ids)`` (then
    stored). ``identity`` names the encoder configuration (model name, token limit, pooling)."""
    ids = bank.item_ids
    if bank.vectors is None:
        bank.vectors = {}
    path = cache_dir() / f"{_key(model, bank, ids, identity)}.npy"
    if path.is_file():
        try:
            table = np.load(path, allow_pickle=False)
            if table.shape[0] == len(ids):
                bank.vectors.update(zip(ids, torch.from_numpy(table)))
                return
        except (OSError, ValueError):
            pass  # damaged: recompute and overwrite
    vectors = encode(model, bank, ids)
    table = torch.stack([vectors[i] for i in ids]).numpy().astype(np.float32)
    try:
        with atomic_file(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, table)
    except OSError:
        pass  # a read-only cache dir costs speed, never correctness
