"""What travels between the server and the silos each round, and how many bytes it is.

Downlink (server -> silo, every train and evaluate message): the global model's **trainable**
arrays only (:func:`downlink`), plus the popularity prior when the run has one. Frozen arrays never
travel: the base encoder, FFA-LoRA's A matrices, and in ``train-mode = "cached"`` the whole LoRA
adapter. Each side builds them itself from the base model and the run's seed
(:func:`uirl.model.build.build_model`, bit-identical in every process), and the server still holds
the full adapter (A matrices included) for checkpoints, resume and the exported ``final/``.

Uplink (silo -> server, a training reply): the trainable arrays, or their update delta compressed
(run config ``compression``, :mod:`uirl.compression`).

:func:`wire_bytes` counts both for a config (array payload bytes, without the per-array framing
of Flower's messages); ``simulation/bench_wire.py`` prints them.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from uirl.compression import MODES, compress, payload_bytes
from uirl.config import Config
from uirl.model.build import build_model

T = TypeVar("T")


def downlink(state: dict[str, T], trainable: set[str]) -> dict[str, T]:
    """The arrays of the global ``state`` (numpy arrays, or Flower's ``Array`` records of them) a
    silo is sent: the ``trainable`` ones, all of them."""
    missing = sorted(trainable - set(state))
    if missing:
        raise KeyError(f"the global state lacks trainable arrays, e.g. {missing[0]}")
    return {name: state[name] for name in state if name in trainable}


def wire_payloads(cfg: Config) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """The arrays of one round's messages for ``cfg``'s model (built, not trained; the update delta
    is random, which changes no size): ``adapter`` (every LoRA and head array, what the server
    checkpoints), ``downlink`` (what a silo receives, less the popularity prior) and ``reply-<mode>``
    for every ``compression`` mode; and the base encoder's parameter bytes."""
    model, _ = build_model(cfg)
    adapter = {n: t.detach().cpu().numpy() for n, t in model.adapter_state().items()}
    sent = downlink(adapter, set(model.trainable_state()))
    encoder = sum(p.numel() * p.element_size() for n, p in model.encoder.named_parameters() if "lora_" not in n)
    rng = np.random.default_rng(0)
    delta = {n: rng.normal(size=v.shape).astype(np.float32) for n, v in sent.items()}
    out = {"adapter": adapter, "downlink": sent}
    out.update({f"reply-{mode}": compress(delta, mode, rng=rng) for mode in MODES})
    return out, int(encoder)


def wire_bytes(cfg: Config, *, catalogue_items: int = 0) -> dict[str, int | float]:
    """Bytes of one round's messages for ``cfg`` (:func:`wire_payloads`; array values only, without
    the per-array framing of Flower's messages, about 130 bytes an array):

    - ``encoder-bytes``: the base encoder's parameters (what full fine-tuning would send);
    - ``adapter-bytes``: every LoRA and head array, frozen ones too (what the server checkpoints);
    - ``downlink-bytes``: what a silo receives (:func:`downlink`), plus the popularity prior over
      ``catalogue_items`` items when the config has one; ``evaluate-extra-bytes``: what an evaluate
      message adds with ``local-prior`` (the released sum, float64 per item, and its noise);
      ``frozen-bytes``: what no longer travels;
    - ``reply-bytes-<mode>``: a training reply's arrays for every ``compression`` mode, and
      ``reply-fraction-<mode>`` its share of ``encoder-bytes``;
    - ``trainable-values``, ``arrays-sent``: how many numbers and arrays the downlink holds.
    """
    payloads, encoder = wire_payloads(cfg)
    adapter, sent = payload_bytes(payloads["adapter"]), payload_bytes(payloads["downlink"])
    prior = 4 * catalogue_items if cfg.model.popularity_prior else 0  # float32 per item
    out: dict[str, int | float] = {
        "encoder-bytes": encoder, "adapter-bytes": adapter, "downlink-bytes": sent + prior,
        "evaluate-extra-bytes": 8 * catalogue_items + 8 if cfg.model.local_prior else 0,
        "frozen-bytes": adapter - sent, "trainable-values": sum(v.size for v in payloads["downlink"].values()),
        "arrays-sent": len(payloads["downlink"])}
    for mode in MODES:
        out[f"reply-bytes-{mode}"] = payload_bytes(payloads[f"reply-{mode}"])
        out[f"reply-fraction-{mode}"] = out[f"reply-bytes-{mode}"] / encoder
    return out
