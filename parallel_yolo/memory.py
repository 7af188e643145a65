"""Per-rank memory accounting: bytes of the tensors this rank holds, by category, and peak resident memory.

Bytes are counted over unique storages, so views (DDP's gradient buckets, ZeRO's flat partitions) count once.
On CPU the peak is the process's peak resident set (getrusage) above the baseline taken when the strategy was
created (after imports, before the model was built); on GPU it is CUDA's peak allocated / reserved.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable

import torch

__all__ = ["current_rss", "peak_rss", "storage_bytes", "report", "release_freed"]


def release_freed() -> None:
    """Return freed heap pages to the OS (glibc). Called once the model is sharded: the full copy every rank built
    is gone by then, but glibc keeps such pages mapped, so resident memory would still count them (measured on
    yolov8x under ZeRO-3: 180 MiB per rank back)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc (musl): nothing to release this way


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int] | None = None) -> int:
    """Bytes of the distinct storages behind `tensors` (each storage once, also across calls sharing `seen`)."""
    seen = set() if seen is None else seen
    total = 0
    for tensor in tensors:
        if tensor is None or not isinstance(tensor, torch.Tensor):
            continue
        if hasattr(tensor, "to_local"):
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def report(*, params, grads, optimizer_state, ema, baseline: int, device: torch.device) -> dict[str, int]:
    seen: set[int] = set()
    out = {
        "params_bytes": storage_bytes(params, seen),
        "grads_bytes": storage_bytes(grads, seen),
        "optimizer_state_bytes": storage_bytes(optimizer_state, seen),
        "ema_bytes": storage_bytes(ema, seen),
    }
    if device.type == "cuda":
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(device))
    else:
        out.update(peak_rss_bytes=peak_rss(), baseline_rss_bytes=baseline,
                   peak_above_baseline_bytes=peak_rss() - baseline)
    return out
