"""Bytes on the wire per silo and round, next to the encoder's own bytes.

A silo's reply carries the arrays :func:`uirl.federated.local_train` returns (the model's
:meth:`~uirl.model.InterestModel.trainable_state`); the server's message to a silo carries the
global adapter state (:meth:`~uirl.model.InterestModel.adapter_state`: LoRA A and B and the interest
model). Counted as the arrays' raw bytes; Flower's framing is left out.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from uirl.config import Config
from uirl.model.build import build_model


def message_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the arrays one message carries. The one place that says how a message is
    counted: where updates get compressed, this is what changes."""
    return sum(int(np.asarray(a).nbytes) for a in arrays.values())


def bytes_section(configs: Mapping[str, Config]) -> dict:
    """Per train mode (``modes``): the reply's and the downlink's bytes, and the encoder's parameter
    bytes (its frozen base; the LoRA adapters are counted in the messages)."""
    out = {}
    for mode, cfg in configs.items():
        model, _ = build_model(cfg)
        reply = {n: t.cpu().numpy() for n, t in model.trainable_state().items()}  # as local_train sends it
        downlink = {n: t.cpu().numpy() for n, t in model.adapter_state().items()}
        encoder = sum(p.numel() * p.element_size() for n, p in model.encoder.named_parameters() if "lora_" not in n)
        up, down = message_bytes(reply), message_bytes(downlink)
        out[mode] = {"model": cfg.model.name, "reply-bytes": up, "reply-arrays": len(reply), "downlink-bytes": down,
                     "encoder-bytes": encoder, "reply/encoder": up / encoder, "downlink/encoder": down / encoder}
    return {"counted-as": "raw array bytes (float32), without Flower's framing", "modes": out}
