"""DeepSpeed on gloo: its all-gather, routed through broadcasts, gives what torch's all_gather_into_tensor gives, on
the whole world and on a subgroup, in place or not, synchronous or not."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from conftest import free_port


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from parallel_yolo.strategies.deepspeed import _all_gather_by_broadcasts

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = []
    for group in (None, dist.new_group([1, 2])):
        if group is not None and rank not in (1, 2):
            continue
        size = dist.get_world_size(group)
        mine = torch.arange(5.0) + 10 * rank
        expected = torch.empty(5 * size)
        dist.all_gather_into_tensor(expected, mine, group=group)
        separate = torch.zeros(5 * size)
        assert _all_gather_by_broadcasts(separate, mine, group=group) is None
        in_place = torch.zeros(5 * size)
        in_place.view(size, -1)[dist.get_rank(group)].copy_(mine)
        handle = _all_gather_by_broadcasts(in_place, in_place.view(size, -1)[dist.get_rank(group)], group=group,
                                           async_op=True)
        handle.wait()
        results.append(torch.equal(separate, expected) and torch.equal(in_place, expected) and handle.is_completed())
    torch.save(results, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_all_gather_by_broadcasts_matches_torch(tmp_path):
    mp.spawn(_worker, args=(3, free_port(), str(tmp_path)), nprocs=3)
    results = {rank: torch.load(tmp_path / f"{rank}.pt") for rank in range(3)}
    assert results == {0: [True], 1: [True, True], 2: [True, True]}
