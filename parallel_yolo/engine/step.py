"""One iteration's forward and backward through the strategy: what `train` runs and `compare` times."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..data import loader as datamod
from ..tasks import yolo

__all__ = ["forward_backward", "micro_batches"]


def micro_batches(batch: dict[str, Any], *, micro: int, device: torch.device, per_object: tuple[str, ...],
                  channels_last: bool = False) -> list[dict[str, Any]]:
    """A loader batch cut into micro-batches on the host (`per_object`: the task's keys with a row per object), then
    each moved to the device (cutting on the device would index with masks there: a host synchronisation per
    micro-batch)."""
    return [datamod.preprocess(part, device, channels_last=channels_last)
            for part in datamod.split_batch(batch, micro, per_object=per_object)]


def forward_backward(strategy, criterion, parts: list[dict[str, Any]], *, sync: bool, mean_loss: bool
                     ) -> tuple[torch.Tensor, tuple[str, ...] | None]:
    """Forward and backward over the micro-batches of this process's share of an iteration; returns the mean loss
    items (on the device) and their names when the loss names them (None: box, cls, dfl). `compare` times this.

    Every strategy averages gradients over ranks. Ultralytics' losses are per-image sums, except classification's
    mean (`mean_loss`): a sum is multiplied by the world size, a mean divided by the micro-batches, so that the
    gradient is one process's on the whole batch for any number of processes and micro-batches. (Ultralytics' own
    DDP multiplies the classification mean by the world size too, so its gradient grows with the GPU count.)
    """
    total, names = 0, None
    scale = 1 / len(parts) if mean_loss else strategy.world_size
    for j, part in enumerate(parts):
        last = sync and j == len(parts) - 1
        with contextlib.nullcontext() if last else strategy.no_sync():
            with strategy.autocast():
                preds = strategy.model(part["img"])
            loss, items = criterion(yolo.to_float(preds), part)
            strategy.backward(loss.sum() * scale)
        if isinstance(items, dict):
            names = tuple(items)
            items = torch.stack([torch.as_tensor(v, device=strategy.device) for v in items.values()])
        total = total + items.detach().float()
    return total / len(parts), names
