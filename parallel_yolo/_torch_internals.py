"""Every torch name parallel_yolo uses that is not public API, and each assumption about torch's own code it makes;
tests/test_torch_internals.py has a test for each. Private modules are imported when a function is called, never
at import: a DDP run does not load FSDP's internals.
"""

from __future__ import annotations

import inspect
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

from ._internals import changed, require

__all__ = ["set_default_group_timeout", "fused_kernel_devices", "dtensor_global_offset", "fsdp_comm_bases",
           "foreach", "checkpoint_module", "collective_homes", "ddp_no_forward_buffer_sync"]


def set_default_group_timeout(timeout: timedelta) -> None:
    """Make `timeout` the default of every process group made later. Groups made by a library (DeepSpeed's copy of
    the world group, HSDP's mesh dimensions) take the module defaults `default_pg_timeout` (and, for NCCL,
    `default_pg_nccl_timeout`), not the world group's timeout."""
    from torch.distributed import distributed_c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        require(distributed_c10d, name, "torch", "the timeout of process groups that libraries create")
        setattr(distributed_c10d, name, timeout)


def fused_kernel_devices() -> list[str]:
    """Device types torch's fused SGD / Adam / AdamW kernels run on (torch's optimizers check the same list)."""
    from torch.utils import _foreach_utils

    return require(_foreach_utils, "_get_fused_kernels_supported_devices", "torch",
                   "which devices the fused optimizer kernels support")()


def dtensor_global_offset(param) -> tuple[int, ...]:
    """Where a DTensor's local shard starts in the full tensor, per dimension."""
    from torch.distributed.tensor import _utils

    compute = require(_utils, "compute_local_shape_and_global_offset", "torch",
                      "where an FSDP shard starts in its parameter, for checkpoint ranges")
    return tuple(compute(param.shape, param.device_mesh, param.placements)[1])


def fsdp_comm_bases() -> tuple[type, type, type]:
    """(AllGather, ReduceScatter, DefaultAllocMixin): the interfaces FSDP2's set_custom_all_gather and
    set_custom_reduce_scatter take, and the mixin that allocates buffers as FSDP's default comms do."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllocMixin
    except ImportError as error:
        raise changed("torch", f"FSDP2's custom collective interfaces ({error})",
                      "gloo's all-gathers and reduce-scatters as broadcasts and sends") from None
    return AllGather, ReduceScatter, DefaultAllocMixin


def _foreach() -> SimpleNamespace:
    why = "multi-tensor updates of DistributedMuSGD and the sharded EMA"
    return SimpleNamespace(**{name: require(torch, f"_foreach_{name}", "torch", why)
                              for name in ("add", "add_", "mul", "mul_", "lerp_")})


foreach = _foreach()
"""torch's multi-tensor kernels (`foreach.add_(tensors, others, alpha=)`), as torch's own optimizers call them."""


def checkpoint_module(module, *, context_fn) -> None:
    """torch's composable activation checkpoint on `module` (non-reentrant, through forward hooks: the module and its
    attributes stay as they are); `context_fn` returns (forward context, recompute context)."""
    try:
        from torch.distributed._composable import checkpoint
    except ImportError as error:
        raise changed("torch", f"torch.distributed._composable.checkpoint ({error})",
                      "activation checkpointing that keeps the layers' names and attributes") from None
    checkpoint(module, context_fn=context_fn, preserve_rng_state=True)


def collective_homes() -> tuple:
    """The modules whose collective functions comm.py swaps for a while: libraries call torch.distributed's
    collectives by looking them up there at call time (DeepSpeed and FSDP2 through `torch.distributed`, torch's own
    helpers through `distributed_c10d`), so a swap there sees every call."""
    from torch.distributed import distributed_c10d

    return dist, distributed_c10d


def ddp_no_forward_buffer_sync() -> dict[str, bool]:
    """DistributedDataParallel's keyword that stops it broadcasting rank 0's buffers at every forward (torch 2.13
    renamed broadcast_buffers to forward_sync_buffers)."""
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    for name in ("forward_sync_buffers", "broadcast_buffers"):
        if name in parameters:
            return {name: False}
    raise changed("torch", "DistributedDataParallel(broadcast_buffers= / forward_sync_buffers=)",
                  "each rank keeps its own BatchNorm statistics")
