"""The Ultralytics adapter: model, loss and optimizer come from Ultralytics; this file only wires them up.

Models are built from a yaml (never downloaded) or loaded from a local .pt, as the model's task's trainer builds
them (task.py: its model class, what its set_model_attributes sets); the param groups and the `optimizer=auto` rule
are Ultralytics' own `BaseTrainer.build_optimizer`, called on a small stand-in object.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._internals import LibraryChanged
from .._torch_internals import fused_kernel_devices
from .._ultralytics_internals import build_layer_by_layer, build_optimizer, model_class
from ..config import ConfigError, TrainConfig
from .task import Task, refuse_sharded_params, task_of_layers

__all__ = ["hyp_namespace", "model_task", "check_layers", "load_local_pt", "build_model", "set_task_attributes",
           "build_criterion", "loss_names", "to_float", "optimizer_factory", "fused", "nominal_accumulate"]


def hyp_namespace(cfg: TrainConfig, task: Task) -> Any:
    """Ultralytics' full default config overridden by ours, for `task`: what its dataset, loss and validator read."""
    from ultralytics.cfg import get_cfg

    ours = {k: v for k, v in cfg.to_dict().items() if k in _ultralytics_defaults()}
    ours.update(model=cfg.model, data=cfg.data, task=task.name, mode="train", plots=cfg.plots, device=None,
                imgsz=cfg.imgsz or task.default_imgsz)
    if task.name == "classify":
        ours.update(multi_scale=0.0)  # as ClassificationTrainer: classification batches are never rescaled
    return get_cfg(overrides=ours)


def model_task(spec: str | dict, *, strategy: tuple[str, bool] | None = None) -> Task:
    """The task of a model (a yaml, a local .pt or a checkpoint's model description), refusing one that cannot be
    found locally or is no YOLO model of a task this version trains, and with `strategy` (its name, whether it shards
    parameters) one whose loss that strategy cannot serve; before any process group exists."""
    if isinstance(spec, dict):
        layers, source = check_layers(spec, "the checkpoint's model"), "the checkpoint's model"
    elif spec.endswith(".pt"):
        layers, source = check_layers(load_local_pt(spec).yaml, f"model={spec}"), f"model={spec}"
    else:
        layers, source = _model_yaml(spec), f"model={spec}"
    task = task_of_layers(layers, source)
    if strategy is not None and strategy[1]:
        refuse_sharded_params(layers, source, strategy[0])
    return task


def build_model(spec: str | dict, *, task: Task, data: dict[str, Any], hyp: Any, verbose: bool = False,
                keep: Callable[[nn.Module, bool], None] | None = None) -> nn.Module:
    """The task's model (DetectionModel, SegmentationModel, PoseModel ...) from an Ultralytics model yaml, a local .pt
    (weights transferred where shapes match), or a model description already read (a checkpoint's `model_yaml`,
    checked by `check_layers` first), for the dataset `data`, as the task's trainer builds it (get_model, then
    set_model_attributes). With `keep` (Strategy.layer_keeper), a yaml's model is built layer by layer, each layer
    handed to `keep` as soon as it is made (the same values as the whole build: sharded initialisation); a .pt is
    read whole anyway, and so is a model whose class is not a DetectionModel's (classify, semantic: their builds probe
    the model in ways the layer-by-layer build does not follow); the strategy then shards the whole model."""
    from ultralytics.nn.tasks import DetectionModel

    weights = None
    if isinstance(spec, dict):
        source = dict(check_layers(spec, "the checkpoint's model"))
    elif spec.endswith(".pt"):
        weights = load_local_pt(spec)
        source = dict(weights.yaml)
    else:
        source = dict(_model_yaml(spec))
    cls, nc = task.model_class(), data["nc"]
    if task.name == "pose":  # PoseModel(data_kpt_shape=...): the data's keypoints replace the yaml's
        kpt_shape = [int(v) for v in data["kpt_shape"]]
        if weights is not None and list(source["kpt_shape"]) != kpt_shape:
            raise ConfigError(f"model={spec} predicts keypoints of shape {list(source['kpt_shape'])}, data={hyp.data} "
                              f"has kpt_shape {kpt_shape}; train a pose yaml (it takes the data's shape) or use "
                              "data of the model's keypoints")
        source["kpt_shape"] = kpt_shape
    try:
        if keep is not None and weights is None and issubclass(cls, DetectionModel):
            model = build_layer_by_layer(source, nc=nc, take=keep, model_class=cls)
        else:
            model = cls(source, nc=nc, verbose=verbose)
    except LibraryChanged:
        raise
    except Exception as e:  # Ultralytics raises assorted errors for a yaml it cannot build
        raise ConfigError(f"model={spec}: Ultralytics could not build it ({type(e).__name__}: {e}); "
                          f"pass a {task.name} model yaml such as {task.example}") from None
    if weights is not None:
        model.load(weights, verbose=verbose)
        if task.name == "classify":  # as ClassificationTrainer.setup_model: a head for this data's classes
            cls.reshape_outputs(model, nc)
    set_task_attributes(model, task, data=data, hyp=hyp)
    return model


def set_task_attributes(model: nn.Module, task: Task, *, data: dict[str, Any], hyp: Any) -> None:
    """What the task's trainer sets on its model (set_model_attributes; the classification trainer's get_model)."""
    model.nc, model.names, model.args = data["nc"], data["names"], hyp
    if task.name == "pose":  # PoseTrainer.set_model_attributes
        model.kpt_shape = data["kpt_shape"]
        model.kpt_oks_sigmas = data.get("kpt_oks_sigmas")
        names = data.get("kpt_names") or {i: [str(k) for k in range(data["kpt_shape"][0])] for i in range(data["nc"])}
        model.kpt_names = names
    if task.name == "classify":  # ClassificationTrainer.get_model: its dropout, every parameter trained
        for m in model.modules():
            if isinstance(m, nn.Dropout) and getattr(hyp, "dropout", 0.0):
                m.p = hyp.dropout
        for p in model.parameters():
            p.requires_grad = True


def to_float(value: Any) -> Any:
    """Predictions in fp32 so the loss is computed in fp32 under every precision policy."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: to_float(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_float(v) for v in value)
    return value


def build_criterion(model: nn.Module) -> Any:
    """Ultralytics' own loss for this model (v8DetectionLoss, v8SegmentationLoss ..., E2ELoss for end-to-end heads)."""
    return model.init_criterion()


def loss_names(criterion: Any, task: Task) -> tuple[str, ...]:
    """The names of the loss items `criterion` returns (an end-to-end loss reports its one-to-one branch's)."""
    for source in (criterion, getattr(criterion, "one2one", None)):
        names = getattr(source, "loss_names", None)
        if names:
            return tuple(names)
    return task.losses


def nominal_accumulate(cfg: TrainConfig, batches_per_epoch: int) -> tuple[int, float]:
    """(iterations per optimizer step, scaled weight decay) exactly as Ultralytics derives them from nbs."""
    nbs = cfg.hyp_value["nbs"]
    accumulate = max(round(nbs / cfg.batch), 1)
    weight_decay = cfg.weight_decay * cfg.batch * accumulate / nbs
    return min(accumulate, batches_per_epoch * cfg.epochs), weight_decay


def optimizer_factory(cfg: TrainConfig, hyp: Any, *, nc: int, dataset_size: int, weight_decay: float):
    """A callable model -> optimizer that runs Ultralytics' build_optimizer (its param groups, the auto rule); MuSGD
    becomes DistributedMuSGD, which the strategy binds to its layout in setup."""
    iterations = math.ceil(dataset_size / max(cfg.batch, hyp.nbs)) * cfg.epochs

    def make(model: nn.Module) -> torch.optim.Optimizer:
        from ..optim import distributed

        optimizer = build_optimizer(model, hyp=hyp, nc=nc, name=cfg.optimizer, lr=cfg.lr0, momentum=cfg.momentum,
                                    decay=weight_decay, iterations=iterations)
        return fused(distributed(optimizer, model))

    return make


def fused(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Switch torch's SGD, Adam and AdamW to their fused kernel (one pass, CPU or CUDA) when every parameter allows
    it; Ultralytics builds them with the per-tensor loop, whose Nesterov and weight-decay terms are whole-tensor
    temporaries. That matters most under DeepSpeed, which hands the optimizer one flat partition per param group:
    measured on yolov8x, 2 CPU processes, the optimizer step took zero2 0.80 -> 0.46 s, zero3 0.80 -> 0.57 s and
    ddp 0.16 -> 0.09 s. FSDP's DTensor parameters keep the loop (DTensor has no sharding rule for the fused ops);
    so do the other optimizers (DistributedMuSGD runs foreach kernels on the local shards itself)."""
    if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        return optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    devices = fused_kernel_devices()
    if all(type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in devices for p in params):
        for group in optimizer.param_groups:
            group.update(fused=True, foreach=False)
        optimizer.defaults.update(fused=True, foreach=False)
    return optimizer


def _ultralytics_defaults() -> dict[str, Any]:
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return DEFAULT_CFG_DICT


def _model_yaml(spec: str) -> dict:
    """The layers of a local yaml, or of a yaml Ultralytics ships (scale letters resolved by Ultralytics), checked."""
    from ultralytics.nn.tasks import yaml_model_load

    if not spec.endswith((".yaml", ".yml")):
        raise ConfigError(f"model={spec}: expected a model .yaml or a local .pt, e.g. model=yolov8n.yaml")
    try:
        layers = yaml_model_load(spec)
    except FileNotFoundError:
        raise ConfigError(f"model={spec}: no such model yaml, locally or among Ultralytics' "
                          "(e.g. yolov8n.yaml, yolo11s-seg.yaml, yolov8x-p6.yaml)") from None
    return check_layers(layers, f"model={spec}")


def check_layers(layers: Any, source: str) -> dict:
    """`layers` (a parsed model yaml) if every layer names a module class and `act` names an activation class.

    Ultralytics' parse_model evaluates `act` with eval() and looks each layer's module up among its tasks module's
    globals and calls it, so a model description from a file someone else wrote (a checkpoint's manifest, a
    downloaded yaml) could run code or call a loader there; what passes here is a plain torch or Ultralytics module."""
    def module_class(name: Any) -> Any:
        if not isinstance(name, str):
            return None
        if name.startswith("nn."):
            return getattr(nn, name[3:], None)
        if name.startswith("torchvision.ops."):
            import torchvision

            return getattr(torchvision.ops, name[16:], None)
        return model_class(name)

    def fail(what: str) -> ConfigError:
        return ConfigError(f"{source}: {what} is not a torch or Ultralytics module; the model description is damaged "
                           "or not Ultralytics' (it is not built)")

    if not isinstance(layers, dict) or not isinstance(layers.get("backbone"), list) or \
            not isinstance(layers.get("head"), list):
        raise fail("its layer list")
    for layer in layers["backbone"] + layers["head"]:
        found = module_class(layer[2]) if isinstance(layer, (list, tuple)) and len(layer) == 4 else None
        if not (isinstance(found, type) and issubclass(found, nn.Module)):
            raise fail(f"layer {layer!r}")
    act = layers.get("act")
    if act is not None and not _is_activation(act):
        raise fail(f"act={act!r}")
    return layers


def _is_activation(act: Any) -> bool:
    """`act` is a torch.nn module class called with literal arguments, e.g. nn.SiLU() or nn.LeakyReLU(0.1)."""
    import ast

    try:
        call = ast.parse(str(act), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and isinstance(call.func.value, ast.Name) and call.func.value.id == "nn"):
            return False
        for argument in [*call.args, *(keyword.value for keyword in call.keywords)]:
            ast.literal_eval(argument)
    except (SyntaxError, ValueError, TypeError):
        return False
    found = getattr(nn, call.func.attr, None)
    return isinstance(found, type) and issubclass(found, nn.Module)


def load_local_pt(spec: str) -> nn.Module:
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"model={spec}: file not found; weights load from a local path only (nothing is "
                          "downloaded): give the path to a .pt, or a model yaml such as yolov8n.yaml")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"model={spec}: cannot read it as a PyTorch checkpoint ({type(e).__name__})") from None
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else ckpt
    if not isinstance(model, nn.Module) or not hasattr(model, "yaml"):
        raise ConfigError(f"model={spec}: not an Ultralytics checkpoint (no 'model' with a yaml inside)")
    return model.float()
