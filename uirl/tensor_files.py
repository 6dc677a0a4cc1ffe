"""Reading ``.safetensors`` files (adapters, interest heads) with errors that name the file.

A safetensors file is an 8-byte header length, a JSON header (each array's name, dtype, shape and
byte range) and the arrays' bytes. safetensors checks on opening that the header parses and that
the byte ranges cover the rest of the file exactly, so a file cut short (a copy interrupted, a full
disk) or with bytes appended is caught before any array is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from uirl.errors import DataError

if TYPE_CHECKING:
    import torch


def _damaged(path: Path, exc: Exception) -> DataError:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return DataError(f"not a readable safetensors file ({detail}); the file is damaged or cut short "
                     "(copy it again from where it was written)", file=str(path))


def check_tensor_file(path: str | Path) -> list[str]:
    """The array names of the safetensors file ``path``, after checking its header and sizes
    (no array is loaded). Raises :class:`~uirl.errors.DataError` naming the file otherwise."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as fh:
            return list(fh.keys())
    except (SafetensorError, OSError) as exc:
        raise _damaged(path, exc) from None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every array of the safetensors file ``path`` as CPU tensors; a damaged file is a
    :class:`~uirl.errors.DataError` naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise _damaged(path, exc) from None
