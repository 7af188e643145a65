"""Gloo's collectives as broadcasts and sends: the same results as torch's all_gather_into_tensor and
reduce_scatter_tensor, on the whole world and on a subgroup, in place or not, synchronous or not."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from conftest import free_port


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from parallel_yolo.strategies.gloo import Works, all_gather_by_broadcasts, reduce_scatter_by_sends

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = []
    for group in (None, dist.new_group([1, 2])):
        if group is not None and rank not in (1, 2):
            continue
        size, me = dist.get_world_size(group), dist.get_rank(group)
        mine = torch.arange(5.0) + 10 * rank
        expected = torch.empty(5 * size)
        dist.all_gather_into_tensor(expected, mine, group=group)
        separate = torch.zeros(5 * size)
        assert all_gather_by_broadcasts(separate, mine, group=group) is None
        in_place = torch.zeros(5 * size)
        in_place.view(size, -1)[me].copy_(mine)
        handle = all_gather_by_broadcasts(in_place, in_place.view(size, -1)[me], group=group, async_op=True)
        assert isinstance(handle, Works) and isinstance(handle, dist.Work)  # FSDP waits only for a torch Work
        handle.wait()
        results.append(torch.equal(separate, expected) and torch.equal(in_place, expected) and handle.is_completed())
        # reduce-scatter: integers in float (sums exact); into a separate output and in place, as ZeRO-3 does
        grads = (torch.arange(6.0 * size) * (rank + 1)).view(size * 2, 3)
        for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG, dist.ReduceOp.MAX):
            want, got = torch.empty(2, 3), torch.full((2, 3), float("nan"))
            dist.reduce_scatter_tensor(want, grads, op=op, group=group)
            reduce_scatter_by_sends(got, grads, op=op, group=group)
            in_place = grads.clone()
            reduce_scatter_by_sends(in_place[2 * me:2 * me + 2], in_place, op=op, group=group)
            results.append(torch.equal(got, want) and torch.equal(in_place[2 * me:2 * me + 2], want))
    torch.save(results, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_broadcasts_and_sends_match_torch(tmp_path):
    mp.spawn(_worker, args=(3, free_port(), str(tmp_path)), nprocs=3)
    results = {rank: torch.load(tmp_path / f"{rank}.pt") for rank in range(3)}
    assert results == {0: [True] * 4, 1: [True] * 8, 2: [True] * 8}
