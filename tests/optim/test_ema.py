"""parallel_yolo/optim/ema.py: the EMA kept per shard follows Ultralytics' ModelEMA step for step (its decay ramp, its
arithmetic, buffers included); strategies that hold whole parameters use ModelEMA itself."""

from __future__ import annotations

from copy import deepcopy

import torch
from conftest import DETECT, THREE
from ultralytics.utils.torch_utils import ModelEMA

from parallel_yolo.config import TrainConfig
from parallel_yolo.engine.build import build_train_state, make_strategy
from parallel_yolo.launch.dist import DistEnv
from parallel_yolo.optim.ema import ShardedEMA
from parallel_yolo.strategies.base import ReplicatedEMA


def state_for(name: str):
    cfg = TrainConfig(imgsz=64, batch=2, optimizer="SGD")
    strategy = make_strategy(name, "fp32", env=DistEnv(world_size=1, launched=True), device=torch.device("cpu"),
                             gloo_collectives=False)
    return build_train_state(cfg, strategy, spec="yolov8n.yaml", task=DETECT, data=THREE, images=2,
                             sizing=lambda *_: (64, 5e-4))


def test_the_sharded_ema_follows_ultralytics_model_ema(one_rank_group):
    state = state_for("fsdp")
    assert isinstance(state.ema, ShardedEMA)
    full = deepcopy(state.ema.full_model()).train()  # the model's weights now, as one module
    reference = ModelEMA(full)
    for step in range(1, 4):  # move the weights and the BatchNorm statistics, then both EMAs take a step
        with torch.no_grad():
            for p in state.strategy.raw_model.parameters():
                p.add_(0.01 * step)
            for b in state.strategy.raw_model.buffers():
                if b.dtype.is_floating_point:
                    b.mul_(1.1)
        state.ema.update()
        full.load_state_dict(state.strategy.full_state_dict())
        reference.update(full)
    ours, theirs = state.ema.full_model().state_dict(), reference.ema.state_dict()
    assert state.ema.updates == reference.updates == 3 and ours.keys() == theirs.keys()
    moved = 0
    for key in ours:
        if ours[key].dtype.is_floating_point:
            assert torch.allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-7), key
            moved += not torch.equal(theirs[key], full.state_dict()[key])
    assert moved > 100  # the EMA lags the weights: the check compared something


def test_strategies_with_whole_parameters_use_model_ema(one_rank_group):
    assert isinstance(state_for("ddp").ema, ReplicatedEMA)
