"""Gloo's slow collectives as others that move the same bytes per rank (CPU runs; NCCL keeps its own).

Measured on this 2-core machine, 2 processes: gloo's all_gather_into_tensor of 130 MiB per rank takes 0.26 s, one
broadcast from each rank into its slice 0.07 s. Gloo's reduce_scatter_tensor (AVG, min of 5) of 8 / 32 / 130 MiB
input per rank takes 14 / 51 / 173 ms, sending each peer its chunk and adding what arrives 3 / 12 / 89 ms (4
processes: 14 / 68 / 312 against 6 / 35 / 181 ms). Used by the DeepSpeed strategies and by FSDP for their
all-gathers and reduce-scatters.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Works", "all_gather_by_broadcasts", "reduce_scatter_by_sends"]


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


def _global(group, rank: int) -> int:
    return dist.get_global_rank(group or dist.group.WORLD, rank)
