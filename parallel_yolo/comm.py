"""Count the bytes each rank sends, by wrapping the collectives.

DeepSpeed and FSDP2 call torch.distributed's Python collectives, so replacing those functions for a while sees
every call; DDP's reducer all-reduces from C++, so DDP reports its buckets through a communication hook
(`Strategy.count_communication`). Bytes are what one rank sends under the ring algorithms (what NCCL and gloo use
for large tensors), from the size S of the full tensor, on N ranks:
all-reduce 2(N-1)/N S, reduce-scatter and all-gather (N-1)/N S, broadcast (N-1)/N S, a point-to-point send S (on
gloo, ZeRO-1/2's reduce is a send from every rank but the owner, (N-1)/N S per rank over the N owners, and a
reduce-scatter is a send of each peer's chunk, (N-1)/N S; strategies/gloo.py). With those,
DDP sends 2(N-1)/N x the gradient bytes per step, ZeRO-1/2 the same (reduce-scatter + all-gather), ZeRO-3 and
FSDP 3(N-1)/N (parameters gathered for forward and again for backward).
"""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict

import torch
import torch.distributed as dist

__all__ = ["CommCounter", "ring_bytes"]

# collective -> (the argument holding the full-size tensor, or a list of its parts; ring factor for N ranks)
_COLLECTIVES = {
    "all_reduce": ("tensor", lambda n: 2 * (n - 1) / n),
    "reduce_scatter_tensor": ("input", lambda n: (n - 1) / n),
    "all_gather_into_tensor": ("output_tensor", lambda n: (n - 1) / n),
    "reduce_scatter_single": ("input", lambda n: (n - 1) / n),  # torch >= 2.13's names for the two above
    "all_gather_single": ("output_tensor", lambda n: (n - 1) / n),
    "broadcast": ("tensor", lambda n: (n - 1) / n),
    "reduce": ("tensor", lambda n: (n - 1) / n),
    "all_gather": ("tensor_list", lambda n: (n - 1) / n),
    "reduce_scatter": ("input_list", lambda n: (n - 1) / n),
    "isend": ("tensor", lambda n: 1),  # point to point (reduce and reduce-scatter on gloo): the whole tensor
    "all_to_all_single": ("input", lambda n: (n - 1) / n),  # MuSGD's exchange; counted exactly from its splits
}


def ring_bytes(collective: str, full_bytes: int, world_size: int) -> int:
    """Bytes one rank sends in `collective` over a tensor of `full_bytes` (see the module's docstring)."""
    _, factor = _COLLECTIVES[collective]
    return round(factor(world_size) * full_bytes)


class CommCounter:
    """`with counter:` counts what this rank sends, per collective; `counter.total` is the sum."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._saved: list[tuple[object, str, object]] = []
        self._inside = False  # a collective implemented by calling another (deprecated names) counts once

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def add(self, collective: str, full_bytes: int, group_size: int | None = None) -> None:
        self.count(collective, ring_bytes(collective, full_bytes, group_size or self.world_size))

    def count(self, collective: str, sent_bytes: int) -> None:
        """One call that sent `sent_bytes` from this rank."""
        self.bytes[collective] += sent_bytes
        self.calls[collective] += 1

    def __enter__(self) -> CommCounter:
        from torch.distributed import distributed_c10d

        for name, (argument, _) in _COLLECTIVES.items():
            original = getattr(distributed_c10d, name)
            wrapped = self._wrap(name, original, argument)
            for module in (dist, distributed_c10d):  # callers use either name
                if getattr(module, name, None) is original:
                    self._saved.append((module, name, original))
                    setattr(module, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()

    def _wrap(self, name: str, original, argument: str):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            if self._inside:
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs).arguments
            value = bound[argument]
            tensors = value if isinstance(value, (list, tuple)) else [value]
            group = bound.get("group")
            splits = bound.get("input_split_sizes")
            if name == "all_to_all_single" and splits:  # uneven parts: all but this rank's own part leave it
                self.count(name, (sum(splits) - splits[dist.get_rank(group)]) * value.element_size())
            else:
                self.add(name, sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)),
                         dist.get_world_size(group) if dist.is_initialized() else None)
            self._inside = True
            try:
                return original(*args, **kwargs)
            finally:
                self._inside = False

        return counted
