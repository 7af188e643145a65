"""The train state (model set up on its strategy, optimizer, EMA, loss), built one way for `train` and `compare`.

The order is the point: the model is built (layer by layer on the ranks that keep each, when the strategy builds
sharded), the image size checked against its stride, the layers to recompute chosen and wrapped, and the model
compiled, all before the strategy wraps it; the optimizer is made by the strategy over the parameters the wrapped
model trains; the loss is built last, on the device the parameters now live on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .. import checkpoint
from ..config import TrainConfig
from ..data import loader as datamod
from ..monitor import memory
from ..strategies import Strategy, create, preset
from ..strategies.precision import policy
from ..tasks import yolo
from ..tasks.task import Task
from . import recompute

__all__ = ["TrainState", "make_strategy", "build_train_state", "run_task"]


@dataclass(slots=True)
class TrainState:
    task: Task
    strategy: Strategy
    """With the model set up on it: `strategy.model` trains, `strategy.raw_model` is the unwrapped module."""
    model: Any
    criterion: Any
    ema: Any
    hyp: SimpleNamespace
    imgsz: int
    recomputed: list[int]
    """The layers that recompute their activations in backward."""
    forecast: str | None
    """activation_checkpointing=auto's line on what it chose and why."""
    sizes: dict[str, int]
    """Every parameter's whole number of elements, by name (also where the strategy built it sharded)."""
    profiled: recompute.Profile | None
    """The model's activation profile, when asked for."""


def run_task(cfg: TrainConfig, *, strategy: tuple[str, bool] | None = None) -> Task:
    """The run's task: its model's, or the model's of the checkpoint it resumes (checked by data, not loaded);
    `strategy`: (name, whether it shards parameters), to refuse a model whose loss it cannot serve."""
    if cfg.resume:
        spec = checkpoint.load_manifest(Path(cfg.resume), verify=False)["model_yaml"]
        return yolo.model_task(spec, strategy=strategy)
    return yolo.model_task(cfg.model, strategy=strategy)


def make_strategy(name: str, precision: str, *, env, device, **options) -> Strategy:
    """The named strategy, its preset (the YAML a user edits) under `options`."""
    return create(name, env=env, device=device, precision=policy(precision),
                  options={**preset(name, cuda=device.type == "cuda"), **options})


def build_train_state(cfg: TrainConfig, strategy: Strategy, *, spec: str | dict, task: Task, data: dict[str, Any],
                      images: int, sizing: Callable[[SimpleNamespace, int, int], tuple[int, float]],
                      profile: bool = False, hyp: SimpleNamespace | None = None) -> TrainState:
    """The `task` model of `spec` (a model yaml, a .pt, or a checkpoint's description) for the dataset `data` (its nc,
    names and, for pose, kpt_shape) set up on `strategy` for `cfg`.
    `images`: the images of one forward pass per rank (activation_checkpointing=auto plans for them).
    `sizing(hyp, imgsz, stride)`: called once the image size is known, before the optimizer is made; returns the
    training set's size and the weight decay (Ultralytics scales both into the optimizer; the trainer builds its
    loaders there). `profile`: also profile the model's activations (compare reports their forecast). `hyp`:
    Ultralytics' hyper-parameters for `cfg` (yolo.hyp_namespace), when the caller made them already."""
    hyp = hyp or yolo.hyp_namespace(cfg, task)
    model = yolo.build_model(spec, task=task, data=data, hyp=hyp, verbose=False, keep=strategy.layer_keeper())
    stride = max(int(model.stride.max()), 32)
    imgsz = hyp.imgsz = datamod.check_imgsz(hyp.imgsz, stride=stride)
    profiled = recompute.profile(model, imgsz, full_shape=strategy.full_shape) if profile else None
    layers, forecast = recompute.choose(model, cfg.activation_checkpointing, strategy=strategy,
                                        optimizer=cfg.optimizer, images=images, imgsz=imgsz,
                                        budget=cfg.budget_bytes, profiled=profiled)
    recomputed = recompute.apply(model, layers)
    if cfg.compile:
        model.compile()  # before the strategy wraps it
    sizes = {key: strategy.full_shape(p).numel() for key, p in model.named_parameters()}
    dataset_size, weight_decay = sizing(hyp, imgsz, stride)
    make_optimizer = yolo.optimizer_factory(cfg, hyp, nc=data["nc"], dataset_size=dataset_size,
                                            weight_decay=weight_decay)
    wrapped, _ = strategy.setup(model, make_optimizer=make_optimizer)
    del model  # the strategy holds it now, wrapped and perhaps sharded
    criterion = yolo.build_criterion(strategy.raw_model)  # on the device the parameters now live on
    memory.release_freed()
    return TrainState(task=task, strategy=strategy, model=wrapped, criterion=criterion, ema=strategy.make_ema(), hyp=hyp,
                      imgsz=imgsz, recomputed=recomputed, forecast=forecast, sizes=sizes,
                      profiled=profiled)
