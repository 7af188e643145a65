"""Random-generator states as plain data for the manifest: nothing here ever unpickles.

A checkpoint folder may come from anywhere (a shared file system, a bucket, a downloaded run), so what it holds
must be data only. Each generator's state is stored as its numbers: Mersenne-Twister words as little-endian
uint32 in base64, torch's generator state as its raw bytes in base64, scalars as JSON numbers. `check` validates
an entry's shape and sizes without touching the generators, so a malformed or foreign entry is reported in one
line before anything starts.
"""

from __future__ import annotations

import base64
import binascii
import random
from typing import Any

import numpy as np
import torch

from . import CheckpointError

__all__ = ["capture", "restore", "check"]

_MT_WORDS = 624  # Mersenne Twister's state: 624 words, plus its position


def capture() -> dict[str, Any]:
    """This process's Python, numpy, torch (and CUDA, once initialised) generators."""
    version, words, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "words": _b64(np.asarray(words, dtype="<u4")), "gauss_next": gauss_next},
             "numpy": {"keys": _b64(np.asarray(keys, dtype="<u4")), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "torch": _b64(torch.get_rng_state().numpy())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state().numpy())
    return state


def restore(entry: dict[str, Any]) -> None:
    """Set this process's generators to a state `capture` produced (checked first)."""
    python, numpy, torch_state, cuda = check(entry)
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(torch_state)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def check(entry: Any) -> tuple[tuple, tuple, torch.Tensor, torch.Tensor | None]:
    """The decoded (python, numpy, torch, cuda) states of a manifest entry; CheckpointError if it is not one."""
    try:
        py, nps = entry["python"], entry["numpy"]
        words = _words(py["words"], _MT_WORDS + 1)
        gauss = py["gauss_next"]
        if not (isinstance(py["version"], int) and (gauss is None or isinstance(gauss, float))
                and words[-1] <= _MT_WORDS):
            raise ValueError("python")
        numpy = ("MT19937", _words(nps["keys"], _MT_WORDS), _int(nps["pos"], _MT_WORDS), _int(nps["has_gauss"], 1),
                 float(nps["cached_gaussian"]))
        torch_state = _bytes(entry["torch"], torch.get_rng_state().numel())
        cuda = _bytes(entry["cuda"], None) if "cuda" in entry else None
        return (py["version"], tuple(int(w) for w in words), gauss), numpy, torch_state, cuda
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise CheckpointError("its manifest's random-generator states are not the numbers parallel_yolo writes "
                              "(a damaged, foreign or hand-edited manifest); it is not loaded") from None


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode()


def _decode(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError(text)
    return base64.b64decode(text, validate=True)


def _words(text: Any, count: int) -> np.ndarray:
    raw = _decode(text)
    if len(raw) != 4 * count:
        raise ValueError(f"{len(raw)} bytes")
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


def _int(value: Any, most: int) -> int:
    if not isinstance(value, int) or not 0 <= value <= most:
        raise ValueError(value)
    return value


def _bytes(text: Any, size: int | None) -> torch.Tensor:
    raw = _decode(text)
    if size is not None and len(raw) != size:
        raise ValueError(f"{len(raw)} bytes")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
