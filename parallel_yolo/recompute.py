"""Activation checkpointing at YOLO-layer granularity that leaves BatchNorm exactly as a run without it.

A checkpointed layer keeps only its input through the forward pass and runs again in backward to rebuild what its
backward needs. torch's checkpoint re-runs it in train mode, so every BatchNorm inside would update its running
mean, variance and `num_batches_tracked` a second time (pytorch#96136): the recompute here runs inside a context
that saves those buffers first and puts them back after, so the running statistics are those of the one real
forward, bit for bit. The random generators are restored for the recompute by torch's checkpoint
(`preserve_rng_state`), and the recompute does not advance them.

The layers are checkpointed with hooks on the layer modules themselves (torch's composable checkpoint), not by
wrapping them, so Ultralytics' forward (which reads each layer's `f`, `i` and `type`) and the state-dict names are
unchanged; applied before the strategy wraps the model, the recompute runs the layer through its module call and
so through every strategy's hooks: FSDP2 gathers the layer's parameters again for it, ZeRO-3 fetches them again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ._torch_internals import checkpoint_module

__all__ = ["chosen_layers", "apply", "keep_batchnorm_statistics"]


def chosen_layers(model: nn.Module, mode: str) -> list[int]:
    """Indices into `model.model` of the layers `mode` (one of config.CHECKPOINTING, which the config validates)
    checkpoints; `all` leaves out layers without parameters (Concat, Upsample), which keep next to nothing for
    backward."""
    if mode == "none":
        return []
    count = len(model.yaml["backbone"]) if mode == "backbone" else len(model.model)
    return [i for i, layer in enumerate(model.model) if i < count and any(True for _ in layer.parameters())]


def apply(model: nn.Module, mode: str) -> list[int]:
    """Checkpoint the layers `mode` names, BatchNorm-safe; returns their indices. Call before the strategy wraps."""
    chosen = chosen_layers(model, mode)
    for i in chosen:
        layer = model.model[i]
        checkpoint_module(layer, context_fn=lambda layer=layer: (contextlib.nullcontext(),
                                                                 keep_batchnorm_statistics(layer)))
    return chosen


@contextlib.contextmanager
def keep_batchnorm_statistics(module: nn.Module) -> Iterator[None]:
    """Whatever runs inside leaves the running statistics of `module`'s BatchNorm layers as they were."""
    saved = [(buffer, buffer.clone()) for bn in module.modules() if isinstance(bn, nn.modules.batchnorm._BatchNorm)
             for buffer in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if buffer is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
