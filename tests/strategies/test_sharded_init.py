"""Sharded initialisation (Strategy.layer_keeper): under fsdp, hsdp and zero3 no rank holds more than the layer being
made, and the model so built trains exactly as the whole build: initial weights, per-step losses and final weights
bit-identical on 2 processes. Also: a model built in the same process after the runs works (no engine's hooks left
on Ultralytics' shared modules)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import DETECT, THREE, free_port, rank_environment, tiny_batch

STRATEGIES = ("fsdp", "hsdp", "zero3")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    rank_environment(rank, world, port)
    from parallel_yolo.config import TrainConfig
    from parallel_yolo.engine.step import forward_backward
    from parallel_yolo.launch import dist as pdist
    from parallel_yolo.strategies import create, preset
    from parallel_yolo.strategies.precision import policy
    from parallel_yolo.tasks import yolo

    env, device = pdist.read_env(), torch.device("cpu")
    cfg = TrainConfig(optimizer="MuSGD", lr0=0.01, batch=4)  # MuSGD: its groups follow the parameters' shapes
    hyp = yolo.hyp_namespace(cfg, DETECT)
    results = {}
    with pdist.process_group(env, device):
        for name in STRATEGIES:
            for sharded in (False, True):
                strategy = create(name, env=env, device=device, precision=policy("fp32"),
                                  options={**preset(name), "sharded_init": sharded})
                keep, held = strategy.layer_keeper(), []

                def watched(layer, last, keep=keep, held=held, made={}):
                    # what the layers made before this one still hold on this rank
                    held.append(sum(p.numel() for done in made.values() for p in done.parameters() if not p.is_meta))
                    made[layer.i] = layer
                    keep(layer, last)

                torch.manual_seed(0)
                model = yolo.build_model("yolov8n.yaml", task=DETECT, data=THREE, hyp=hyp,
                                         keep=watched if keep else None)
                strategy.setup(model, make_optimizer=yolo.optimizer_factory(cfg, hyp, nc=3, dataset_size=8,
                                                                              weight_decay=5e-4))
                criterion = yolo.build_criterion(strategy.raw_model)
                initial = strategy.full_state_dict()
                torch.manual_seed(10 + rank)  # each rank its own images
                losses = []
                for _ in range(2):
                    items, _ = forward_backward(strategy, criterion, [tiny_batch()], sync=True, mean_loss=False)
                    strategy.step(items)
                    losses.append(items.clone())
                results[name, sharded] = (initial, losses, strategy.full_state_dict(), held,
                                          type(strategy.inner_optimizer()).__name__)
                strategy.barrier()
    # the group is gone: a model built now (a consolidate, a validation in the same process) must run as any model;
    # ZeRO-3's hooks once sat on Ultralytics' shared activation and ran here ("DeepSpeed backend not set")
    fresh = yolo.build_model("yolov8n.yaml", task=DETECT, data=THREE, hyp=hyp)
    results["after"] = len(fresh.eval()(torch.zeros(1, 3, 64, 64))[1])
    torch.save(results, os.path.join(out, f"{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_init")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2)
    return [torch.load(out / f"{rank}.pt") for rank in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("name", STRATEGIES)
def test_a_model_built_sharded_trains_exactly_as_the_whole_build(runs, name):
    for found in runs:
        whole, sharded = found[name, False], found[name, True]
        assert whole[3] == [] and len(sharded[3]) == 23  # the keeper took every layer of yolov8n
        assert max(sharded[3]) == 0, sharded[3]  # no layer made earlier kept its whole tensors
        assert whole[4] == sharded[4] == "DistributedMuSGD"
        for a, b in ((whole[0], sharded[0]), (whole[2], sharded[2])):  # initial and final weights and buffers
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert all(torch.equal(x, y) for x, y in zip(whole[1], sharded[1]))
        assert found["after"] == 3  # a model built after the runs predicts (three feature levels)
