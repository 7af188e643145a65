"""DeepSpeed ZeRO: stage 1 shards optimizer state, stage 2 also gradients, stage 3 also parameters;
`zero3_offload` keeps parameters and optimizer state in CPU memory.

`deepspeed.initialize` receives our model and our optimizer (Ultralytics' three param groups), so the recipe
is unchanged. Precision: DeepSpeed's bf16/fp16 modes cast the whole module, BatchNorm included, so they are not
used; bf16-mixed runs under autocast with fp32 weights (BatchNorm stays fp32 on its own) and fp16-mixed is
refused up front because its loss scaling would need DeepSpeed's fp16 mode.
Gradient accumulation follows our schedule (which ramps during warm-up): every micro-step calls
backward and step with the accumulation boundary set explicitly, so DeepSpeed's own counter never decides.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.distributed as dist

from ..monitor import memory
from . import _deepspeed_internals as internals
from .base import MAX_GRAD_NORM, OptimizerSpan, ParamShard, Strategy, host_values
from .registry import register

__all__ = ["Zero1Strategy", "Zero2Strategy", "Zero3Strategy", "Zero3OffloadStrategy", "import_deepspeed"]


def import_deepspeed():
    """DeepSpeed picks its accelerator at import: on a machine without CUDA it must be told to use the CPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    return deepspeed


class ZeroStrategy(Strategy):
    stage: int
    supports_loss_scaling = False
    comm_volume = 2.0  # gradients reduce-scattered, updated parameters all-gathered

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._boundary = True

    def wrap(self, model, *, make_optimizer):
        deepspeed = import_deepspeed()
        internals.forget_stale_groups(deepspeed)  # a run that ended earlier in this process
        model = model.to(self.device)
        self._raw = model
        with internals.whole_shaped(model.parameters()):  # built sharded: the optimizer sees whole shapes
            inner = make_optimizer(model)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=inner, config=self.ds_config(),
                                                       dist_init_required=False)
        self.model, self.optimizer = engine, optimizer
        if not self.master_copy:
            self._share_master_partitions()
        return engine, optimizer

    def _share_master_partitions(self) -> None:
        """Let the optimizer step this rank's partition of the weights in place instead of a separate fp32 copy.

        Our weights are fp32 under every precision policy (autocast computes in low precision), so DeepSpeed's
        master partitions duplicate them: 1/N of the model per rank, 130 MiB for yolov8x at 2 ranks. Stage 3 means
        to skip that copy when the weights are already fp32 (stage3.py: "we don't need another copy"), but its test
        compares a torch.device with a device-name string, which torch never finds equal; stages 1 and 2 always
        clone. After the step DeepSpeed copies master into weights, which becomes a copy onto itself."""
        for master, low in self._master_pairs():
            if master.dtype == low.dtype and master.shape == low.shape and master.device == low.device:
                internals.share_storage(master, low)

    def _master_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(fp32 master partition, the weights' partition it mirrors) per param group."""
        masters = internals.fp32_partitions(self.optimizer)
        return [(master, internals.partition(self.optimizer, i)) for i, master in enumerate(masters)]

    def ds_config(self) -> dict:
        """The preset's zero_optimization knobs under the settings our loop owns (clip, accumulation)."""
        zero = {k: v for k, v in self.options.get("zero_optimization", {}).items()}
        return {
            "train_micro_batch_size_per_gpu": 1,  # unused: our loader batches; DeepSpeed only checks consistency
            "gradient_accumulation_steps": 1,
            "gradient_clipping": MAX_GRAD_NORM,
            "zero_optimization": {**zero, "stage": self.stage},
            "zero_allow_untested_optimizer": True,  # Ultralytics' SGD / AdamW / MuSGD param groups
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1,
        }

    def no_sync(self):
        strategy = self

        class _Accumulate:
            def __enter__(self):
                strategy._boundary = False

            def __exit__(self, *exc):
                strategy._boundary = True

        return _Accumulate()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.set_gradient_accumulation_boundary(self._boundary)
        self.model.backward(loss)
        if not self._boundary:
            self.model.step()  # a micro-step: DeepSpeed accumulates and takes no optimizer step

    def expose_communication(self) -> None:
        internals.look_up_collectives_at_call_time(import_deepspeed())

    def inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # the torch optimizer inside ZeRO's wrapper

    def _master_params(self) -> list[torch.Tensor]:
        return [master for master, _ in self._master_pairs()]

    def optimizer_units(self) -> list[list[torch.Tensor]]:
        """ZeRO steps each flat master partition in a step() call of its own."""
        return [[master] for master, _ in self._master_pairs()]

    def _extra_grad_tensors(self) -> list[torch.Tensor]:
        return internals.gradient_buffers(self.optimizer)

    def param_shards(self) -> list[ParamShard]:
        """Stages 1 and 2: every rank holds the whole model, but the optimizer state of only its partition of
        each param group's flat buffer, which may start or end inside a parameter."""
        spans = {}
        for (params, flat), (master, part) in zip(internals.flat_groups(self.optimizer), self._master_pairs()):
            start = internals.offset(part, flat)
            end = start + part.numel()
            for p in params:
                off = internals.offset(p.data, flat)
                a, b = max(off, start), min(off + p.numel(), end)
                if a < b:
                    spans[id(p)] = OptimizerSpan(a - off, b - off, master, a - start)
        share = (self.rank, self.world_size)
        return [ParamShard(name, tuple(p.shape), 0, p.numel(), p.data.view(-1), share, spans.get(id(p)))
                for name, p in self._raw.named_parameters()]

    def after_load(self) -> None:
        for master, low in self._master_pairs():
            if master.data_ptr() != low.data_ptr():
                master.data.copy_(low)

    def step(self, report: torch.Tensor | None = None) -> tuple[float, bool, list[float]]:
        self.model.set_gradient_accumulation_boundary(True)
        self.model.step()  # clips to the global norm over all partitions, steps, zeroes gradients
        norm, values = host_values(self.model.get_global_grad_norm(), report)
        finite = math.isfinite(norm)
        self.skipped_steps += not finite
        return norm, finite, values


@register
class Zero1Strategy(ZeroStrategy):
    name, stage = "zero1", 1
    # the paper's stage 1 keeps whole gradients; DeepSpeed's (one implementation with stage 2) keeps only its
    # partition once the step's gradients are reduced, so its accounting matches the stage-2 formula
    sharded = frozenset({"optimizer_state", "grads"})


@register
class Zero2Strategy(ZeroStrategy):
    name, stage = "zero2", 2
    sharded = frozenset({"optimizer_state", "grads"})


@register
class Zero3Strategy(ZeroStrategy):
    """Parameters are partitioned: each holds a flat slice `ds_tensor`; full tensors exist only in forward."""

    name, stage = "zero3", 3
    sharded = frozenset({"optimizer_state", "grads", "params"})
    comm_volume = 3.0

    def layer_keeper(self):
        """Sharded initialisation: each layer, as Ultralytics makes it, is partitioned at once by
        `deepspeed.zero.Init(module=layer)` (rank 0's values broadcast, then each rank keeps its slice), as a model
        built inside that context would be; the engine takes the partitioned parameters as they are."""
        if not self.options.get("sharded_init", True):
            return None
        deepspeed = import_deepspeed()
        internals.forget_stale_groups(deepspeed)
        config = self.ds_config()

        def take(layer, last: bool) -> None:
            deepspeed.zero.Init(module=layer.to(self.device), config_dict_or_path=config, dtype=torch.float32)

        return take

    def full_shape(self, tensor: torch.Tensor) -> torch.Size:
        return internals.full_shape(tensor)

    def wrap(self, model, *, make_optimizer):
        _unshare_stateless_children(model)
        return super().wrap(model, make_optimizer=make_optimizer)

    def step(self, report: torch.Tensor | None = None) -> tuple[float, bool, list[float]]:
        result = super().step(report)
        # DeepSpeed keeps all gradient partitions in one buffer for the whole run (130 MiB per rank for yolov8x at
        # 2 ranks); the step has used them and the next backward writes each before anything reads it. On CPU its
        # pages go back to the OS until then, so at the next peak (the start of backward) they are not resident,
        # like FSDP's gradients, which are allocated layer by layer as backward reaches them (peak above baseline,
        # yolov8x, 2 CPU processes: 1403 -> 1278 MiB; step time unchanged). On a GPU the buffer stays allocated.
        memory.release_pages(internals.zero3_gradient_buffer(self.optimizer))
        return result

    def local_state(self) -> dict[str, torch.Tensor]:
        params = {name: internals.zero3_param(p).local for name, p in self._raw.named_parameters()}
        return {**params, **{name: b for name, b in self._raw.named_buffers()}}

    def assemble(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors from every rank's equal, padded slice (collective)."""
        out = {}
        for name, p in self._raw.named_parameters():
            pieces = [torch.empty_like(local[name]) for _ in range(self.world_size)]
            dist.all_gather(pieces, local[name].contiguous())
            zero = internals.zero3_param(p)
            out[name] = torch.cat(pieces)[:zero.numel].view(zero.shape).detach().cpu().clone()
        for name, b in self._raw.named_buffers():
            out[name] = local[name].detach().cpu().clone()
        state_keys = self._raw.state_dict().keys()
        return {k: out[k] for k in state_keys if k in out}

    def param_shards(self) -> list[ParamShard]:
        """Each parameter is cut into equal flat slices (the last padded); rank r holds slice r in `ds_tensor`,
        a view into one of ZeRO's flat sub-group partitions, whose fp32 master copy the optimizer steps."""
        rank, groups = internals.zero3_rank(self.optimizer), self._master_pairs()
        shards = []
        for name, p in self._raw.named_parameters():
            zero = internals.zero3_param(p)
            part = zero.local
            lo = min(rank * part.numel(), zero.numel)
            hi = min(lo + part.numel(), zero.numel)
            # a parameter the optimizer does not train (DFL's fixed conv) sits in no flat partition
            span = next((OptimizerSpan(lo, hi, master, internals.offset(part, flat))
                         for master, flat in groups if internals.inside(part, flat)), None)
            shards.append(ParamShard(name, zero.shape, lo, hi, part.data.view(-1)[:hi - lo], (0, 1), span,
                                     full=p.data.view(-1) if zero.persistent else None))
        return shards

    def _master_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return internals.zero3_flat_groups(self.optimizer)

    def _local_params(self) -> list[torch.Tensor]:
        return [internals.zero3_param(p).local for p in self._raw.parameters()]

    def _extra_grad_tensors(self) -> list[torch.Tensor]:
        return internals.zero3_gradient_views(self.optimizer)


def _unshare_stateless_children(model: torch.nn.Module) -> None:
    """Give every parent its own copy of a child module it shares with other parents, when the child holds no
    tensors (a copy changes nothing then).

    DeepSpeed registers ZeRO-3's fetch/release hooks on a child once per parent that lists it, and Ultralytics' Conv
    layers all share one SiLU (`Conv.default_act`): in yolov8x each activation call ran ~100 hook pairs, 9762 per
    forward, and a step took 9.2 s instead of 5.9 s (2 CPU processes, 320 px, batch 4). Every parent gets a copy,
    the first too: the shared one is Ultralytics' class attribute, which every model built later in the process
    uses, and the engine's hooks on it would run in those models, after the run had ended ("DeepSpeed backend not
    set" in a consolidate after a zero3 run in the same process)."""
    import copy
    from collections import Counter

    children = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    uses = Counter(id(child) for _, _, child in children)
    for parent, name, child in children:
        if uses[id(child)] > 1 and next(child.parameters(), None) is None and next(child.buffers(), None) is None:
            setattr(parent, name, copy.deepcopy(child))


@register
class Zero3OffloadStrategy(Zero3Strategy):
    name = "zero3_offload"
    master_copy = True  # DeepSpeed steps an fp32 copy in CPU memory, the parameters' partitions stay on the device

    def ds_config(self) -> dict:
        config = super().ds_config()
        config["zero_optimization"].setdefault("offload_optimizer", {"device": "cpu"})
        config["zero_optimization"].setdefault("offload_param", {"device": "cpu"})
        return config
