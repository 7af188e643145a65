"""strategies/gloo.py, the CPU runs' faster collectives: broadcasts and sends give what torch's all_gather_into_tensor,
reduce_scatter_tensor and DeepSpeed's reduce give (whole world and a subgroup, in place or not, synchronous or not); a
send is finished before DeepSpeed can refill the buffer it reads; every sharded strategy trains to the same weights
with the module on and off, and the key decides which collectives run; importing the strategies loads neither the
module nor torch's private FSDP modules."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, free_port, rank_environment


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


class _Optimizer:
    """What the reducer reads of DeepSpeed's stage-1/2 optimizer: two alternating bucket buffers (overlap_comm)."""

    def __init__(self, buffers):
        self.overlap_comm = True
        self.ipg_buckets = {torch.float32: type("Bucket", (), {"buffer": buffers})()}


def _reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from parallel_yolo.monitor.comm import CommCounter
    from parallel_yolo.strategies.gloo import ReduceBySends

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    buffers = [torch.zeros(30), torch.zeros(30)]
    optimizer = _Optimizer(buffers)
    reduce = ReduceBySends(lambda **kw: dist.reduce(**kw), lambda op: op, optimizer)
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


SHARDED = ("zero1", "zero2", "zero3", "fsdp")


class _Net(torch.nn.Module):
    """Layers under `.model`, as in a YOLO model (FSDP shards each of them)."""

    def __init__(self, *layers):
        super().__init__()
        self.model = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


def _train_worker(rank: int, world: int, port: int, out: str) -> None:
    rank_environment(rank, world, port)
    from torch import nn

    from parallel_yolo.launch import dist as pdist
    from parallel_yolo.monitor.comm import CommCounter
    from parallel_yolo.strategies import create, preset
    from parallel_yolo.strategies.precision import policy

    env, device = pdist.read_env(), torch.device("cpu")
    weights, calls = {}, {}
    with pdist.process_group(env, device):
        for name in SHARDED:
            for on in (True, False, True):  # on again: switching off must not stick to the process
                torch.manual_seed(0)
                model = _Net(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.SiLU(), nn.Conv2d(16, 32, 3), nn.SiLU(),
                             nn.Conv2d(32, 32, 3), nn.SiLU(), nn.Flatten(), nn.Linear(128, 40))
                options = {**preset(name), "gloo_collectives": on}
                if name.startswith("zero"):
                    # 19.5K gradients, no parameter over 10K: 3 buckets a backward, so a bucket's sends stay in
                    # flight while the other buffer fills
                    options["zero_optimization"] = {**options["zero_optimization"], "reduce_bucket_size": 10000}
                strategy = create(name, env=env, device=device, precision=policy("fp32"), options=options)
                wrapped, _ = strategy.setup(model, make_optimizer=lambda m: torch.optim.SGD(
                    m.parameters(), lr=0.1, momentum=0.9))
                strategy.expose_communication()
                torch.manual_seed(1 + rank)  # each rank its own data: the reduced gradients differ from each rank's
                with CommCounter(world) as counter:
                    for _ in range(3):
                        loss = wrapped(torch.randn(4, 3, 8, 8)).square().mean()
                        strategy.backward(loss)
                        strategy.step()
                calls[name, on] = {k for k, v in counter.calls.items() if v}
                weights[name, on] = torch.cat([v.detach().flatten().float()
                                               for v in strategy.full_state_dict().values()])
    torch.save({"same": {name: torch.equal(weights[name, True], weights[name, False]) for name in SHARDED},
                "calls": calls}, os.path.join(out, f"{rank}.pt"))


def test_every_sharded_strategy_trains_the_same_with_the_module_on_and_off(tmp_path):
    """2 ranks: a sum of two is exact in any order, so on and off must give the same bits."""
    mp.spawn(_train_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert result["same"] == dict.fromkeys(SHARDED, True)
        calls = result["calls"]
        gather = {"all_gather_into_tensor", "all_gather_single"}
        scatter = {"reduce_scatter_tensor", "reduce_scatter_single"}
        for name in SHARDED:  # on: broadcasts and sends; off: the libraries' own all-gathers and reduce-scatters
            assert "broadcast" in calls[name, True] and not gather & calls[name, True], name
            assert gather & calls[name, False], name
        assert "isend" in calls["zero2", True] and "reduce" in calls["zero2", False]
        for name in ("zero3", "fsdp"):
            assert "isend" in calls[name, True] and not scatter & calls[name, True], name
            assert scatter & calls[name, False], name


def test_ddp_does_not_load_the_module_or_private_fsdp_modules():
    code = ("import sys, parallel_yolo.engine.trainer, parallel_yolo.tools.compare, parallel_yolo.strategies.ddp; "
            "print([m for m in sys.modules if m == 'parallel_yolo.strategies.gloo' or '._fully_shard' in m "
            "or m.startswith('deepspeed')])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(("key", "environment", "expected"), [
    (None, None, True), (None, "0", False), (None, "1", True), (True, "0", True), (False, None, False)])
def test_the_key_switches_it_and_the_environment_sets_its_default(monkeypatch, key, environment, expected):
    from parallel_yolo.strategies.gloo import SWITCH, enabled

    if environment is None:
        monkeypatch.delenv(SWITCH, raising=False)
    else:
        monkeypatch.setenv(SWITCH, environment)
    assert enabled(key) is expected
