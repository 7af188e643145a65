"""Every Ultralytics internal parallel_yolo relies on: its trainer's optimizer builder called without a trainer,
MuSGD's fields and its Muon update, the mosaic transform's sample buffer, the module classes its model parser looks
up. Each has a test in tests/test_ultralytics_internals.py; a release that moves one raises LibraryChanged here, by
name, instead of training differently from Ultralytics without a word.
"""

from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ._internals import changed, require

__all__ = ["build_optimizer", "musgd_fields", "musgd_defaults", "muon_update", "mosaic_from_whole_dataset",
           "model_class", "ema_decay", "validate_in_training_mode", "build_layer_by_layer", "trainer_events",
           "trainer_method", "prepare_metrics", "run_args", "integration_callbacks", "drop_model_graph", "system_metric_loggers",
           "use_local_font"]


def build_optimizer(model: nn.Module, *, hyp: Any, nc: int, name: str, lr: float, momentum: float, decay: float,
                    iterations: int) -> torch.optim.Optimizer:
    """Ultralytics' BaseTrainer.build_optimizer (its param groups, the `auto` rule, MuSGD), called on a stand-in that
    has what it reads of a trainer: `args` (the hyper-parameters) and `data["nc"]`."""
    from ultralytics.engine.trainer import BaseTrainer

    stand_in = SimpleNamespace(args=hyp, data={"nc": nc})
    try:
        return BaseTrainer.build_optimizer(stand_in, model=model, name=name, lr=lr, momentum=momentum, decay=decay,
                                           iterations=iterations)
    except (AttributeError, KeyError, TypeError) as error:
        raise changed("ultralytics", f"BaseTrainer.build_optimizer as called with args, data and its keywords "
                      f"({type(error).__name__}: {error})", "Ultralytics' optimizer and param groups") from None


def musgd_fields(optimizer) -> tuple[float, float, list[tuple[dict, bool]]]:
    """MuSGD's (muon factor, sgd factor, [(param group, whether it is a Muon group)])."""
    why = "MuSGD's Muon and SGD halves"
    muon, sgd = require(optimizer, "muon", "ultralytics", why), require(optimizer, "sgd", "ultralytics", why)
    try:
        groups = [(group, bool(group["use_muon"])) for group in optimizer.param_groups]
    except KeyError:
        raise changed("ultralytics", "MuSGD's param-group key 'use_muon'", why) from None
    return muon, sgd, groups


def musgd_defaults() -> dict[str, Any]:
    """MuSGD's own defaults, for what a param group leaves out."""
    from ultralytics.optim import MuSGD

    return dict(MuSGD([torch.zeros(1)]).defaults)


def muon_update(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Ultralytics' muon_update on matrices whose momentum step was already taken: with beta 0 and no Nesterov its
    momentum becomes the matrix itself, then Newton–Schulz, batched as Ultralytics batches it, and the scale."""
    from ultralytics.optim import muon

    update = require(muon, "muon_update", "ultralytics", "MuSGD's Newton–Schulz orthogonalisation")
    return update(matrices, [torch.zeros_like(m) for m in matrices], beta=0.0, nesterov=False)


def mosaic_from_whole_dataset(transform) -> int:
    """Make every mosaic-like transform in `transform`'s tree draw its partner images from the whole dataset (as
    Ultralytics does with cache=ram) instead of from a buffer of the images this worker loaded last; returns how
    many it changed. A Mosaic without the `buffer_enabled` switch is a changed Ultralytics."""
    from ultralytics.data.augment import Mosaic

    changed_count = 0
    if isinstance(transform, Mosaic):
        require(transform, "buffer_enabled", "ultralytics", "mosaic partners drawn from the whole dataset")
    if hasattr(transform, "buffer_enabled"):
        transform.buffer_enabled = False
        changed_count += 1
    for child in (*getattr(transform, "transforms", ()), getattr(transform, "pre_transform", None)):
        if child is not None:
            changed_count += mosaic_from_whole_dataset(child)
    return changed_count


def model_class(name: str) -> Any:
    """The class Ultralytics' parse_model would use for a layer's module name (it looks names up among its tasks
    module's globals), or None."""
    from ultralytics.nn import tasks

    return vars(tasks).get(name)


def ema_decay(*, decay: float, tau: float):
    """ModelEMA's decay ramp, updates -> decay (its `decay` attribute), so a sharded EMA decays exactly as it does."""
    from ultralytics.utils.torch_utils import ModelEMA

    return require(ModelEMA(nn.Module(), decay=decay, tau=tau), "decay", "ultralytics", "the EMA's decay ramp")


def prepare_metrics(validator, model: nn.Module, data: dict) -> None:
    """Give `validator` its task's metrics object before its first run, as its own run does first (init_metrics):
    DepthValidator makes its DepthMetrics there only, and results.csv's columns are its keys from the first epoch on,
    validated or not."""
    validator.data = data
    try:
        validator.init_metrics(model)
    except AttributeError as error:
        raise changed("ultralytics", f"a validator's init_metrics(model) ({error})", "the results.csv columns") from None


class _TrainerView:
    """The attributes DetectionValidator reads from a trainer when it validates during training."""

    def __init__(self, *, device: torch.device, data: dict, model: nn.Module, loss_names: tuple[str, ...],
                 world_size: int):
        self.device, self.data, self.world_size = device, data, world_size
        self.ema = SimpleNamespace(ema=model)
        self.loss_items = {k: torch.zeros((), device=device) for k in loss_names}
        self.amp = False  # the EMA weights are fp32; validate them in fp32 under every policy
        self.epoch, self.epochs = 0, 1  # the final epoch: the validator then plots, if its args say so
        self.stopper = SimpleNamespace(possible_stop=False)

    @staticmethod
    def label_loss_items(loss_items: dict | None = None, prefix: str = "train"):
        return {f"{prefix}/{k}": round(float(v), 5) for k, v in (loss_items or {}).items()}


def validate_in_training_mode(validator, model: nn.Module, *, device: torch.device, data: dict,
                              loss_names: tuple[str, ...], world_size: int, plots: bool) -> dict[str, float] | None:
    """Run a DetectionValidator as Ultralytics' trainer does between epochs (losses included; under a process group
    it gathers every rank's statistics), on a stand-in for the trainer with what the validator reads of one. With
    `plots`, the validator plots (curves, confusion matrix, sample batches)."""
    view = _TrainerView(device=device, data=data, model=model, loss_names=loss_names, world_size=world_size)
    validator.args.plots = plots  # the validator narrows it in place (`&=` the final epoch) on every call
    try:
        return validator(trainer=view)
    except AttributeError as error:
        raise changed("ultralytics", f"a trainer attribute DetectionValidator reads ({error})",
                      "validation during training") from None


# ---- callbacks, loggers and plots -------------------------------------------------------------------------------
# Ultralytics' usage analytics and its Platform upload send to Ultralytics' servers: never from this trainer
_SENDS_TO_ULTRALYTICS = ("ultralytics.utils.events", "ultralytics.utils.callbacks.platform")
_TENSORBOARD, _MLFLOW = "ultralytics.utils.callbacks.tensorboard", "ultralytics.utils.callbacks.mlflow"


def trainer_events() -> tuple[str, ...]:
    """The events Ultralytics' trainer fires (its default callbacks up to `teardown`; the rest are the validator's,
    predictor's and exporter's)."""
    from ultralytics.utils.callbacks.base import default_callbacks

    events = tuple(default_callbacks)
    if "teardown" not in events or "on_fit_epoch_end" not in events:
        raise changed("ultralytics", "the trainer events of callbacks.base.default_callbacks", "callbacks")
    return events[:events.index("teardown") + 1]


def trainer_method(name: str, trainer_class: type) -> Callable:
    """A method of Ultralytics' trainer of a task (`trainer_class`: DetectionTrainer, PoseTrainer, ...), to call on a
    stand-in that has the attributes it reads (label_loss_items: loss_names; the plots: save_dir, on_plot, data,
    train_loader, and the trainer's own helper methods, e.g. the semantic trainer's get_class_counts)."""
    return require(trainer_class, name, "ultralytics", "the trainer's callbacks and plots")


def run_args(hyp: Any, *, save_dir: Path) -> Any:
    """The trainer's `args` as Ultralytics' integrations read them: the run's hyper-parameters, with `name`, `project`
    and `save_dir` those of the run folder actually used (train-2 when train existed)."""
    from copy import copy

    args = copy(hyp)
    args.save_dir, args.name, args.project = str(save_dir), Path(save_dir).name, str(Path(save_dir).parent)
    return args


def integration_callbacks(view) -> dict[str, list[Callable]]:
    """Ultralytics' default callbacks plus those of the logger integrations its settings switch on, as
    add_integration_callbacks gives a trainer (`view`'s class name holds 'Trainer'), without the two that send to
    Ultralytics' servers."""
    from ultralytics.utils.callbacks import base

    view.callbacks = base.get_default_callbacks()
    base.add_integration_callbacks(view)
    if not any(getattr(f, "__module__", "") == _SENDS_TO_ULTRALYTICS[0] for fs in view.callbacks.values() for f in fs):
        raise changed("ultralytics", f"the analytics callbacks in {_SENDS_TO_ULTRALYTICS[0]}", "callbacks that never "
                      "send to Ultralytics' servers")
    return defaultdict(list, {event: [f for f in functions if getattr(f, "__module__", "") not in _SENDS_TO_ULTRALYTICS]
                              for event, functions in view.callbacks.items()})


def drop_model_graph(callbacks: dict[str, list[Callable]]) -> bool:
    """Remove TensorBoard's model-graph callback (it traces the whole model); True if it was there."""
    kept = [f for f in callbacks.get("on_train_start", []) if getattr(f, "__module__", "") != _TENSORBOARD]
    dropped = len(kept) != len(callbacks.get("on_train_start", []))
    callbacks["on_train_start"] = kept
    return dropped


def system_metric_loggers() -> dict[str, list[Callable]]:
    """Callbacks that send each optimizer step's `view.step_metrics` (as sys/NAME, x = the step) to the TensorBoard
    writer and the MLflow run Ultralytics' integrations opened, when they did."""

    def log_step(view) -> None:
        scalars = {f"sys/{k}": float(v) for k, v in view.step_metrics.items()}
        tensorboard, mlflow = sys.modules.get(_TENSORBOARD), sys.modules.get(_MLFLOW)
        # its WRITER exists only where the integration could start (not under pytest or CI, as Ultralytics decides)
        if tensorboard is not None and getattr(tensorboard, "WRITER", None) is not None:
            require(tensorboard, "_log_scalars", "ultralytics", "TensorBoard scalars")(scalars, view.step)
        if mlflow is not None and getattr(view, "_mlflow_active", False):
            sanitize = require(mlflow, "sanitize_dict", "ultralytics", "MLflow metric names")
            require(mlflow, "mlflow", "ultralytics", "the MLflow module").log_metrics(sanitize(scalars), step=view.step)

    return {"optimizer_step": [log_step]}


def use_local_font() -> None:
    """Ultralytics' plots label with Arial, downloaded on first use; with nothing to download, take it from
    Ultralytics' config folder if a user put it there, else matplotlib's own DejaVu Sans (installed with it)."""
    from matplotlib import font_manager
    from ultralytics.utils import USER_CONFIG_DIR, plotting

    require(plotting, "check_font", "ultralytics", "the plots' font")

    def local_font(font: str = "Arial.ttf") -> Path:
        mine = USER_CONFIG_DIR / Path(font).name
        return mine if mine.exists() else Path(font_manager.findfont("DejaVu Sans"))

    plotting.check_font = local_font


# ---- sharded initialisation -----------------------------------------------------------------------------------------
def build_layer_by_layer(cfg: dict, *, nc: int, take: Callable[[nn.Module, bool], None],
                         model_class: type | None = None) -> nn.Module:
    """A DetectionModel (or `model_class`, a subclass: the segment, pose, OBB and depth models, whose __init__ adds
    nothing but attributes read from `cfg`) built as model_class(cfg, nc=nc) builds it, handing each top-level layer to `take(layer,
    last)` as soon as Ultralytics' parse_model has made it, so that no process holds every layer at once: `take` keeps
    its share and leaves the layer's tensors on the meta device. The random generator is drawn exactly as in the
    whole build (the same constructors in the same order), so every value is the whole build's.

    The rest of DetectionModel.__init__ is done here: its stride probe (a forward pass) runs on the meta device, where
    it needs only shapes; the head is handed over last, after bias_init has written its biases from the strides.
    A layer counts as made when parse_model sets its `type` after its `i` and `f` (Module.__setattr__ is watched
    for that while the layers are made)."""
    from torch.func import functional_call
    from ultralytics.nn import tasks
    from ultralytics.nn.modules.head import Detect
    from ultralytics.utils.torch_utils import initialize_weights

    initialise = require(tasks, "_initialize_yolo_model", "ultralytics", "DetectionModel's layers built from a yaml")
    count = len(cfg["backbone"]) + len(cfg["head"])
    shapes: dict[str, torch.Size] = {}  # the full shape of every parameter and buffer handed over

    def made(layer: nn.Module) -> None:
        if layer.i != count - 1:  # the head waits for its biases
            shapes.update((f"model.{layer.i}.{k}", t.shape) for k, t in _tensors_of(layer))
            take(layer, False)

    model_class = model_class or tasks.DetectionModel
    model = model_class.__new__(model_class)
    nn.Module.__init__(model)
    with _each_layer_made(made):
        initialise(model, cfg, 3, nc, False)
    if len(model.model) != count:
        raise changed("ultralytics", "parse_model's layers (one per yaml row)", "sharded initialisation")
    head = model.model[-1]
    if isinstance(head, Detect):  # as DetectionModel.__init__: strides from a 256 px probe, then the biases
        probe = 256
        head.inplace = model.inplace
        state = {k: torch.empty(shapes.get(k, t.shape), dtype=t.dtype, device="meta") for k, t in _tensors_of(model)}
        model.model.eval()
        head.training = True
        output = functional_call(model, state, (torch.zeros(1, 3, probe, probe, device="meta"),))
        output = output.get("one2many", output) if isinstance(output, dict) else output
        feats = output["feats"] if isinstance(output, dict) else output
        head.stride = torch.tensor([probe / x.shape[-2] for x in feats])
        model.stride = head.stride
        model.model.train()
        head.bias_init()
    else:
        model.stride = torch.Tensor([32])
    initialize_weights(model)
    if "kpt_shape" in cfg:  # PoseModel.__init__'s own attribute
        model.kpt_shape = cfg["kpt_shape"]
    take(head, True)
    return model


def _tensors_of(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


@contextlib.contextmanager
def _each_layer_made(callback: Callable[[nn.Module], None]) -> Iterator[None]:
    original = nn.Module.__setattr__

    def watch(module: nn.Module, name: str, value: Any) -> None:
        original(module, name, value)
        if name == "type" and isinstance(value, str) and "i" in module.__dict__ and "f" in module.__dict__:
            callback(module)

    nn.Module.__setattr__ = watch
    try:
        yield
    finally:
        nn.Module.__setattr__ = original
