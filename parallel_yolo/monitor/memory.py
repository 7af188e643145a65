"""Per-rank memory accounting: bytes of the tensors this rank holds, by category, the ZeRO formula for them, and
peak memory.

Bytes are counted over unique storages, so views (DDP's gradient buckets, ZeRO's flat partitions) count once.
On CPU the peak is the process's peak resident set (VmHWM, which `reset_peak` restarts) above the baseline taken
when the strategy was created (after imports, before the model was built); on GPU it is CUDA's peak allocated /
reserved.
"""

from __future__ import annotations

import contextlib
import functools
import resource
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

__all__ = ["current_rss", "peak_rss", "peak_bytes", "rank_peaks", "write_report", "reset_peak", "storage_bytes",
           "report", "formula", "release_freed", "returning_freed_memory", "release_pages", "load_meta_kernels",
           "strategy_formula", "OPTIMIZER_STATES", "CATEGORIES"]

CATEGORIES = ("params", "master", "grads", "optimizer_state", "ema")
"""Model states by category; `master`: a separate full-precision copy of the weights (zero3_offload's, in CPU memory)."""

OPTIMIZER_STATES = {"SGD": 1, "Adam": 2, "AdamW": 2, "Adamax": 2, "NAdam": 2, "RAdam": 2, "RMSprop": 2, "MuSGD": 1}
"""Tensors of optimizer state per parameter, each the parameter's size, as Ultralytics' build_optimizer sets each up
(SGD: momentum; the Adam family: two moments; RMSprop, given a momentum: square average and momentum; MuSGD: a
momentum, plus its SGD half's momentum for the parameters of its muon groups, `formula(muon_numel=)`)."""


@functools.cache
def _glibc():
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
        except OSError:
            pass
    return None  # not glibc (musl, macOS): nothing to tune this way


def release_freed() -> None:
    """Return freed heap pages to the OS (glibc). Called once the model is sharded: the full copy every rank built
    is gone by then, but glibc keeps such pages mapped, so resident memory would still count them (measured on
    yolov8x under ZeRO-3: 180 MiB per rank back)."""
    if libc := _glibc():
        libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's malloc.h
_DYNAMIC_MMAP_CEILING = 32 * 2**20  # where glibc's sliding thresholds end up once large blocks were freed:
_DYNAMIC_TRIM_CEILING = 2 * _DYNAMIC_MMAP_CEILING  # it keeps the trim threshold at twice the mmap threshold


@contextlib.contextmanager
def returning_freed_memory(threshold: int = 64 * 1024) -> Iterator[None]:
    """Inside, glibc gives every allocation of `threshold` bytes or more its own mapping, unmapped when freed, so
    resident memory follows the live tensors, as CUDA's peak allocated bytes do. By default glibc slides that
    threshold up to 32 MiB as large blocks are freed and serves them from its heap, whose freed pages stay resident:
    a peak of resident memory then also counts holes that depend on the order of allocations (yolov8x, 2 processes,
    fsdp: 1684 MiB above baseline that way, 1241 MiB this way). Enter before the heap has grown: requests that fit
    a hole of a grown heap are served from it whatever the threshold. Inside is slower (a page fault for every fresh
    page): measure times outside. On exit the thresholds are set to glibc's steady state."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold)  # else each arena keeps up to 64 MiB free at its top
        libc.malloc_trim(0)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_MMAP_CEILING)
            libc.mallopt(_M_TRIM_THRESHOLD, _DYNAMIC_TRIM_CEILING)


_MADV_DONTNEED = 4  # Linux's number, from <sys/mman.h>


def release_pages(tensor: torch.Tensor) -> None:
    """Give the whole memory pages under a CPU tensor back to the OS (madvise MADV_DONTNEED): the tensor keeps its
    address, and those pages read as zeros and are resident again only once written. For a buffer that is
    written before it is read again, like ZeRO-3's gradient partitions between two steps; only for anonymous memory
    (a file-backed tensor would read its file again). A no-op elsewhere than on Linux's glibc, on a device, or for
    pinned memory (page-locked for DMA: its pages must stay)."""
    import ctypes

    libc = _glibc()
    if libc is None or tensor.device.type != "cpu" or tensor.is_pinned():
        return
    page = resource.getpagesize()
    start = -(-tensor.data_ptr() // page) * page  # inward to whole pages: the edges may hold other tensors' bytes
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_DONTNEED))


@functools.cache
def load_meta_kernels() -> None:
    """Load torch's meta-device kernels now. The first operation on the meta device (sharded initialisation's
    stride probe, recompute's activation forecast) imports torch's Python decompositions: measured ~150 MiB
    resident, once per process. Called before a baseline is taken, so that what is measured above it is tensors,
    not code."""
    from torch.nn import functional as F

    x = torch.zeros(1, 4, 8, 8, device="meta")
    F.silu(F.batch_norm(F.conv2d(x, torch.zeros(4, 4, 3, 3, device="meta"), padding=1),
                        torch.zeros(4, device="meta"), torch.ones(4, device="meta"), training=False))
    F.max_pool2d(F.interpolate(torch.cat([x, x], 1), scale_factor=2.0), 3, 1, 1)
    (x.flatten(2) @ x.flatten(2).transpose(1, 2)).softmax(-1)


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """Peak resident bytes since the start or the last reset_peak()."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: since the start, KiB


def peak_bytes(device: torch.device) -> int:
    """This process's peak memory so far: CUDA's peak allocated bytes on a GPU, the peak resident set on CPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()


def rank_peaks(device: torch.device, *, rank: int, world_size: int) -> torch.Tensor:
    """This rank's peak memory (MiB) times `world_size` in slot `rank` of a zero vector on `device`: averaged over
    ranks in an all-reduce that runs anyway (the trainer's, of the step's losses), every slot arrives as that rank's
    peak, with no collective of its own."""
    peaks = torch.zeros(world_size)
    peaks[rank] = peak_bytes(device) / 2**20 * world_size
    return peaks.to(device)


def write_report(strategy, ema, path: Path) -> None:
    """memory.json (rank 0): what every rank holds, by category, and its peak memory (a collective)."""
    import json

    reports = strategy.gather_object(strategy.memory_report(ema))
    if strategy.is_main:
        path.write_text(json.dumps({"strategy": strategy.name, "world_size": strategy.world_size, "ranks": reports},
                                   indent=2))


def reset_peak(device: torch.device | None = None) -> None:
    """Start a new peak measurement (several measurements in one process: `parallel-yolo compare`)."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: resets the peak resident set to the current one
    except OSError:
        pass


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


def report(*, params, master, grads, optimizer_state, ema, baseline: int, device: torch.device) -> dict[str, int]:
    seen: set[int] = set()
    out = {f"{name}_bytes": storage_bytes(tensors, seen)
           for name, tensors in zip(CATEGORIES, (params, master, grads, optimizer_state, ema))}
    if device.type == "cuda":
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(device))
    else:
        out.update(peak_rss_bytes=peak_rss(), baseline_rss_bytes=baseline,
                   peak_above_baseline_bytes=peak_rss() - baseline)
    return out


def strategy_formula(strategy, *, numel: int, optimizer: str, muon_numel: int = 0) -> dict[str, int]:
    """`formula` for the ranks, sharding and master copy of `strategy` (a Strategy)."""
    return formula(numel=numel, world_size=strategy.shard_ranks(), sharded=strategy.sharded,
                   master=strategy.master_copy, optimizer=optimizer, muon_numel=muon_numel)


def formula(*, numel: int, world_size: int, sharded: frozenset[str], master: bool, optimizer: str,
            element_bytes: int = 4, muon_numel: int = 0) -> dict[str, int]:
    """The ZeRO paper's model-state bytes per rank for `numel` parameters, by category.

    `sharded`: the categories the strategy splits over the ranks (ZeRO-1: optimizer state; ZeRO-2: + gradients;
    ZeRO-3 / FSDP: + parameters, and then our EMA too). `master`: a separate fp32 copy of the weights, sharded like
    the optimizer state. Our precision policies keep weights, gradients and optimizer state in fp32 (autocast
    computes in low precision), so every state is `element_bytes` per element: with the paper's Adam in mixed
    precision that would be 2 + 2 + 12 bytes per parameter; here Adam is 4 + 4 + 8 (+ 4 master under zero3_offload).
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"no formula for optimizer {optimizer}")
    full = {"params": numel, "master": numel if master else 0, "grads": numel,
            "optimizer_state": OPTIMIZER_STATES[optimizer] * numel + (muon_numel if optimizer == "MuSGD" else 0),
            "ema": numel}
    shards = {"master": "optimizer_state", "ema": "params"}  # each sharded like the state it follows
    return {k: element_bytes * (-(-v // world_size) if shards.get(k, k) in sharded else v) for k, v in full.items()}
