"""DeepSpeed on gloo: its reduce, routed through sends, gives what torch's reduce gives, and a send is finished
before DeepSpeed can refill the buffer it reads; ZeRO-1/2 training with many small buckets ends with the same
weights through sends as through gloo's reduce."""

from __future__ import annotations

import gc
import os

import torch
import torch.multiprocessing as mp
from conftest import free_port, rank_environment


class _Optimizer:
    """What the reducer reads of DeepSpeed's stage-1/2 optimizer: two alternating bucket buffers (overlap_comm)."""

    def __init__(self, buffers):
        self.overlap_comm = True
        self.ipg_buckets = {torch.float32: type("Bucket", (), {"buffer": buffers})()}


def _reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from parallel_yolo.comm import CommCounter
    from parallel_yolo.strategies.deepspeed import _ReduceBySends

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    buffers = [torch.zeros(30), torch.zeros(30)]
    optimizer = _Optimizer(buffers)
    reduce = _ReduceBySends(lambda **kw: dist.reduce(**kw), lambda op: op, optimizer)
    storages = [b.untyped_storage().data_ptr() for b in buffers]
    checks = []
    with CommCounter(world) as counter:
        for bucket in range(4):  # as the backward hooks: fill a buffer, reduce each owner's slice, swap
            buffer = buffers[bucket % 2]
            buffer.copy_(torch.arange(30.0) * (rank + 1) + bucket)
            for owner in range(world):
                piece = buffer[10 * owner:10 * owner + 10]
                expected = piece.clone()
                dist.reduce(expected, owner)  # torch's own, for the answer
                assert reduce(tensor=piece, dst=owner) is None
                if rank == owner:
                    checks.append(torch.equal(piece, expected))
                # only sends from the buffer being reduced are still in flight
                checks.append(all(storage == storages[bucket % 2] for _, storage, _ in reduce.pending))
        reduce.finish()
        checks.append(reduce.pending == [])
    # each rank sent its 10 elements to each of the two other owners, four times, through the counted isend
    checks.append(counter.bytes["isend"] == 4 * (world - 1) * 40)
    subgroup = dist.new_group([1, 2])
    if rank in (1, 2):  # a subgroup: the destination is a global rank; a tensor outside the buffers is sent at once
        alone = torch.full((4,), float(rank))
        reduce(tensor=alone, dst=2, group=subgroup)
        checks.append(reduce.pending == [] and (rank == 1 or torch.equal(alone, torch.full((4,), 3.0))))
    maximum = torch.tensor([float(rank)])
    reduce(tensor=maximum, dst=0, op=dist.ReduceOp.MAX)  # anything but a sum goes to the original
    checks.append(rank != 0 or maximum.item() == world - 1)
    del optimizer
    gc.collect()
    checks.append(reduce.optimizer() is None)  # the reducer does not keep the optimizer (and its states) alive
    torch.save(checks, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_reduce_by_sends_matches_torch_and_finishes_sends_before_buffer_reuse(tmp_path):
    mp.spawn(_reduce_worker, args=(3, free_port(), str(tmp_path)), nprocs=3)
    for rank in range(3):
        checks = torch.load(tmp_path / f"{rank}.pt")
        assert checks and all(checks), (rank, checks)


def _train_worker(rank: int, world: int, port: int, out: str) -> None:
    rank_environment(rank, world, port)
    from torch import nn

    from parallel_yolo import dist as pdist
    from parallel_yolo.precision import policy
    from parallel_yolo.strategies import create, preset
    from parallel_yolo.strategies.deepspeed import import_deepspeed

    env, device = pdist.read_env(), torch.device("cpu")
    results = {}
    with pdist.process_group(env, device):
        for name in ("zero1", "zero2"):
            for sends in (True, False):
                torch.manual_seed(0)
                model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.SiLU(), nn.Conv2d(16, 32, 3),
                                      nn.SiLU(), nn.Conv2d(32, 32, 3), nn.SiLU(), nn.Flatten(), nn.Linear(128, 40))
                options = preset(name)
                # 19.5K gradients, no parameter over 10K: 3 buckets a backward, so a bucket's sends stay in flight
                # while the other buffer fills
                options["zero_optimization"] = {**options["zero_optimization"], "reduce_bucket_size": 10000}
                strategy = create(name, env=env, device=device, precision=policy("fp32"), options=options)
                wrapped, _ = strategy.setup(model, make_optimizer=lambda m: torch.optim.SGD(
                    m.parameters(), lr=0.1, momentum=0.9))
                if not sends:  # gloo's own reduce, for the answer
                    backend = import_deepspeed().comm.comm.cdb
                    backend.reduce, strategy._sends = backend.reduce.original, None
                torch.manual_seed(1 + rank)  # each rank its own data: the reduced gradients differ from each rank's
                for _ in range(3):
                    loss = wrapped(torch.randn(4, 3, 8, 8)).square().mean()
                    strategy.backward(loss)
                    strategy.step()
                results[name, sends] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save({name: torch.equal(results[name, True], results[name, False]) for name in ("zero1", "zero2")},
               os.path.join(out, f"{rank}.pt"))


def test_zero1_and_zero2_train_the_same_through_sends(tmp_path):
    mp.spawn(_train_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert torch.load(tmp_path / f"{rank}.pt") == {"zero1": True, "zero2": True}
