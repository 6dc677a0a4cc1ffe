"""Compressing a silo's update for the wire (run config ``compression``), and undoing it on the server.

What is compressed is the silo's **update delta** -- its new trainable arrays minus the global arrays
it received -- not the weights themselves: a delta is small and centred on zero, so a coarse number
format loses little of it, and the server adds it back onto the global arrays it holds anyway.

Modes (:data:`MODES`):

- ``none``: the new trainable arrays travel as they are (float32), exactly as without this module;
  nothing is lost.
- ``fp16``: the delta as float16 (half the bytes), rounded to the nearest float16: a relative error
  of at most 2**-11 per value (plus 2**-25 absolute below float16's normal range). Round-to-nearest
  is unbiased enough at that precision; no randomness is needed.
- ``int8``: the delta in blocks of :data:`BLOCK` consecutive values (the array flattened in C
  order), each block with its own symmetric scale ``max|x| / 127`` sent next to it as float32
  (``<name>`` + :data:`SCALE_SUFFIX`), the values as int8 in [-127, 127]: about a quarter of the
  bytes (a scale costs 4 bytes per 256 values). Blocks rather than rows, because LoRA's B matrices
  have rows of only ``lora-r`` values, where a per-row scale would cost half as much as the values.

  The silo rounds **stochastically**: ``q = floor(x / scale + u)`` with ``u`` uniform in [0, 1), so
  ``E[q x scale] = x`` exactly and each value is off by less than one step (``scale``). Rounding to
  the nearest step would halve the worst error (``scale / 2``) but biases every value towards the
  grid -- in particular every value smaller than half a step becomes 0, in every silo, every round --
  and those biases add up in the average over silos and rounds; unbiased errors average out.
  :func:`compress` rounds to nearest when given no random generator (for tests and comparisons).

Bounds. A decompressed int8 value never exceeds the largest magnitude of its block, so a silo whose
true update respects the server's norm bound (``max-update-norm``, whose ``auto`` value bounds
every coordinate alike) still respects it after int8; fp16 may round up by 2**-11 relative, inside
the bound's rounding slack.

Privacy. Compression runs on the silo after its DP-SGD round, on the already-noised update: it is
post-processing of a differentially private output and costs no privacy (the rounding randomness
need not be secret, and is seeded for reproducibility).

The server decompresses (:func:`decode_update`) before any check or aggregation, after checking the
payload's form (:func:`check_payload`): names, dtypes, shapes, and every scale finite and >= 0.
"""

from __future__ import annotations

import math

import numpy as np

from uirl.errors import ConfigError, UirlError

#: The run config's ``compression`` values.
MODES = ("none", "fp16", "int8")
#: Values per int8 scale.
BLOCK = 256
#: The name of an int8 array's scales: the array's name plus this (never part of a parameter name).
SCALE_SUFFIX = ":scale"
_LEVELS = 127  # symmetric int8: -127 .. 127 (-128 is never sent)


class PayloadError(UirlError):
    """A compressed update that is not what an honest silo sends; the message says why, on one line."""


def _blocks(flat: np.ndarray) -> np.ndarray:
    """``flat`` zero-padded to whole blocks, shape (blocks, BLOCK)."""
    count = max(1, math.ceil(flat.size / BLOCK))
    padded = np.zeros(count * BLOCK, dtype=np.float64)
    padded[:flat.size] = flat
    return padded.reshape(count, BLOCK)


def num_scales(shape: tuple[int, ...]) -> int:
    """How many int8 scales an array of ``shape`` travels with."""
    return max(1, math.ceil(math.prod(shape) / BLOCK))


def _quantize(values: np.ndarray, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    blocks = _blocks(values.astype(np.float64).ravel())
    scale = np.abs(blocks).max(axis=1) / _LEVELS
    safe = np.where(scale > 0, scale, 1.0)[:, None]  # an all-zero block: q = 0 whatever the scale
    steps = blocks / safe
    q = np.floor(steps + rng.random(steps.shape)) if rng is not None else np.rint(steps)
    q = np.clip(q, -_LEVELS, _LEVELS).astype(np.int8).ravel()[:values.size].reshape(values.shape)
    return q, scale.astype(np.float32)


def _dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    blocks = _blocks(q.astype(np.float64).ravel()) * scale.astype(np.float64)[:, None]
    return blocks.ravel()[:q.size].reshape(q.shape)


def compress(delta: dict[str, np.ndarray], mode: str, *, rng: np.random.Generator | None = None
             ) -> dict[str, np.ndarray]:
    """The payload that carries ``delta`` (name -> array) in ``mode``: ``fp16`` one float16 array per
    name; ``int8`` one int8 array per name plus its float32 scales (:data:`SCALE_SUFFIX`), rounded
    stochastically with ``rng`` or to nearest without; ``none`` the delta as float32.
    Raises :class:`PayloadError` for a delta that is not finite, or too large for float16."""
    _check_mode(mode)
    out: dict[str, np.ndarray] = {}
    for name, value in delta.items():
        value = np.asarray(value)
        if not np.isfinite(value).all():
            raise PayloadError(f"{name}: non-finite values cannot be compressed")
        if mode == "none":
            out[name] = value.astype(np.float32)
        elif mode == "fp16":
            with np.errstate(over="ignore"):
                half = value.astype(np.float16)
            if not np.isfinite(half).all():
                raise PayloadError(f"{name}: values beyond float16's range")
            out[name] = half
        else:
            out[name], out[name + SCALE_SUFFIX] = _quantize(value, rng)
    return out


def decompress(payload: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """The delta (float64) a payload of :func:`compress` carries; assumes a payload that passed
    :func:`check_payload`."""
    _check_mode(mode)
    if mode != "int8":
        return {name: np.asarray(value, dtype=np.float64) for name, value in payload.items()}
    return {name: _dequantize(np.asarray(value), np.asarray(payload[name + SCALE_SUFFIX]))
            for name, value in payload.items() if not name.endswith(SCALE_SUFFIX)}


def check_payload(payload: dict[str, np.ndarray], like: dict[str, np.ndarray], mode: str) -> None:
    """Raise :class:`PayloadError` unless ``payload`` has exactly the form :func:`compress` gives a
    delta shaped as ``like`` (name -> the global array) in ``mode``: the names, the dtype and shape
    of every array, and for ``int8`` the values in [-127, 127] and every scale finite and >= 0.
    Values are checked after decompression, like any update (finite, within the norm bound)."""
    _check_mode(mode)
    dtype = {"none": np.float32, "fp16": np.float16, "int8": np.int8}[mode]
    expected = set(like) | ({n + SCALE_SUFFIX for n in like} if mode == "int8" else set())
    if set(payload) != expected:
        extra, missing = sorted(set(payload) - expected), sorted(expected - set(payload))
        raise PayloadError(f"array names differ from a {mode} update's (extra {[str(n)[:60] for n in extra[:3]]}, "
                           f"missing {missing[:3]})")
    for name, ref in like.items():
        value = payload[name]
        if value.dtype != dtype or value.shape != ref.shape:
            raise PayloadError(f"{name}: {value.dtype}{list(value.shape)}, expected "
                               f"{np.dtype(dtype)}{list(ref.shape)}")
        if mode != "int8":
            continue
        if value.size and int(value.min()) < -_LEVELS:
            raise PayloadError(f"{name}: int8 value -128 (a symmetric int8 update uses -127 .. 127)")
        scale = payload[name + SCALE_SUFFIX]
        if scale.dtype != np.float32 or scale.shape != (num_scales(ref.shape),):
            raise PayloadError(f"{name}{SCALE_SUFFIX}: {scale.dtype}{list(scale.shape)}, expected "
                               f"float32[{num_scales(ref.shape)}]")
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise PayloadError(f"{name}{SCALE_SUFFIX}: scales must be finite and >= 0")


def encode_update(new: dict[str, np.ndarray], received: dict[str, np.ndarray], mode: str, *,
                  rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """What a silo sends for its new trainable arrays ``new``, given the global arrays ``received``:
    ``new`` itself for ``none``, else :func:`compress` of ``new - received``."""
    _check_mode(mode)
    if mode == "none":
        return new
    return compress({n: np.asarray(v, np.float64) - np.asarray(received[n], np.float64) for n, v in new.items()},
                    mode, rng=rng)


def decode_update(payload: dict[str, np.ndarray], received: dict[str, np.ndarray], names: set[str], mode: str
                  ) -> dict[str, np.ndarray]:
    """The new trainable arrays (``names``) a silo's ``payload`` stands for, in the dtypes of the
    global arrays ``received`` it was computed from. ``none``: the payload as it is (its names,
    dtypes and values are checked as an update, :func:`uirl.aggregation.check_update`); else the
    payload is checked (:func:`check_payload`, raising :class:`PayloadError`) and its delta added
    onto ``received``."""
    _check_mode(mode)
    if mode == "none":
        return payload
    like = {n: received[n] for n in names}
    check_payload(payload, like, mode)
    return {n: (np.asarray(received[n], np.float64) + d).astype(like[n].dtype)
            for n, d in decompress(payload, mode).items()}


def payload_bytes(payload: dict[str, np.ndarray]) -> int:
    """The bytes of a payload's array values (what the wire carries, less per-array framing)."""
    return sum(int(np.asarray(v).nbytes) for v in payload.values())


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"expected one of {', '.join(MODES)}", field="compression", value=mode)
