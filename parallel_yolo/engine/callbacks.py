"""Ultralytics' callback events, fired from our loop on rank 0, so that what a YOLO user already switched on keeps
working: the logger integrations of their Ultralytics settings (`yolo settings tensorboard=True mlflow=True ...`:
TensorBoard, MLflow, Weights & Biases, ClearML, Comet, DVCLive, Ray Tune) and callbacks of their own
(`parallel_yolo.add_callback`, as `YOLO.add_callback`).

Callbacks receive a stand-in for Ultralytics' trainer (`TrainerView`) with what the integrations read of one: `args`,
`save_dir`, `epoch`, `epochs`, `tloss`, `label_loss_items`, `lr`, `metrics`, `fitness`, `best_fitness`, `best`,
`last`, `validator`, `optimizer`, `model`, `data`, `device`, `plots`, ...; plus `step` and `step_metrics` (images/s,
step time, data wait, every rank's peak memory) for the `optimizer_step` event, which fires after every optimizer
step. Events fire in Ultralytics' order: on_pretrain_routine_start/end, on_train_start, then per epoch
on_train_epoch_start, on_train_batch_start/end per iteration, on_train_epoch_end, on_model_save, on_fit_epoch_end;
on_train_end and teardown (also after a failure) at the end.

Under strategies that shard parameters the model graph is not logged: tracing it would gather the whole model on
one rank, the memory sharding exists to avoid.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import MethodType
from typing import Any

from .. import _ultralytics_internals as ul
from ..config import ConfigError, suggest

__all__ = ["add_callback", "clear_callbacks", "Hooks", "TrainerView"]

_ADDED: dict[str, list[Callable]] = defaultdict(list)


def add_callback(event: str, callback: Callable[[Any], None]) -> None:
    """Call `callback(trainer)` at `event` in every run this process starts from now on (rank 0 only), as
    `YOLO.add_callback` does for Ultralytics' trainer. Under torchrun or accelerate launch every process runs your
    script, so register before `train()`."""
    events = ul.trainer_events()
    if event not in events:
        raise ConfigError(f"add_callback: unknown event '{event}'{suggest(event, events)}; the training events "
                          f"are {', '.join(events)}")
    if not callable(callback):
        raise ConfigError(f"add_callback('{event}', ...): {callback!r} is not callable")
    _ADDED[event].append(callback)


def clear_callbacks() -> None:
    """Forget every callback add_callback registered."""
    _ADDED.clear()


class TrainerView:
    """What Ultralytics' integration callbacks read of its trainer, read live from our Trainer. Its class name holds
    'Trainer': Ultralytics gives the training integrations only to objects so named."""

    def __init__(self, trainer, *, save_dir: Path):
        self._t = trainer
        # the methods of the task's own trainer (its loss labels and its plots), bound to this view
        self._trainer_class = trainer.task.trainer_class()
        for name in ("label_loss_items", "plot_training_samples", "plot_training_labels"):
            setattr(self, name, MethodType(ul.trainer_method(name, self._trainer_class), self))
        self.args = ul.run_args(trainer.hyp, save_dir=save_dir)
        self.save_dir = Path(save_dir)
        self.wdir = self.save_dir / "weights"
        # Ultralytics' file names: consolidate a checkpoint folder to have them (integrations skip missing files)
        self.best, self.last = self.wdir / "best.pt", self.wdir / "last.pt"
        self.csv = self.save_dir / "results.csv"
        self.epochs, self.batch_size = trainer.cfg.epochs, trainer.cfg.batch
        self.data, self.device = trainer.data, trainer.device
        self.epoch, self.tloss, self.metrics, self.fitness, self.epoch_time = 0, None, {}, None, None
        self.step_metrics: dict[str, float] = {}
        self.plots: dict[Path, dict] = {}
        self.stop = False
        self.callbacks: dict[str, list[Callable]] = defaultdict(list)
        self.loss_names = trainer.loss_names

    def __getattr__(self, name: str):
        """A helper method of the task's trainer that one of its bound methods calls (only reached for names the
        view does not have itself)."""
        method = getattr(self.__dict__.get("_trainer_class"), name, None) if not name.startswith("__") else None
        if not callable(method) or isinstance(method, type):
            raise AttributeError(name)
        return MethodType(method, self)

    @property
    def model(self):
        return self._t.strategy.raw_model

    @property
    def ema(self):
        return self._t.ema

    @property
    def optimizer(self):
        return self._t.strategy.inner_optimizer()

    @property
    def validator(self):
        return self._t.evaluator.validator

    @property
    def train_loader(self):
        return self._t.train_loader

    @property
    def best_fitness(self):
        return self._t.best_fitness

    @property
    def step(self) -> int:
        return self._t.step

    @property
    def lr(self) -> dict[str, float]:
        return {f"lr/pg{i}": group["lr"] for i, group in enumerate(self._t.groups)}

    def add_callback(self, event: str, callback: Callable) -> None:
        self.callbacks[event].append(callback)

    def on_plot(self, name, data=None) -> None:
        self.plots[Path(name)] = {"data": data, "timestamp": time.time()}


class Hooks:
    """The callbacks of one run: fired on rank 0 only, nothing on the other ranks."""

    def __init__(self, trainer, *, save_dir: Path, active: bool, plots: bool, sharded_params: bool):
        self.view = TrainerView(trainer, save_dir=save_dir) if active else None
        self.plots = plots and active
        if self.plots:
            ul.use_local_font()
        if self.view is None:
            return
        self.view.callbacks = ul.integration_callbacks(self.view)
        _hint_missing_loggers()
        if sharded_params and ul.drop_model_graph(self.view.callbacks):
            print("TensorBoard: model graph not logged: the parameters are sharded, and tracing the model would "
                  "gather all of it on one rank", flush=True)
        for event, functions in ul.system_metric_loggers().items():
            self.view.callbacks[event].extend(functions)
        for event, functions in _ADDED.items():
            self.view.callbacks[event].extend(functions)

    def plot_labels(self) -> None:
        """labels.jpg: the training set's boxes and classes, as Ultralytics plots them before training."""
        if self.plots:
            self.view.plot_training_labels()

    def plot_batch(self, batch: dict, ni: int) -> None:
        """train_batch{ni}.jpg: a training batch as the model sees it (mosaics, labels)."""
        if self.plots:  # a copy of the dict: Ultralytics' plot_images turns its tensors into arrays in place
            self.view.plot_training_samples(dict(batch), ni)

    def plot_results(self) -> None:
        """results.png from results.csv, as Ultralytics' trainer ends."""
        from ultralytics.utils.plotting import plot_results

        if self.plots and self.view.csv.exists():
            plot_results(file=self.view.csv, on_plot=self.view.on_plot)

    def fire(self, event: str, **state: Any) -> None:
        """Set the view's `state` (epoch=, tloss=, metrics=, ...) and call every callback of `event`."""
        if self.view is None:
            return
        for key, value in state.items():
            setattr(self.view, key, value)
        for callback in self.view.callbacks.get(event, ()):
            callback(self.view)


def _hint_missing_loggers() -> None:
    """One line for a logger switched on in Ultralytics' settings whose library is not installed (Ultralytics skips
    it without a word). TensorBoard only: MLflow is on in Ultralytics' default settings, asked for or not."""
    import importlib.util

    from ultralytics.utils import SETTINGS

    if SETTINGS.get("tensorboard") and importlib.util.find_spec("tensorboard") is None:
        print("TensorBoard is on in Ultralytics' settings but not installed, so nothing is logged to it: "
              "pip install 'parallel_yolo[tensorboard]', or `yolo settings tensorboard=False`", flush=True)
