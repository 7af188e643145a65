"""Every Ultralytics internal parallel_yolo relies on: its trainer's optimizer builder called without a trainer,
MuSGD's fields and its Muon update, the mosaic transform's sample buffer, the module classes its model parser looks
up. Each has a test in tests/test_ultralytics_internals.py; a release that moves one raises LibraryChanged here, by
name, instead of training differently from Ultralytics without a word.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ._internals import changed, require

__all__ = ["build_optimizer", "musgd_fields", "musgd_defaults", "muon_update", "mosaic_from_whole_dataset",
           "model_class"]


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
