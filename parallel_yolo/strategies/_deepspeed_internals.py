"""Every DeepSpeed internal parallel_yolo touches: attributes of ZeRO's optimizers and parameters, the layout of
their flat buffers, the comm backend whose functions strategies/gloo.py replaces on gloo. Each has a test in
tests/strategies/test_deepspeed_internals.py; a release that moves one raises LibraryChanged here, by name, instead
of checkpoints reading wrong ranges or the optimizer stepping wrong weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._internals import require

__all__ = ["fp32_partitions", "partition", "flat_groups", "gradient_buffers", "offset", "inside", "share_storage",
           "Zero3Param", "zero3_param", "zero3_flat_groups", "zero3_gradient_buffer", "zero3_gradient_views",
           "zero3_rank", "comm_backend", "look_up_collectives_at_call_time", "double_buffers", "forget_stale_groups",
           "full_shape", "whole_shaped"]


def _get(obj, name: str, why: str):
    return require(obj, name, "deepspeed", why)


# ---- stages 1 and 2 (DeepSpeedZeroOptimizer) ------------------------------------------------------------------------
def fp32_partitions(optimizer) -> list[torch.Tensor]:
    """Per param group, the fp32 flat partition of this rank that the inner torch optimizer steps, in a step() call
    of its own per group (`_optimizer_step`)."""
    return _get(optimizer, "single_partition_of_fp32_groups", "the tensors the optimizer steps")


def partition(optimizer, group: int) -> torch.Tensor:
    """This rank's partition of param group `group`'s flat weights (a view into `flat_groups`' buffer)."""
    parts = _get(optimizer, "parallel_partitioned_bit16_groups", "this rank's partition of the weights")
    process_group = _get(optimizer, "real_dp_process_group", "the ranks a param group is partitioned over")[group]
    return parts[group][dist.get_rank(group=process_group)]


def flat_groups(optimizer) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Per param group, (its parameters, the flat buffer their data are views into, in order)."""
    params = _get(optimizer, "bit16_groups", "the parameters of each param group")
    flats = _get(optimizer, "bit16_groups_flat", "the flat buffer each param group's weights live in")
    return list(zip(params, flats))


def gradient_buffers(optimizer) -> list[torch.Tensor]:
    """Gradient storage kept outside `param.grad`: the partition's averaged gradients and the contiguous gradient
    partition (memory accounting; the reduce buckets are communication buffers, as DDP's are)."""
    return _tensors(optimizer, ("averaged_gradients", "grads_in_partition"))


def _tensors(optimizer, attrs: tuple[str, ...]) -> list[torch.Tensor]:
    found = []
    for attr in attrs:
        value = _get(optimizer, attr, "gradient memory outside param.grad")
        values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for v in values:
            found.extend(v if isinstance(v, list) else [v])
    return [t for t in found if isinstance(t, torch.Tensor)]


def offset(tensor: torch.Tensor, flat: torch.Tensor) -> int:
    """Element offset of a view inside the flat buffer it was cut from (ZeRO's parameters and partitions are views
    into its flat buffers)."""
    return (tensor.data_ptr() - flat.data_ptr()) // tensor.element_size()


def inside(tensor: torch.Tensor, flat: torch.Tensor) -> bool:
    at = offset(tensor, flat)
    return 0 <= at and at + tensor.numel() <= flat.numel() \
        and tensor.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def share_storage(master: torch.Tensor, weights: torch.Tensor) -> None:
    """Make ZeRO's fp32 master partition the weights' partition itself, keeping the master tensor object (the inner
    optimizer's param_groups and state are keyed by it). DeepSpeed then copies master into weights after each step,
    a copy onto itself."""
    master.data = weights.data


# ---- stage 3 (DeepSpeedZeroOptimizer_Stage3 and its partitioned parameters) -----------------------------------------
@dataclass(frozen=True, slots=True)
class Zero3Param:
    local: torch.Tensor
    """This rank's equal, padded flat slice of the parameter (a view into a flat sub-group partition)."""
    numel: int
    shape: tuple[int, ...]
    persistent: bool
    """Small parameters ZeRO-3 keeps whole on every rank besides the slice."""


def zero3_param(param: torch.nn.Parameter) -> Zero3Param:
    why = "ZeRO-3's partition of a parameter"
    return Zero3Param(_get(param, "ds_tensor", why), _get(param, "ds_numel", why), tuple(_get(param, "ds_shape", why)),
                      bool(getattr(param, "ds_persist", False)))


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """A tensor's whole shape: a parameter ZeRO-3 has partitioned holds an empty tensor, its shape is `ds_shape`."""
    if not hasattr(tensor, "ds_id"):
        return tensor.shape
    return torch.Size(_get(tensor, "ds_shape", "a partitioned parameter's whole shape"))


@contextlib.contextmanager
def whole_shaped(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Inside, every partitioned parameter shows its whole shape (a broadcast view of one element: no memory), for
    code that reads shapes before the engine exists: Ultralytics' build_optimizer puts a parameter into MuSGD's
    Muon groups by its number of dimensions, which a partitioned parameter's empty tensor would hide."""
    saved = [(p, p.data) for p in params if hasattr(p, "ds_id")]
    for p, data in saved:
        p.data = torch.zeros((), dtype=data.dtype, device=data.device).expand(full_shape(p))
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


def zero3_flat_groups(optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sub-group, (the fp32 master partition the inner optimizer steps in a call of its own, the weights' flat
    partition it mirrors)."""
    masters = _get(optimizer, "fp32_partitioned_groups_flat", "the tensors the optimizer steps")
    weights = _get(optimizer, "fp16_partitioned_groups_flat", "the flat partitions the parameters' slices live in")
    return list(zip(masters, weights))


def zero3_gradient_buffer(optimizer) -> torch.Tensor:
    """The one buffer holding this rank's gradient partitions for the whole run."""
    return _get(optimizer, "grad_partitions_flat_buffer", "ZeRO-3's gradient partitions")


def zero3_gradient_views(optimizer) -> list[torch.Tensor]:
    """ZeRO-3's gradient partitions as the optimizer sees them (views into `zero3_gradient_buffer`; memory
    accounting)."""
    return _tensors(optimizer, ("averaged_gradients",))


def zero3_rank(optimizer) -> int:
    return dist.get_rank(group=_get(optimizer, "dp_process_group", "the ranks ZeRO-3 partitions over"))


# ---- communication --------------------------------------------------------------------------------------------------
def comm_backend(deepspeed):
    """DeepSpeed's process-wide torch backend (outlives each engine), or None before any engine exists. Its
    `all_gather_function`, `reduce_scatter_function` and `reduce` are what ZeRO calls."""
    module = _get(_get(deepspeed, "comm", "its comm module"), "comm", "its comm module")
    backend = _get(module, "cdb", "its comm backend")
    if backend is not None:
        for name in ("all_gather_function", "reduce_scatter_function", "reduce", "_reduce_op"):
            _get(backend, name, "the collectives ZeRO calls")
    return backend


# the process groups DeepSpeed creates once per process and keeps in module globals
_GROUP_GLOBALS = ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP")


def forget_stale_groups(deepspeed) -> list[str]:
    """DeepSpeed keeps the process groups it creates (a clone of the world, ...) for the life of the process; once
    the group they came from is destroyed (a run ended) and another starts in the same process (a second `train()`
    from Python, or a test), its engine would use the dead ones ("Group ... is not registered"). Forget those that
    the current group does not know, so DeepSpeed creates them anew; returns their names."""
    groups = _get(_get(deepspeed, "utils", "its utils module"), "groups", "the process groups it keeps")
    stale = []
    for name in _GROUP_GLOBALS:
        group = _get(groups, name, "a process group it creates once per process")
        try:
            if group is not None:
                dist.get_global_rank(group, 0)
        except (ValueError, RuntimeError):  # not a group of the current world
            setattr(groups, name, None)
            stale.append(name)
    return stale


def look_up_collectives_at_call_time(deepspeed) -> None:
    """DeepSpeed's backend keeps the all-gather and reduce-scatter functions torch had when it started, so swapping
    torch.distributed's (comm.CommCounter) would not see ZeRO's calls: point them at a lookup at call time instead
    (the same functions; left alone when gloo.py replaced them)."""
    backend = comm_backend(deepspeed)
    if backend is None:
        return
    for attr, name in (("all_gather_function", "all_gather_into_tensor"),
                       ("reduce_scatter_function", "reduce_scatter_tensor")):
        if getattr(backend, attr) is getattr(dist, name):
            setattr(backend, attr, _at_call_time(name))


def _at_call_time(name: str):
    def collective(*args, **kwargs):
        return getattr(dist, name)(*args, **kwargs)

    return collective


def double_buffers(optimizer) -> set[int]:
    """Storages of stage 1/2's two alternating gradient bucket buffers (`overlap_comm`), which the backward fills in
    turn: what was reduced from one may stay in flight while the other fills."""
    if not getattr(optimizer, "overlap_comm", False):
        return set()
    storages = set()
    for bucket in _get(optimizer, "ipg_buckets", "the alternating gradient buckets").values():
        buffer = _get(bucket, "buffer", "the alternating gradient buckets")
        if len(buffer) == 2:
            storages.update(b.untyped_storage().data_ptr() for b in buffer)
    return storages
