"""CPU runs only: gloo's slow collectives replaced by others that move the same bytes per rank. The one module that
replaces a library's comm functions; applied by `Strategy.setup` when the process group is gloo and the
`gloo_collectives` key is on (the default; `gloo_collectives=false` or PARALLEL_YOLO_GLOO_COLLECTIVES=0 switches it
off), never on NCCL, where the libraries' own collectives run in CUDA streams beside the compute.

- DeepSpeed (ZeRO-1/2/3): its all-gather as one broadcast from each rank, its reduce-scatter and its reduce as sends
  (`_deepspeed`).
- FSDP2: its all-gathers as broadcasts and its reduce-scatters as sends, through its custom-collective hooks
  (`_fsdp`).
- DDP: nothing (gloo's all-reduce runs beside the backward in gloo's threads).

Measured on this 2-core machine, 2 processes: gloo's all_gather_into_tensor of 130 MiB per rank takes 0.26 s, one
broadcast from each rank into its slice 0.07 s. Gloo's reduce_scatter_tensor (AVG, min of 5) of 8 / 32 / 130 MiB
input per rank takes 14 / 51 / 173 ms, sending each peer its chunk and adding what arrives 3 / 12 / 89 ms (4
processes: 14 / 68 / 312 against 6 / 35 / 181 ms).
"""

from __future__ import annotations

import os
import sys
import weakref

import torch
import torch.distributed as dist

__all__ = ["apply", "enabled", "Works", "all_gather_by_broadcasts", "reduce_scatter_by_sends", "ReduceBySends",
           "SWITCH"]

SWITCH = "PARALLEL_YOLO_GLOO_COLLECTIVES"
"""Environment variable: `0` makes the `gloo_collectives` key default to off (a whole test suite with the libraries'
own collectives)."""


def enabled(key: bool | None) -> bool:
    """The `gloo_collectives` key: None means on unless the environment's SWITCH says 0."""
    return key if key is not None else os.environ.get(SWITCH, "1") != "0"


def apply(strategy) -> None:
    """Point the strategy's library at the faster collectives, or, switched off, back at its own (DeepSpeed's
    backend is one per process and outlives each engine). Only on gloo."""
    if not (dist.is_initialized() and dist.get_backend() == "gloo"):
        return
    on = enabled(strategy.options.get("gloo_collectives"))
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None and isinstance(strategy.model, deepspeed.DeepSpeedEngine):
        _deepspeed(deepspeed, strategy.model, strategy.optimizer, on)
    elif on and "torch.distributed.fsdp" in sys.modules:  # loaded by a strategy that uses it, never for DDP
        _fsdp(strategy.model)


class Works(dist.Work):
    """One handle for several asynchronous operations. A torch Work, because FSDP waits only for those."""

    def __init__(self, works):
        super().__init__()
        self.works = works

    def wait(self, *args, **kwargs) -> bool:
        for work in self.works:
            work.wait()
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)


def all_gather_by_broadcasts(output_tensor, input_tensor, group=None, async_op=False):
    """torch's all_gather_into_tensor (a flat output holding every rank's input in rank order), as one broadcast
    from each rank into its slice."""
    world = dist.get_world_size(group)
    slices, rank = output_tensor.view(world, -1), dist.get_rank(group)
    if slices[rank].data_ptr() != input_tensor.data_ptr():  # DeepSpeed and FSDP often gather in place
        slices[rank].copy_(input_tensor.view(-1))
    handle = Works([dist.broadcast(slices[r], src=_global(group, r), group=group, async_op=True)
                    for r in range(world)])
    if async_op:
        return handle
    handle.wait()
    return None  # as torch's synchronous collectives


def reduce_scatter_by_sends(output_tensor, input_tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """torch's reduce_scatter_tensor for SUM and AVG, synchronous (other ops and asynchronous calls go to torch's):
    rank r's output is the sum over ranks of chunk r of their input. Each rank sends every peer its chunk and adds
    what it receives to its own, in rank order; AVG then divides by the world size, as gloo does. The output may
    be the rank's own chunk of the input."""
    if async_op or op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks = input_tensor.view(world, -1)
    received = {r: torch.empty_like(output_tensor) for r in range(world) if r != rank}
    sends = [dist.isend(chunks[r].view_as(output_tensor), _global(group, r), group=group) for r in received]
    receives = [dist.irecv(buffer, _global(group, r), group=group) for r, buffer in received.items()]
    for work in receives:
        work.wait()
    mine = chunks[rank].view_as(output_tensor)
    if output_tensor.data_ptr() != mine.data_ptr():  # ZeRO-3 reduce-scatters in place
        output_tensor.copy_(mine)
    for r in sorted(received):
        output_tensor.add_(received[r])
    if op == dist.ReduceOp.AVG:
        output_tensor.div_(world)
    for work in sends:
        work.wait()
    return None  # as torch's synchronous collectives


class ReduceBySends:
    """DeepSpeed's reduce as point-to-point transfers: each rank but the destination sends its tensor, the
    destination receives them and adds.

    ZeRO-1/2 call reduce from the backward hooks, once per owner of a slice of each full gradient bucket, and wait
    for it before the backward goes on; DDP's all-reduce runs beside the backward in gloo's threads. With sends only
    the owner waits, and only for the transfer: a sender goes on at once, and its send has to be finished only
    before the bucket's buffer is refilled. With `overlap_comm` DeepSpeed alternates two bucket buffers, so that is
    when the next bucket is reduced: a send from one of the buffers is waited for then (or at the end of backward,
    `finish`), any other send before returning. Measured (yolov8x, 320 px, batch 4, 2 processes, this 2-core
    machine): backward 3.35 -> 3.26 s, DDP's 3.27 s; three alternating `parallel-yolo compare` runs each way, median
    step zero1 5.00 -> 4.94 s, zero2 5.14 -> 4.98 s. A single 8 MB transfer takes 5 ms as a send and 9 ms as gloo's
    reduce."""

    def __init__(self, original, torch_op, optimizer):
        self.original, self.torch_op = original, torch_op
        self.optimizer = weakref.ref(optimizer)  # the backend outlives the engine; this must not keep it alive
        self.pending: list[tuple[dist.Work, int, torch.Tensor]] = []  # (send, buffer storage, tensor kept alive)

    def __call__(self, tensor, dst, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if async_op or self.torch_op(op) != dist.ReduceOp.SUM or not tensor.is_contiguous():
            self.finish()
            return self.original(tensor=tensor, dst=dst, op=op, group=group, async_op=async_op)
        storage = tensor.untyped_storage().data_ptr()
        self.finish(keep=storage)  # the other bucket buffer is refilled once this reduce returns
        if dist.get_rank() == dst:
            peers = [r for r in dist.get_process_group_ranks(group or dist.group.WORLD) if r != dst]
            received = [torch.empty_like(tensor) for _ in peers]
            works = [dist.irecv(buf, src=peer, group=group) for buf, peer in zip(received, peers)]
            for work, buf in zip(works, received):
                work.wait()
                tensor.add_(buf)
        else:
            self.pending.append((dist.isend(tensor, dst, group=group), storage, tensor))
            if storage not in self._double_buffers():
                self.finish()
        return None  # as torch's synchronous collectives

    def _double_buffers(self) -> set[int]:
        """Storages of DeepSpeed's alternating gradient bucket buffers, whose sends may stay in flight."""
        from ._deepspeed_internals import double_buffers

        return double_buffers(self.optimizer())

    def finish(self, keep: int | None = None) -> None:
        """Wait for the sends in flight, except those from the buffer whose storage is `keep`."""
        for work, storage, _ in self.pending:
            if storage != keep:
                work.wait()
        self.pending = [item for item in self.pending if item[1] == keep]


def _global(group, rank: int) -> int:
    return dist.get_global_rank(group or dist.group.WORLD, rank)


# ---- DeepSpeed ----------------------------------------------------------------------------------------------------
_DEEPSPEED_ORIGINALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per DeepSpeed backend, its own functions, saved the first time they are replaced."""


def _deepspeed(deepspeed, engine, optimizer, on: bool) -> None:
    """ZeRO-1/2 gather the updated weights after every step (yolov8x: zero2 optimizer step 0.46 -> 0.24 s), ZeRO-3
    every layer's parameters (forward 1.83 -> 1.69 s). ZeRO-3 reduce-scatters its gradient buckets: four
    alternating `parallel-yolo compare strategies=zero3` runs each way (yolov8x, 320 px, batch 4, 2 processes), step
    5.67 / 6.01 / 5.60 / 5.64 s through gloo's, 5.71 / 5.53 / 5.43 / 5.51 s through sends. ZeRO-1/2 reduce each
    gradient bucket to its owners from the backward hooks, synchronously: see `ReduceBySends` for what sends
    change there."""
    from . import _deepspeed_internals as internals

    backend = internals.comm_backend(deepspeed)
    if backend is None:
        return
    names = ("all_gather_function", "reduce_scatter_function", "reduce")
    originals = _DEEPSPEED_ORIGINALS.setdefault(backend, {name: getattr(backend, name) for name in names})
    for name in names:
        setattr(backend, name, originals[name])
    if not on:
        return
    backend.all_gather_function = all_gather_by_broadcasts
    backend.reduce_scatter_function = reduce_scatter_by_sends
    backend.reduce = sends = ReduceBySends(originals["reduce"], backend._reduce_op, optimizer)
    backward = engine.backward

    def backward_then_finish(*args, **kwargs):
        result = backward(*args, **kwargs)
        sends.finish()  # the next backward refills the bucket buffers the last sends read
        return result

    engine.backward = backward_then_finish


# ---- FSDP2 --------------------------------------------------------------------------------------------------------
def _fsdp(model) -> None:
    """Without CUDA streams FSDP waits for each collective in turn, the all-gather when a layer starts, the
    reduce-scatter when its gradients are done. yolov8x, 320 px, batch 4, 2 processes on this 2-core machine, per
    step: all-gathers 0.58 -> 0.31 s, reduce-scatters 0.42 -> ~0.2 s; step 5.42 / 5.58 -> 5.04 / 5.25 s in alternating
    compare runs. Issuing each layer's all-gather asynchronously from the layer before (FSDP's unshard_async_op with
    explicit prefetch) gave 5.04 / 5.12 s: within the noise, so it is not done."""
    from torch.distributed.fsdp import FSDPModule

    from .._torch_internals import fsdp_comm_bases

    AllGather, ReduceScatter, DefaultAllocMixin = fsdp_comm_bases()

    class BroadcastAllGather(DefaultAllocMixin, AllGather):  # buffers allocated as FSDP's default comms do
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            return all_gather_by_broadcasts(output_tensor, input_tensor, group=group, async_op=async_op)

    class ReduceScatterBySends(DefaultAllocMixin, ReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            return reduce_scatter_by_sends(output_tensor, input_tensor, op=op, group=group, async_op=async_op)

    all_gather, reduce_scatter = BroadcastAllGather(), ReduceScatterBySends()  # stateless: one of each serves all
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(all_gather)
            module.set_custom_reduce_scatter(reduce_scatter)
