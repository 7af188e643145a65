"""strategies/_deepspeed_internals.py: each DeepSpeed internal the project relies on is where the adapter expects it
and behaves as the adapter assumes, checked on real ZeRO-2 and ZeRO-3 engines on 2 gloo processes (partitions that
start and end inside parameters). One spawn serves every test: each test reads its own check's outcome."""

from __future__ import annotations

import math
import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, rank_environment

WORLD = 2


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.SiLU(),
                                         torch.nn.Conv2d(8, 5, 3), torch.nn.Flatten(), torch.nn.Linear(80, 7))

    def forward(self, x):
        return self.model(x)


def _checks(strategy, internals, deepspeed, rank: int) -> dict:
    """name -> a function that raises when the internal is not what the adapter assumes."""
    import torch.distributed as dist

    opt = strategy.optimizer
    stage3 = strategy.stage == 3

    def steps(n=1):
        for _ in range(n):
            strategy.backward(strategy.model(torch.randn(2, 3, 8, 8) + rank).square().mean())
            strategy.step()

    def comm_backend():
        backend = internals.comm_backend(deepspeed)
        assert backend is not None and callable(backend.reduce)

    def flat_buffer_layout():
        for (params, flat), (master, part) in zip(internals.flat_groups(opt), strategy._master_pairs()):
            offsets = [internals.offset(p.data, flat) for p in params]
            assert offsets == sorted(offsets) and offsets[0] == 0, offsets
            assert all(internals.inside(p.data, flat) for p in params)
            assert internals.inside(part, flat) and internals.offset(part, flat) == rank * part.numel()
            assert master.numel() == part.numel()

    def master_is_the_weights():
        pairs = strategy._master_pairs()
        assert pairs and all(m.data_ptr() == w.data_ptr() for m, w in pairs)
        before = [w.clone() for _, w in pairs]
        steps()
        assert all(m.data_ptr() == w.data_ptr() for m, w in strategy._master_pairs())  # still shared after a step
        assert any(not torch.equal(b, w) for b, (_, w) in zip(before, pairs))  # and the step moved the weights
        full = torch.cat([p.detach().flatten().float() for p in strategy.full_state_dict().values()])
        gathered = strategy.gather_object(full)
        assert torch.equal(gathered[0], gathered[1])  # each rank's updated partition reached every rank

    def gradient_buffers():
        strategy.backward(strategy.model(torch.randn(2, 3, 8, 8)).square().mean())
        buffers = internals.gradient_buffers(opt)
        strategy.step()
        assert buffers and all(isinstance(t, torch.Tensor) for t in buffers)

    def optimizer_units():
        inner, seen = strategy.inner_optimizer(), []
        original = inner.step

        def recording(*args, **kwargs):
            seen.append([p for group in inner.param_groups for p in group["params"]])
            return original(*args, **kwargs)

        inner.step = recording
        try:
            steps()
        finally:
            del inner.step
        units = strategy.optimizer_units()
        assert len(seen) == len(units) and all(len(s) == 1 and s[0] is u[0] for s, u in zip(seen, units)), \
            (len(seen), len(units))

    def double_buffers():
        """While the backward reduces its buckets, the adapter sees the two alternating bucket buffers."""
        backend = internals.comm_backend(deepspeed)
        real, seen = backend.reduce, []

        def watching(*args, **kwargs):
            seen.append(len(internals.double_buffers(opt)))
            return real(*args, **kwargs)

        backend.reduce = watching
        try:
            steps()
        finally:
            backend.reduce = real
        assert seen and set(seen) == {2}, seen

    def collectives_looked_up_at_call_time():
        backend = internals.comm_backend(deepspeed)
        saved = backend.all_gather_function, backend.reduce_scatter_function
        try:
            backend.all_gather_function = dist.all_gather_into_tensor  # as DeepSpeed captured it at start
            internals.look_up_collectives_at_call_time(deepspeed)
            calls = []
            real = dist.all_gather_into_tensor
            dist.all_gather_into_tensor = lambda *a, **k: calls.append(1) or real(*a, **k)
            try:
                out = torch.empty(WORLD * 2, device=strategy.device)
                backend.all_gather_function(out, torch.full((2,), float(rank), device=strategy.device))
            finally:
                dist.all_gather_into_tensor = real
            assert calls == [1] and out.tolist() == [0.0, 0.0, 1.0, 1.0]
        finally:
            backend.all_gather_function, backend.reduce_scatter_function = saved

    def zero3_params():
        for p in strategy.raw_model.parameters():
            zero = internals.zero3_param(p)
            assert zero.numel == math.prod(zero.shape) and zero.local.numel() == math.ceil(zero.numel / WORLD)
            assert internals.full_shape(p) == zero.shape
            assert p.numel() == 0 or zero.persistent  # outside forward: an empty tensor, unless kept whole
        assert internals.full_shape(torch.zeros(2, 3)) == (2, 3)
        params = list(strategy.raw_model.parameters())
        before = [(p.data_ptr(), p.shape) for p in params]
        with internals.whole_shaped(params):  # what Ultralytics' build_optimizer reads of a model built sharded
            assert all(p.shape == internals.zero3_param(p).shape for p in params)
        assert [(p.data_ptr(), p.shape) for p in params] == before  # put back
        assert internals.zero3_rank(opt) == rank

    def zero3_flat_groups():
        pairs = internals.zero3_flat_groups(opt)
        trained = [internals.zero3_param(p).local for p in strategy.raw_model.parameters() if p.requires_grad]
        assert all(sum(internals.inside(t, flat) for _, flat in pairs) == 1 for t in trained)
        assert all(m.numel() == w.numel() for m, w in pairs)

    def zero3_gradient_buffer():
        buffer = internals.zero3_gradient_buffer(opt)
        trained = sum(internals.zero3_param(p).local.numel() for p in strategy.raw_model.parameters())
        assert isinstance(buffer, torch.Tensor) and buffer.numel() >= trained
        strategy.backward(strategy.model(torch.randn(2, 3, 8, 8)).square().mean())
        views = internals.zero3_gradient_views(opt)
        strategy.step()
        assert views and all(internals.inside(v, buffer) for v in views)  # what memory_report counts as grads

    common = {"comm_backend": comm_backend, "master_is_the_weights": master_is_the_weights,
              "optimizer_units": optimizer_units,
              "collectives_looked_up_at_call_time": collectives_looked_up_at_call_time}
    if stage3:
        return {**common, "zero3_params": zero3_params, "zero3_flat_groups": zero3_flat_groups,
                "zero3_gradient_buffer": zero3_gradient_buffer}
    return {**common, "flat_buffer_layout": flat_buffer_layout, "gradient_buffers": gradient_buffers,
            "double_buffers": double_buffers}


def _worker(rank: int, port: int, out: str) -> None:
    rank_environment(rank, WORLD, port)
    from parallel_yolo.launch import dist as pdist
    from parallel_yolo.strategies import _deepspeed_internals as internals
    from parallel_yolo.strategies import create, preset
    from parallel_yolo.strategies.deepspeed import import_deepspeed
    from parallel_yolo.strategies.precision import policy

    deepspeed = import_deepspeed()
    env, device = pdist.read_env(), torch.device("cpu")
    outcomes = {}
    with pdist.process_group(env, device):
        for name in ("zero2", "zero3"):
            strategy = create(name, env=env, device=device, precision=policy("fp32"), options=preset(name))
            strategy.setup(_Net(), make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
            for check, run in _checks(strategy, internals, deepspeed, rank).items():
                try:
                    run()
                    outcomes[name, check] = ""
                except Exception:  # noqa: BLE001 - the test reports it
                    outcomes[name, check] = traceback.format_exc(limit=-3)
    # a second run in the same process (train() called again from Python): DeepSpeed still holds the first group's
    # clone of the world, which forget_stale_groups finds and drops when the next engine is set up
    os.environ["MASTER_PORT"] = str(port + 1)
    with pdist.process_group(pdist.read_env(), device):
        try:
            assert deepspeed.utils.groups._WORLD_GROUP is not None, "the first run's group is gone already"
            strategy = create("zero2", env=env, device=device, precision=policy("fp32"), options=preset("zero2"))
            strategy.setup(_Net(), make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
            assert internals.forget_stale_groups(deepspeed) == []  # the new ones are live
            strategy.barrier()
            outcomes["zero2", "second_run_in_one_process"] = ""
        except Exception:  # noqa: BLE001 - the test reports it
            outcomes["zero2", "second_run_in_one_process"] = traceback.format_exc(limit=-3)
    torch.save(outcomes, os.path.join(out, f"{rank}.pt"))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed_internals")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD)
    return [torch.load(out / f"{rank}.pt") for rank in range(WORLD)]


STAGE2 = ["comm_backend", "flat_buffer_layout", "master_is_the_weights", "gradient_buffers", "optimizer_units",
          "double_buffers", "collectives_looked_up_at_call_time", "second_run_in_one_process"]
STAGE3 = ["zero3_params", "zero3_flat_groups", "zero3_gradient_buffer", "master_is_the_weights", "optimizer_units"]


@pytest.mark.parametrize(("stage", "check"), [("zero2", c) for c in STAGE2] + [("zero3", c) for c in STAGE3])
def test_deepspeed_internal(outcomes, stage, check):
    for rank, found in enumerate(outcomes):
        assert (stage, check) in found, f"{stage} {check} did not run on rank {rank}"
        assert found[stage, check] == "", f"rank {rank}, {stage}: {found[stage, check]}"
