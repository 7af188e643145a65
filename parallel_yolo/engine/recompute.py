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

`auto` chooses the layers from a forecast: one forward pass of one image on the meta device (shapes only: no
memory, no arithmetic) records, per layer, the storages autograd keeps for backward, the layer's inputs and its
floating-point operations (torch's FlopCounterMode). A set of recomputed layers then keeps the others' storages,
the recomputed layers' inputs and, during backward, the largest recomputed layer's own storages; the forecast is
that (counted once per storage; as if all were held at once, an upper bound: backward lets the later layers'
storages go before it reaches a recomputed one) times the images per forward pass, plus the model states the
strategy holds (memory.formula). Layers are added greedily, most bytes saved per operation recomputed first, until the
forecast fits `budget`, then any that the fit no longer needs are dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .._torch_internals import checkpoint_module

__all__ = ["chosen_layers", "apply", "keep_batchnorm_statistics", "choose", "Profile", "profile", "plan",
           "NoPlanFits"]

# Measured against this forecast (compare's activation memory on CPU, yolov8x 640 px): the step's peak holds ~10%
# more than the storages autograd keeps (gradients of the activations in flight, the loss), with and without recompute
TRANSIENT = 1.1


def chosen_layers(model: nn.Module, mode: str) -> list[int]:
    """Indices into `model.model` of the layers `mode` (one of config.CHECKPOINTING, which the config validates)
    checkpoints; `all` leaves out layers without parameters (Concat, Upsample), which keep next to nothing for
    backward."""
    if mode == "none":
        return []
    count = len(model.yaml["backbone"]) if mode == "backbone" else len(model.model)
    return [i for i, layer in enumerate(model.model) if i < count and any(True for _ in layer.parameters())]


def apply(model: nn.Module, mode: str | Iterable[int]) -> list[int]:
    """Checkpoint the layers `mode` names (or the layer indices given), BatchNorm-safe; returns their indices. Call
    before the strategy wraps."""
    chosen = chosen_layers(model, mode) if isinstance(mode, str) else sorted(mode)
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


# ---- auto: the least recompute that fits a budget -------------------------------------------------------------------
@dataclass
class Profile:
    """Per layer of `model.model`, for one image: the storages autograd keeps for backward (id -> bytes; parameters
    and buffers left out), the storages of the layer's inputs, and its forward's floating-point operations."""
    saved: list[dict[int, int]]
    inputs: list[dict[int, int]]
    flops: list[int]
    candidates: list[int]  # the layers `all` would recompute

    def activation_bytes(self, recomputed: Iterable[int]) -> int:
        """Bytes of activations per image at the step's peak with `recomputed` layers checkpointed (see TRANSIENT)."""
        recomputed = set(recomputed)
        kept: dict[int, int] = {}
        for i, saved in enumerate(self.saved):
            kept.update(self.inputs[i] if i in recomputed else saved)
        rebuilt = max((sum(self.saved[i].values()) for i in recomputed), default=0)
        return int(TRANSIENT * (sum(kept.values()) + rebuilt))


def profile(model: nn.Module, imgsz: int, channels: int = 3, *,
            full_shape: Callable[[torch.Tensor], torch.Size] = lambda t: t.shape) -> Profile:
    """A Profile of `model` (an unwrapped Ultralytics model, in train mode) from a forward pass on the meta device.
    `full_shape`: a tensor's whole shape (Strategy.full_shape, for a model whose build partitioned it)."""
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    state = {k: torch.empty(full_shape(v), dtype=v.dtype, device="meta").requires_grad_(v.requires_grad)
             for k, v in model.named_parameters()}
    state.update({k: torch.empty(full_shape(v), dtype=v.dtype, device="meta") for k, v in model.named_buffers()})
    weights = {id(t.untyped_storage()) for t in state.values()}
    layers = list(model.model)
    saved: list[dict[int, int]] = [{} for _ in layers]
    inputs: list[dict[int, int]] = [{} for _ in layers]
    alive: list[torch.UntypedStorage] = []  # ids stay unique only while the storages live
    current = [0]

    def enter(layer: nn.Module, args: tuple) -> None:
        current[0] = layer.i
        for t in _tensors(args):
            alive.append(t.untyped_storage())
            inputs[layer.i][id(alive[-1])] = alive[-1].nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if id(storage) not in weights:
            alive.append(storage)
            saved[current[0]][id(storage)] = storage.nbytes()
        return t

    hooks = [layer.register_forward_pre_hook(enter) for layer in layers]
    try:
        with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            functional_call(model, state, (torch.zeros(1, channels, imgsz, imgsz, device="meta"),))
    finally:
        for hook in hooks:
            hook.remove()
    counts = counter.get_flop_counts()
    root = type(model).__name__
    flops = [sum(counts.get(f"{root}.model.{i}", {}).values()) for i in range(len(layers))]
    return Profile(saved, inputs, flops, chosen_layers(model, "all"))


def choose(model: nn.Module, mode: str, *, strategy, optimizer: str, images: int, imgsz: int,
           budget: int | None, profiled: Profile | None = None) -> tuple[list[int], str | None]:
    """The layers `mode` recomputes, and for `auto` a line saying what it chose and why (ConfigError, naming what
    to change, when even `all` does not fit). The model states are the strategy's per-rank share
    (memory.formula); under optimizer=auto, counted as AdamW's (at least MuSGD's). `profiled`: the model's
    Profile at `imgsz`, when the caller has it already."""
    from ..config import ConfigError
    from ..monitor import memory

    if mode != "auto":
        return chosen_layers(model, mode), None
    numel = sum(strategy.full_shape(p).numel() for p in model.parameters())
    states = sum(memory.strategy_formula(strategy, numel=numel, optimizer="AdamW" if optimizer == "auto" else optimizer,
                                         muon_numel=numel).values())
    profiled = profiled or profile(model, imgsz, full_shape=strategy.full_shape)
    try:
        layers, peak = plan(profiled, images=images, states=states, budget=budget)
    except NoPlanFits as e:
        raise ConfigError(f"activation_checkpointing=auto: {e}, over budget={_size(budget)}; lower batch or "
                          f"imgsz, use more processes or a sharded strategy (zero3, fsdp), or raise budget") from None
    return layers, (f"forecast {_size(peak)} per rank for {images} images of {imgsz} px per forward pass, "
                    f"budget {_size(budget)}")


class NoPlanFits(ValueError):
    """Even with every layer recomputed the forecast exceeds the budget."""


def plan(profile: Profile, *, images: int, states: int, budget: int) -> tuple[list[int], int]:
    """The layers to recompute and the forecast peak bytes: none if that fits `budget`, else layers added one at a
    time, the most activation bytes saved per operation recomputed first, until the forecast fits; then any layer
    whose removal still fits is dropped (the costliest first), so no chosen layer is unnecessary."""
    chosen: set[int] = set()

    def peak(layers: set[int]) -> int:
        return states + images * profile.activation_bytes(layers)

    while peak(chosen) > budget:
        rest = [i for i in profile.candidates if i not in chosen]
        if not rest:
            raise NoPlanFits(f"the forecast with every layer recomputed is {_size(peak(chosen))} per rank "
                             f"(model states {_size(states)} + activations of {images} images)")
        now = peak(chosen)
        chosen.add(max(rest, key=lambda i: (now - peak(chosen | {i})) / max(profile.flops[i], 1)))
    for i in sorted(chosen, key=lambda i: -profile.flops[i]):  # a layer chosen early may have become unnecessary
        if peak(chosen - {i}) <= budget:
            chosen.discard(i)
    return sorted(chosen), peak(chosen)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
