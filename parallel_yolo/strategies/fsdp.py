"""PyTorch FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the ranks.

`fsdp` reshards parameters after forward (ZeRO-3-like), `fsdp_grad_op` keeps them gathered until backward is
done (ZeRO-2-like: less communication, more memory), `hsdp` shards within a node and replicates across nodes on
a 2-D mesh. Each top-level YOLO layer is one FSDP unit, so only one layer's parameters are gathered at a time.

Precision: compute runs under autocast and FSDP keeps fp32 parameters. FSDP2's own MixedPrecisionPolicy casts
every parameter of a unit, BatchNorm included, and BatchNorm must stay fp32; autocast leaves batch_norm in fp32
by itself. The price is fp32 all-gathers, twice the bytes of bf16 ones.

torch's FSDP and DTensor modules are imported where they are used: they take ~0.6 s to import, which every other
strategy's processes (and every launcher) would pay for nothing.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from .._torch_internals import dtensor_global_offset
from .base import OptimizerSpan, ParamShard, Strategy
from .registry import register

__all__ = ["FSDPStrategy", "FSDPGradOpStrategy", "HSDPStrategy"]


@register
class FSDPStrategy(Strategy):
    name = "fsdp"
    reshard_after_forward = True
    sharded = frozenset({"optimizer_state", "grads", "params"})
    comm_volume = 3.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.precision.loss_scaling:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(self.device.type)  # found-inf must agree over all shards

    def _mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world_size,))

    @functools.cached_property
    def mesh(self):
        return self._mesh()

    def layer_keeper(self):
        """Sharded initialisation: of each layer Ultralytics builds, keep this rank's rows of every parameter (the
        layout fully_shard gives it: dim 0 split over the shard ranks, DTensor's Shard(0)) and the buffers, and
        leave the layer on the meta device; wrap then shards the meta model and fills the shards in."""
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        placements = [Replicate()] * (self.mesh.ndim - 1) + [Shard(0)]
        self._kept: dict[str, torch.Tensor] = {}

        def take(layer, last: bool) -> None:
            prefix = f"model.{layer.i}."
            for name, param in layer.named_parameters():
                local = distribute_tensor(param.detach(), self.mesh, placements, src_data_rank=None).to_local()
                self._kept[prefix + name] = local.clone()  # its own storage: the full tensor goes
            for name, buffer in layer.named_buffers():
                self._kept[prefix + name] = buffer.to(self.device, copy=True)
            layer.to("meta")

        return take if self.options.get("sharded_init", True) else None

    def wrap(self, model, *, make_optimizer):
        from torch.distributed.fsdp import fully_shard

        built_sharded = any(p.is_meta for p in model.parameters())
        if not built_sharded:
            model = model.to(self.device)
        reshard = self.options.get("reshard_after_forward", self.reshard_after_forward)
        for layer in model.model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=self.mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=self.mesh, reshard_after_forward=reshard)
        if built_sharded:
            self._fill_shards(model)
        self._raw = self.model = model
        self.optimizer = make_optimizer(model)
        self._shards = _LocalShards(self.optimizer)
        return self.model, self.optimizer

    def _fill_shards(self, model) -> None:
        """Storage for the local shards and buffers of a model built on the meta device, filled with what
        layer_keeper kept."""
        # Ultralytics' BaseModel._apply takes no `recurse`, which to_empty passes: allocate below the root (which holds
        # no tensors of its own); each layer's FSDP unit then points its sharded parameters at the new storage
        for child in model.children():
            child.to_empty(device=self.device)
        kept, self._kept = self._kept, {}
        with torch.no_grad():
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                local = tensor.to_local() if _is_dtensor(tensor) else tensor
                if local.shape != kept[name].shape:
                    raise RuntimeError(f"sharded initialisation: {name}'s shard on this rank is {tuple(local.shape)} "
                                       f"but the kept rows are {tuple(kept[name].shape)}; set sharded_init=false")
                local.copy_(kept.pop(name))

    def step(self, report: torch.Tensor | None = None) -> tuple[float, bool, list[float]]:
        self._shards.bind_grads()
        result = super().step(report)
        self.model.zero_grad(set_to_none=True)  # the DTensor gradients (the optimizer cleared its local views)
        return result

    def no_sync(self):
        @contextlib.contextmanager
        def accumulate_only():
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)

        return accumulate_only()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return norm.full_tensor() if _is_dtensor(norm) else norm

    # ---- shards ------------------------------------------------------------------------------------------------
    def local_state(self) -> dict[str, torch.Tensor]:
        """This rank's shard of every parameter, and the (replicated) buffers."""
        return {k: v.to_local() if _is_dtensor(v) else v for k, v in self.model.state_dict().items()}

    def assemble(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors from per-rank shards laid out like the live parameters (collective)."""
        from torch.distributed.tensor import DTensor

        out = {}
        for k, live in self.model.state_dict().items():
            if isinstance(live, DTensor):
                shard = DTensor.from_local(local[k], live.device_mesh, live.placements, shape=live.shape,
                                           stride=live.stride())
                out[k] = shard.full_tensor().cpu()
            else:
                out[k] = local[k].detach().cpu()
        return out

    def param_shards(self) -> list[ParamShard]:
        """FSDP2 shards dim 0 into contiguous row blocks, so each local shard is one flat range of the tensor;
        optimizer state is sharded exactly like its parameter. Under hsdp the replicas split the writing."""
        shards = []
        for name, p in self.model.named_parameters():
            local = p.to_local()
            offset = dtensor_global_offset(p)
            lo = offset[0] * math.prod(p.shape[1:]) if p.dim() else 0
            share = _replica_share(p)
            shards.append(ParamShard(name, tuple(p.shape), lo, lo + local.numel(), local.view(-1), share,
                                     OptimizerSpan(lo, lo + local.numel(), self._shards.key(p), 0, share)))
        return shards

    def _local_params(self) -> list[torch.Tensor]:
        return [p.to_local() for p in self.model.parameters()]


class _LocalShards:
    """Hands a torch optimizer the local shards of FSDP's DTensor parameters, as plain tensors, so that it runs its
    fused kernels (yolo.fused) or its foreach ones: DTensor has no rule for the fused ops, so on DTensors SGD, Adam and
    AdamW fall back to a loop over the tensors. Each element's update is the same (an optimizer's step is
    elementwise per tensor); the gradients are bound to their local views before each step. DistributedMuSGD keeps
    the DTensors: it steps local shards itself and needs to know which matrix each one is."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        from ..optim import DistributedMuSGD
        from ..tasks.yolo import fused

        self.optimizer = optimizer
        self.views: dict[int, torch.Tensor] = {}  # id of a DTensor parameter -> the local view the optimizer steps
        self.params: list = []
        if isinstance(optimizer, DistributedMuSGD):
            return
        for group in optimizer.param_groups:
            group["params"] = [self._view(p) for p in group["params"]]
        fused(optimizer)

    def _view(self, param) -> torch.Tensor:
        self.params.append(param)
        self.views[id(param)] = param.to_local().detach()
        return self.views[id(param)]

    def key(self, param) -> torch.Tensor:
        """The tensor the optimizer's state is kept under for `param`."""
        return self.views.get(id(param), param)

    def bind_grads(self) -> None:
        """Point each local view's .grad at its parameter's local gradient; re-key a view whose storage FSDP replaced
        (its lazy initialisation re-pads an empty shard)."""
        for param in self.params:
            view = self.views[id(param)]
            if param.to_local().data_ptr() != view.data_ptr():
                view = self._rekey(param, view)
            view.grad = None if param.grad is None else param.grad.to_local().detach()

    def _rekey(self, param, old: torch.Tensor) -> torch.Tensor:
        new = self.views[id(param)] = param.to_local().detach()
        for group in self.optimizer.param_groups:
            group["params"] = [new if t is old else t for t in group["params"]]
        if old in self.optimizer.state:
            self.optimizer.state[new] = self.optimizer.state.pop(old)
        return new


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _replica_share(p) -> tuple[int, int]:
    """(index, count) of this rank among the ranks that hold the same shard (the Replicate mesh dimensions)."""
    index, count = 0, 1
    for dim, placement in enumerate(p.placements):
        if placement.is_replicate():
            index = index * p.device_mesh.size(dim) + p.device_mesh.get_local_rank(dim)
            count *= p.device_mesh.size(dim)
    return index, count


@register
class FSDPGradOpStrategy(FSDPStrategy):
    name = "fsdp_grad_op"
    reshard_after_forward = False
    comm_volume = 2.0  # parameters gathered once, kept through backward


@register
class HSDPStrategy(FSDPStrategy):
    """Shard within a node, replicate across nodes: all-gathers stay on the fast intra-node links."""

    name = "hsdp"
    comm_volume = None  # shard-group and replica-group collectives of different sizes

    def shard_ranks(self) -> int:
        return self.env.local_world_size

    def _mesh(self):
        per_node = self.env.local_world_size
        if self.world_size % per_node:
            raise RuntimeError(f"hsdp needs the same number of processes on every node ({self.world_size} "
                               f"processes, {per_node} on this node)")
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world_size // per_node, per_node),
                                mesh_dim_names=("replicate", "shard"))
