"""The strategy contract: everything the trainer needs from a parallelism backend, and nothing else.

A strategy wraps the model and optimizer, translates the precision policy, runs backward and the optimizer step
(unscale, global-norm clip, skip non-finite, step, zero grads), and owns the collectives. The trainer calls these
methods and never asks which backend it is talking to.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ..launch.dist import DistEnv, broadcast_object, gather_object
from ..monitor import memory
from ..optim.ema import ShardedEMA
from .precision import PrecisionPolicy

__all__ = ["Strategy", "ReplicatedEMA", "ParamShard", "OptimizerSpan", "MAX_GRAD_NORM", "host_values"]

MAX_GRAD_NORM = 10.0  # Ultralytics' optimizer_step clips at 10.0


@dataclass(frozen=True, slots=True)
class OptimizerSpan:
    """Where the optimizer state of elements [lo, hi) of a parameter lives on this rank: in the state of the
    tensor `key` (what the inner torch optimizer steps: the parameter, or a flat ZeRO partition), from `offset`."""

    lo: int
    hi: int
    key: torch.Tensor
    offset: int
    share: tuple[int, int] = (0, 1)


@dataclass(frozen=True, slots=True)
class ParamShard:
    """The part of one parameter a rank holds: flat elements [lo, hi) of the full tensor, in `values` (a 1-D view
    into live storage). `share=(i, n)`: n ranks hold the same range and this one writes the i-th part of it.
    `full`: a whole-tensor copy the backend also keeps (ZeRO-3 persistent parameters), refreshed on load."""

    name: str
    shape: tuple[int, ...]
    lo: int
    hi: int
    values: torch.Tensor
    share: tuple[int, int]
    optimizer: OptimizerSpan | None
    full: torch.Tensor | None = None


class Strategy:
    name: ClassVar[str]
    """Registry key: what `strategy=` and the preset file are called."""
    supports_loss_scaling: ClassVar[bool] = True
    """Whether precision=fp16-mixed (dynamic loss scaling) is possible."""
    sharded: ClassVar[frozenset[str]] = frozenset()
    """Model states split over the ranks: of params, grads, optimizer_state (memory.formula's categories)."""
    master_copy: ClassVar[bool] = False
    """Whether the backend keeps a separate fp32 copy of the weights (zero3_offload's master partitions in CPU memory)."""
    comm_volume: ClassVar[float | None] = 0.0
    """Bytes sent per step in theory, in units of (N-1)/N x the gradient bytes (comm.py's ring algorithms): DDP
    all-reduces the gradients (2); ZeRO-3 / FSDP also gather the parameters twice (3); None: no simple formula."""

    def __init__(self, *, env: DistEnv, device: torch.device, precision: PrecisionPolicy, options: dict[str, Any]):
        self.env = env
        self.device = device
        self.precision = precision
        self.options = options
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.loss_scaling)
        self.skipped_steps = 0
        if "params" in self.sharded and options.get("sharded_init", True):
            memory.load_meta_kernels()  # sharded initialisation probes the model on the meta device
        self.baseline_rss = memory.current_rss()  # before the model exists: what memory_report() subtracts

    # ---- identity and collectives -------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, *, mean: bool = False) -> torch.Tensor:
        """Sum (or average) a tensor over ranks, in place; returns it for chaining. `tensor` must live on
        `self.device` (NCCL serves CUDA tensors only). With a process group the collective runs even for one
        rank, so that one GPU under torchrun makes the calls eight do."""
        if self.distributed:
            dist.all_reduce(tensor)
            if mean:
                tensor /= self.world_size
        return tensor

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's value of a picklable object, in rank order, on every rank."""
        return gather_object(obj)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object, on every rank."""
        return broadcast_object(obj)

    # ---- model and optimizer -------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, *, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
              ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap `model`, build the optimizer over the parameters the wrapped model trains, and tell an optimizer that
        needs whole matrices (DistributedMuSGD) where every rank's pieces of them are (a collective)."""
        from ..optim import DistributedMuSGD
        from . import gloo

        wrapped = self.wrap(model, make_optimizer=make_optimizer)
        gloo.apply(self)  # CPU runs only: faster equivalents of gloo's collectives, unless switched off
        if isinstance(self.inner_optimizer(), DistributedMuSGD):
            self.inner_optimizer().bind(self)
        return wrapped

    def layer_keeper(self) -> Callable[[nn.Module, bool], None] | None:
        """Strategies that shard parameters: a function that takes each layer as Ultralytics builds it (and whether
        it is the last), keeps this rank's share of it and leaves the layer's tensors on the meta device, so that
        no rank ever holds the whole model (yolo.build_model); `wrap` then shards the model so built. None: the
        model is built whole (the option `sharded_init: false` asks for that too)."""
        return None

    def full_shape(self, tensor: torch.Tensor) -> torch.Size:
        """The whole shape of one of the model's parameters or buffers before `setup` (ZeRO-3 partitions them while
        the model is built: sharded initialisation)."""
        return tensor.shape

    def wrap(self, model: nn.Module, *, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
             ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The backend's part of setup: wrap the model, then build the optimizer (`make_optimizer` receives the
        unwrapped module so Ultralytics' param-group rules see the real module tree)."""
        raise NotImplementedError

    @property
    def raw_model(self) -> nn.Module:
        """The unwrapped module (parameters may be shards under sharded strategies)."""
        return self._raw

    def autocast(self) -> contextlib.AbstractContextManager:
        """Low-precision compute for the forward pass; the loss is computed outside, in fp32."""
        policy = self.precision
        return torch.autocast(self.device.type, dtype=policy.compute_dtype, enabled=policy.mixed)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def expose_communication(self) -> None:
        """Route the backend's collectives through torch.distributed's Python functions, where comm.CommCounter
        counts them (DeepSpeed and FSDP2 use them already)."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context for a backward that only accumulates (no gradient communication)."""
        return contextlib.nullcontext()

    def step(self, report: torch.Tensor | None = None) -> tuple[float, bool, list[float]]:
        """Unscale, clip to the global norm, step unless non-finite, zero grads. Returns (grad norm, stepped, the
        values of `report`): the norm and `report` reach the host in one copy, the step's only synchronisation."""
        self.scaler.unscale_(self.optimizer)
        norm, values = host_values(self.clip_grad_norm(MAX_GRAD_NORM), report)
        finite = math.isfinite(norm)
        if finite:
            # not scaler.step: it would read the scaler's inf flag on the host again, a second synchronisation;
            # after unscale_ that flag is set exactly when the norm is not finite
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, finite, values

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm over ALL gradients of the model (every shard on every rank); the norm stays on the
        device."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's param groups, where the trainer sets lr and momentum."""
        return self.optimizer.param_groups

    # ---- buffers, EMA and state ----------------------------------------------------------------------------------
    def averaged_copies(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of replicated tensors (BatchNorm running stats) averaged over ranks: identical on every rank.

        Each rank's own tensors are left as they are, so validating or saving never changes the training run.
        """
        copies = {k: t.detach().clone() for k, t in tensors.items()}
        self.average_over_ranks(copies.values())
        return copies

    def average_over_ranks(self, tensors: Iterable[torch.Tensor]) -> None:
        """In-place mean over ranks of the floating-point tensors given (replicated tensors only)."""
        if not self.distributed:
            return
        for tensor in tensors:
            if tensor.dtype.is_floating_point:
                dist.all_reduce(tensor)
                tensor /= self.world_size

    def param_shards(self) -> list[ParamShard]:
        """What this rank holds of every parameter and of its optimizer state (checkpoints read and write these)."""
        share = (self.rank, self.world_size)
        return [ParamShard(name, tuple(p.shape), 0, p.numel(), p.data.view(-1), share,
                           OptimizerSpan(0, p.numel(), p, 0, share))
                for name, p in self.raw_model.named_parameters()]

    def after_load(self) -> None:
        """Refresh whatever the backend derives from the parameters (ZeRO's fp32 master partitions)."""

    def memory_report(self, ema: Any) -> dict[str, int]:
        """Bytes this rank holds by category (unique storages) and its peak memory; see parallel_yolo.memory."""
        grads = [p.grad for p in self.raw_model.parameters()] + self._extra_grad_tensors()
        state = [t for s in self.inner_optimizer().state.values() for t in s.values()]
        return memory.report(params=self._local_params(), master=self._master_params(), grads=grads,
                             optimizer_state=state, ema=ema.tensors(), baseline=self.baseline_rss, device=self.device)

    def shard_ranks(self) -> int:
        """Over how many ranks the `sharded` states are split (HSDP: the ranks of one node)."""
        return self.world_size

    def _local_params(self) -> list[torch.Tensor]:
        return list(self.raw_model.parameters())

    def _master_params(self) -> list[torch.Tensor]:
        return []

    def _extra_grad_tensors(self) -> list[torch.Tensor]:
        """Gradient storage a backend keeps outside `param.grad` (buckets, flat partitions)."""
        return []

    def inner_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    def optimizer_units(self) -> list[list[torch.Tensor]]:
        """The tensors the inner optimizer steps, in the groups the backend steps together, one step() call each
        (the same number and order on every rank): here one call over all of them."""
        return [[p for group in self.inner_optimizer().param_groups for p in group["params"]]]

    def make_ema(self) -> ReplicatedEMA | ShardedEMA:
        """Ultralytics' ModelEMA where every rank holds whole parameters; else an EMA of this rank's shards."""
        return ShardedEMA(self) if "params" in self.sharded else ReplicatedEMA(self)

    def local_state(self) -> dict[str, torch.Tensor]:
        """This rank's shard of every parameter and the (replicated) buffers, by state-dict name: what the sharded EMA
        averages. Provided, with `assemble`, by the strategies that shard the parameters."""
        raise NotImplementedError(f"{self.name} holds whole parameters; its EMA is ReplicatedEMA")

    def assemble(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole tensors on CPU, in state-dict order, from every rank's `local_state()`-shaped values (collective)."""
        raise NotImplementedError(f"{self.name} holds whole parameters; nothing to assemble")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on CPU, buffers averaged over ranks (a collective). Copies, each with a storage
        of its own: under ZeRO-1/2 the parameters are views of one flat buffer, and pickling such views (torch.save,
        object collectives) writes the whole buffer once per tensor."""
        buffers = self.averaged_copies(dict(self.raw_model.named_buffers()))
        if "params" in self.sharded:
            return self.assemble({**self.local_state(), **buffers})
        return {k: buffers.get(k, v).detach().to("cpu", copy=True) for k, v in self.raw_model.state_dict().items()}


def host_values(norm: torch.Tensor | float | None, report: torch.Tensor | None) -> tuple[float, list[float]]:
    """(the norm, `report`'s values) as Python floats, in one device-to-host copy; a missing norm is NaN."""
    if not isinstance(norm, torch.Tensor):
        return (math.nan if norm is None else float(norm)), ([] if report is None else report.tolist())
    parts = [norm.detach().reshape(1).float()]
    if report is not None:
        parts.append(report.detach().reshape(-1).float().to(norm.device))
    norm, *values = torch.cat(parts).tolist()
    return norm, values


class ReplicatedEMA:
    """Ultralytics' ModelEMA over the unwrapped model, for strategies where every rank holds the full weights."""

    def __init__(self, strategy: Strategy):
        from ultralytics.utils.torch_utils import ModelEMA

        self.strategy = strategy
        self._ema = ModelEMA(strategy.raw_model)

    @property
    def updates(self) -> int:
        return self._ema.updates

    @updates.setter
    def updates(self, value: int) -> None:
        self._ema.updates = value

    def update(self) -> None:
        self._ema.update(self.strategy.raw_model)

    def update_attr(self) -> None:
        self._ema.update_attr(self.strategy.raw_model, include=["yaml", "nc", "args", "names", "stride"])

    def tensors(self) -> list[torch.Tensor]:
        return list(self._ema.ema.state_dict().values())

    def param_view(self, name: str, lo: int, hi: int) -> torch.Tensor:
        return self._ema.ema.get_parameter(name).data.view(-1)[lo:hi]

    def buffers(self) -> dict[str, torch.Tensor]:
        return dict(self._ema.ema.named_buffers())

    def full_model(self) -> nn.Module:
        """A copy of the EMA model for validation and export, its buffers averaged over ranks (collective)."""
        from copy import deepcopy

        model = deepcopy(self._ema.ema)
        self.strategy.average_over_ranks(model.buffers())
        return model
