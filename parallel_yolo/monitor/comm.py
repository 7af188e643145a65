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

`StrictDevice` uses the same wrapping to make a CPU run fail where a GPU run would: NCCL takes CUDA tensors only,
gloo takes CPU ones, so on CPU a tensor the code keeps in host memory (`.cpu()`, `torch.zeros(n)` without a device)
reaches a collective unnoticed. It marks such tensors, and what is computed from them alone, and refuses them in a
collective (`PARALLEL_YOLO_STRICT_DEVICE=1`, which `dist.process_group` reads; the tests set it).
"""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from .._torch_internals import collective_homes

__all__ = ["CommCounter", "StrictDevice", "HostTensorError", "ring_bytes", "STRICT_DEVICE"]

STRICT_DEVICE = "PARALLEL_YOLO_STRICT_DEVICE"

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


class _Wrapped:
    """`with wrapper:` replaces torch.distributed's tensor collectives by `self._call` around each, then restores
    them. A collective implemented by calling another (deprecated names, object collectives) is seen once."""

    _COLLECTIVES = _COLLECTIVES
    _PASS_THROUGH: tuple[str, ...] = ()
    """Collectives whose inner collectives are not looked at."""

    def __init__(self):
        self._saved: list[tuple[object, str, object]] = []
        self._inside = False

    def __enter__(self):
        homes = collective_homes()
        names = [(name, argument) for name, (argument, _) in self._COLLECTIVES.items()]
        for name, argument in names + [(name, None) for name in self._PASS_THROUGH]:
            original = getattr(homes[-1], name, None)
            if original is None:  # a name this torch does not have (all_gather_single before 2.13)
                continue
            wrapped = self._wrap(name, original, argument)
            for module in homes:  # callers use either name
                if getattr(module, name, None) is original:
                    self._saved.append((module, name, original))
                    setattr(module, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()

    def _wrap(self, name: str, original, argument: str | None):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            if self._inside:
                return original(*args, **kwargs)
            if argument is not None:
                self._call(name, argument, signature.bind(*args, **kwargs).arguments)
            self._inside = True
            try:
                return original(*args, **kwargs)
            finally:
                self._inside = False

        return wrapped

    def _call(self, name: str, argument: str, bound: dict) -> None:
        raise NotImplementedError


class CommCounter(_Wrapped):
    """`with counter:` counts what this rank sends, per collective; `counter.total` is the sum."""

    def __init__(self, world_size: int):
        super().__init__()
        self.world_size = world_size
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

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

    def _call(self, name: str, argument: str, bound: dict) -> None:
        value, group, splits = bound[argument], bound.get("group"), bound.get("input_split_sizes")
        if name == "all_to_all_single" and splits:  # uneven parts: all but this rank's own part leave it
            self.count(name, (sum(splits) - splits[dist.get_rank(group)]) * value.element_size())
            return
        tensors = value if isinstance(value, (list, tuple)) else [value]
        self.add(name, sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)),
                 dist.get_world_size(group) if dist.is_initialized() else None)


class HostTensorError(RuntimeError):
    """A tensor a GPU run would hold in host memory was handed to a collective (NCCL would refuse it)."""


_HOST = "_parallel_yolo_host"
_FACTORIES = frozenset(getattr(torch, name) for name in (
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "linspace", "eye", "rand", "randn", "randint",
    "randperm", "scalar_tensor"))
_SOURCES = _FACTORIES | {torch.Tensor.cpu, torch.Tensor.to}


class StrictDevice(_Wrapped):
    """`with StrictDevice():` marks host tensors (see the module's docstring) and refuses them in collectives. What
    an object collective does inside is not looked at: torch moves its tensors to the group's device itself."""

    _COLLECTIVES = {**_COLLECTIVES, **{name: (argument, None) for name, argument in (
        ("send", "tensor"), ("recv", "tensor"), ("irecv", "tensor"), ("gather", "tensor"), ("scatter", "tensor"),
        ("all_to_all", "input_tensor_list"))}}
    _PASS_THROUGH = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")

    def __init__(self):
        super().__init__()
        self._mode = _MarkHost()

    def __enter__(self) -> StrictDevice:
        super().__enter__()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        super().__exit__(*exc)

    def _call(self, name: str, argument: str, bound: dict) -> None:
        value = bound[argument]
        for tensor in value if isinstance(value, (list, tuple)) else [value]:
            if getattr(tensor, _HOST, False):
                raise HostTensorError(
                    f"dist.{name} was handed a tensor held in host memory ({tuple(tensor.shape)} "
                    f"{tensor.dtype}, made by .cpu() or a factory without device=): NCCL refuses it on GPUs; "
                    "create it on the strategy's device")


class _MarkHost(TorchFunctionMode):
    """Marks what a GPU run would hold in host memory: the results of `.cpu()` and of factories called without a
    device, and what is computed from such tensors alone (a CUDA op mixing them with device tensors either fails or
    yields a device tensor). A tensor moved or created with any device named is unmarked: on CPU the project's
    device and a library's accelerator name (DeepSpeed's "cpu") cannot be told apart, so "cpu" counts as a device.
    Tensors created elsewhere (model, gradients, data) count as device tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        host = _creates_host(func, args, kwargs) if func in _SOURCES else None
        if host is None:
            host = _all_host(args, kwargs)
        if host is not None:
            for tensor in _tensors(out if isinstance(out, (list, tuple)) else [out]):
                setattr(tensor, _HOST, host)
        return out


def _all_host(args, kwargs) -> bool | None:
    """True when every tensor argument is marked (and there is one); None otherwise: a result that is also an
    input (in place) keeps its mark, a new one has none."""
    found = False
    for value in (*args, *kwargs.values()):
        for tensor in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(tensor, torch.Tensor):
                if not getattr(tensor, _HOST, False):
                    return None
                found = True
    return True if found else None


def _creates_host(func, args, kwargs) -> bool | None:
    """True: `func` (one of _SOURCES) puts its result in host memory; False: on a device it names; None: it
    follows its inputs."""
    if func is torch.Tensor.cpu:
        return True
    if func is torch.Tensor.to:
        target = kwargs.get("device", args[1] if len(args) > 1 else None)
        return False if isinstance(target, (str, torch.device, torch.Tensor)) else None
    if func in _FACTORIES:
        if "device" in kwargs and kwargs["device"] is not None:
            return False
        return None if func in (torch.as_tensor, torch.tensor) and args and isinstance(args[0], torch.Tensor) else True
    return None


def _tensors(values) -> list[torch.Tensor]:
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found
