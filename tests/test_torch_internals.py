"""parallel_yolo/_torch_internals.py: each torch internal the project relies on is where the adapter expects it and
behaves as the adapter assumes; and setup.py pins the ranges the adapters' messages name."""

from __future__ import annotations

import inspect
import re
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT

from parallel_yolo import _torch_internals as internals
from parallel_yolo._internals import TESTED, LibraryChanged, require


def test_default_group_timeout_is_what_groups_made_later_take():
    from torch.distributed import distributed_c10d

    saved = distributed_c10d.default_pg_timeout, distributed_c10d.default_pg_nccl_timeout
    try:
        internals.set_default_group_timeout(timedelta(seconds=123))
        assert distributed_c10d.default_pg_timeout == distributed_c10d.default_pg_nccl_timeout == timedelta(seconds=123)
    finally:
        distributed_c10d.default_pg_timeout, distributed_c10d.default_pg_nccl_timeout = saved
    # new_group and the mesh's groups leave timeout=None to the module default, looked up when the group is made
    assert inspect.signature(dist.new_group).parameters["timeout"].default is None
    assert "default_pg_timeout" in inspect.getsource(distributed_c10d)


def test_fused_kernel_devices_include_cpu_and_cuda_and_fused_sgd_steps_there():
    devices = internals.fused_kernel_devices()
    assert {"cpu", "cuda"} <= set(devices)
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.ones(3)
    torch.optim.SGD([weight], lr=0.5, fused=True).step()
    assert torch.equal(weight.detach(), torch.full((3,), 0.5))


def test_dtensor_global_offset_of_a_row_shard(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    shard = distribute_tensor(torch.arange(12.0).view(4, 3), mesh, [Shard(0)])
    assert internals.dtensor_global_offset(shard) == (0, 0)


def test_fsdp_custom_collective_interfaces():
    from torch.distributed.fsdp import FSDPModule

    all_gather, reduce_scatter, alloc = internals.fsdp_comm_bases()
    for interface in (all_gather, reduce_scatter):
        assert callable(getattr(interface, "__call__")) and hasattr(interface, "allocate")
    assert hasattr(alloc, "allocate")
    assert {"set_custom_all_gather", "set_custom_reduce_scatter"} <= set(dir(FSDPModule))
    # gloo.py calls them with these arguments
    assert list(inspect.signature(all_gather.__call__).parameters)[1:] == ["output_tensor", "input_tensor", "group",
                                                                          "async_op"]
    assert list(inspect.signature(reduce_scatter.__call__).parameters)[1:] == ["output_tensor", "input_tensor",
                                                                              "group", "op", "async_op"]


def test_foreach_kernels():
    a, b = [torch.ones(2), torch.ones(3)], [torch.full((2,), 2.0), torch.full((3,), 2.0)]
    internals.foreach.add_(a, b, alpha=0.5)
    assert [t.tolist() for t in a] == [[2.0, 2.0], [2.0, 2.0, 2.0]]
    internals.foreach.mul_(a, 3.0)
    assert [t.tolist() for t in internals.foreach.add(a, b)] == [[8.0, 8.0], [8.0, 8.0, 8.0]]
    assert [t.tolist() for t in internals.foreach.mul(b, 0.5)] == [[1.0, 1.0], [1.0, 1.0, 1.0]]
    internals.foreach.lerp_(b, [torch.zeros(2), torch.zeros(3)], 0.25)
    assert [t.tolist() for t in b] == [[1.5, 1.5], [1.5, 1.5, 1.5]]


def test_composable_checkpoint_recomputes_inside_the_given_context_and_keeps_the_module():
    import contextlib

    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.SiLU())
    layer.f, names = -1, [n for n, _ in torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.SiLU()).named_parameters()]
    entered = []

    @contextlib.contextmanager
    def recompute():
        entered.append(True)
        yield

    internals.checkpoint_module(layer, context_fn=lambda: (contextlib.nullcontext(), recompute()))
    assert type(layer) is torch.nn.Sequential and layer.f == -1 and [n for n, _ in layer.named_parameters()] == names
    x = torch.randn(3, 4, requires_grad=True)
    layer(x).sum().backward()
    assert entered == [True] and x.grad is not None  # recomputed once, in backward, inside the context


def test_collectives_live_in_both_homes_comm_swaps():
    """comm.py swaps the functions in both modules; callers of either name must reach the same function."""
    from parallel_yolo.monitor.comm import _COLLECTIVES

    public, c10d = internals.collective_homes()
    present = [name for name in _COLLECTIVES if hasattr(c10d, name)]
    assert {"all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "isend"} <= set(present)
    assert all(getattr(public, name) is getattr(c10d, name) for name in present)


def test_ddp_buffer_sync_keyword():
    keyword = internals.ddp_no_forward_buffer_sync()
    assert list(keyword.values()) == [False]
    assert next(iter(keyword)) in inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters


def test_a_missing_internal_is_named_with_the_tested_range():
    with pytest.raises(LibraryChanged, match=r"torch \S+ no longer has torch\._nothing_here, which parallel_yolo "
                                             r"needs \(a test\); the suite ran against torch>=2\.11,<2\.15"):
        require(torch, "_nothing_here", "torch", "a test")


def test_setup_py_pins_the_ranges_the_messages_name():
    pins = dict(re.findall(r'"(torch|deepspeed|accelerate|ultralytics)([<>=!][^"]+)"', (ROOT / "setup.py").read_text()))
    assert pins == TESTED
