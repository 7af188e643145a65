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
import weakref

import torch
import torch.distributed as dist

from .. import memory
from .base import MAX_GRAD_NORM, OptimizerSpan, ParamShard, Strategy, host_values
from .gloo import all_gather_by_broadcasts, reduce_scatter_by_sends
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
        self._sends: _ReduceBySends | None = None

    def wrap(self, model, *, make_optimizer):
        deepspeed = import_deepspeed()
        model = model.to(self.device)
        self._raw = model
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model),
                                                       config=self.ds_config(), dist_init_required=False)
        self._sends = _gloo_collectives(deepspeed, optimizer)
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
                master.data = low.data  # the same tensor object: param_groups and optimizer state keep their keys

    def _master_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(fp32 master partition, the weights' partition it mirrors) per param group."""
        masters = self.optimizer.single_partition_of_fp32_groups
        return [(master, self._partition(i)) for i, master in enumerate(masters)]

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
        if self._sends is not None:
            self._sends.finish()  # the next backward refills the bucket buffers
        if not self._boundary:
            self.model.step()  # a micro-step: DeepSpeed accumulates and takes no optimizer step

    def inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # the torch optimizer inside ZeRO's wrapper

    def _wrapper_tensors(self, *attrs: str) -> list[torch.Tensor]:
        found = []
        for attr in attrs:
            value = getattr(self.optimizer, attr, None)
            values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
            for v in values:
                found.extend(v if isinstance(v, list) else [v])
        return [t for t in found if isinstance(t, torch.Tensor)]

    def _master_params(self) -> list[torch.Tensor]:
        return self._wrapper_tensors("single_partition_of_fp32_groups")

    def optimizer_units(self) -> list[list[torch.Tensor]]:
        """Stages 1 and 2 step each param group's flat partition in a call of its own (`_optimizer_step`)."""
        return [[t] for t in self.optimizer.single_partition_of_fp32_groups]

    def _extra_grad_tensors(self) -> list[torch.Tensor]:
        return self._wrapper_tensors("averaged_gradients", "ipg_buffer", "grads_in_partition")

    def param_shards(self) -> list[ParamShard]:
        """Stages 1 and 2: every rank holds the whole model, but the optimizer state of only its partition of
        each param group's flat buffer, which may start or end inside a parameter."""
        opt = self.optimizer
        spans = {}
        for i, params in enumerate(opt.bit16_groups):
            flat, part = opt.bit16_groups_flat[i], self._partition(i)
            start = _offset(part, flat)
            end = start + part.numel()
            for p in params:
                off = _offset(p.data, flat)
                a, b = max(off, start), min(off + p.numel(), end)
                if a < b:
                    spans[id(p)] = OptimizerSpan(a - off, b - off, opt.single_partition_of_fp32_groups[i], a - start)
        share = (self.rank, self.world_size)
        return [ParamShard(name, tuple(p.shape), 0, p.numel(), p.data.view(-1), share, spans.get(id(p)))
                for name, p in self._raw.named_parameters()]

    def after_load(self) -> None:
        for master, low in self._master_pairs():
            if master.data_ptr() != low.data_ptr():
                master.data.copy_(low)

    def _partition(self, group: int) -> torch.Tensor:
        """This rank's partition of param group `group`'s flat weights (a view)."""
        opt = self.optimizer
        return opt.parallel_partitioned_bit16_groups[group][dist.get_rank(group=opt.real_dp_process_group[group])]

    def step(self, report: torch.Tensor | None = None) -> tuple[float, bool, list[float]]:
        self.model.set_gradient_accumulation_boundary(True)
        self.model.step()  # clips to the global norm over all partitions, steps, zeroes gradients
        norm, values = host_values(self.model.get_global_grad_norm(), report)
        finite = math.isfinite(norm)
        self.skipped_steps += not finite
        return norm, finite, values


def _gloo_collectives(deepspeed, optimizer) -> _ReduceBySends | None:
    """On gloo, point DeepSpeed's all-gather at broadcasts, its reduce-scatter and its reduce at sends, which move
    the same bytes per rank (strategies/gloo.py for the first two).

    ZeRO-1/2 gather the updated weights after every step (yolov8x: zero2 optimizer step 0.46 -> 0.24 s), ZeRO-3
    every layer's parameters (forward 1.83 -> 1.69 s). ZeRO-3 reduce-scatters its gradient buckets: four
    alternating `parallel-yolo compare strategies=zero3` runs each way (yolov8x, 320 px, batch 4, 2 processes), step
    5.67 / 6.01 / 5.60 / 5.64 s through gloo's, 5.71 / 5.53 / 5.43 / 5.51 s through sends. ZeRO-1/2 reduce each
    gradient bucket to its owners from the backward hooks, synchronously: see `_ReduceBySends` for what sends
    change there."""
    backend = deepspeed.comm.comm.cdb
    if dist.get_backend() != "gloo" or backend is None:
        return None
    backend.all_gather_function = all_gather_by_broadcasts
    backend.reduce_scatter_function = reduce_scatter_by_sends
    original = getattr(backend.reduce, "original", backend.reduce)  # the backend outlives each engine
    backend.reduce = _ReduceBySends(original, backend._reduce_op, optimizer)
    return backend.reduce


class _ReduceBySends:
    """DeepSpeed's reduce as point-to-point transfers: each rank but the destination sends its tensor, the
    destination receives them and adds.

    ZeRO-1/2 call reduce from the backward hooks, once per owner of a slice of each full gradient bucket, and wait
    for it before the backward goes on; DDP's all-reduce runs beside the backward in gloo's threads. With sends only
    the owner waits, and only for the transfer: a sender goes on at once, and its send has to be finished only
    before the bucket's buffer is refilled. With `overlap_comm` DeepSpeed alternates two bucket buffers, so that is
    when the next bucket is reduced: a send from one of the buffers is waited for then (or at the end of backward,
    `finish`), any other send before returning. Measured (yolov8x, 320 px, batch 4, 2 processes, this 2-core
    machine): backward 3.35 -> 3.26 s, DDP's 3.27 s; three alternating `parallel-yolo compare` runs each way, median
    step zero1 5.00 -> 4.94 s, zero2 5.14 -> 4.98 s. A single 8 MB transfer takes 5 ms as a send and 9 ms as gloo's
    reduce."""

    def __init__(self, original, torch_op, optimizer):
        self.original, self.torch_op = original, torch_op
        self.optimizer = weakref.ref(optimizer)  # the backend outlives the engine; this must not keep it alive
        self.pending: list[tuple[dist.Work, int, torch.Tensor]] = []  # (send, buffer storage, tensor kept alive)

    def __call__(self, tensor, dst, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if async_op or self.torch_op(op) != dist.ReduceOp.SUM or not tensor.is_contiguous():
            self.finish()
            return self.original(tensor=tensor, dst=dst, op=op, group=group, async_op=async_op)
        storage = tensor.untyped_storage().data_ptr()
        self.finish(keep=storage)  # the other bucket buffer is refilled once this reduce returns
        if dist.get_rank() == dst:
            peers = [r for r in dist.get_process_group_ranks(group or dist.group.WORLD) if r != dst]
            received = [torch.empty_like(tensor) for _ in peers]
            works = [dist.irecv(buf, src=peer, group=group) for buf, peer in zip(received, peers)]
            for work, buf in zip(works, received):
                work.wait()
                tensor.add_(buf)
        else:
            self.pending.append((dist.isend(tensor, dst, group=group), storage, tensor))
            if storage not in self._double_buffers():
                self.finish()
        return None  # as torch's synchronous collectives

    def _double_buffers(self) -> set[int]:
        """Storages of DeepSpeed's alternating gradient bucket buffers, whose sends may stay in flight."""
        optimizer = self.optimizer()
        buckets = getattr(optimizer, "ipg_buckets", {}) if getattr(optimizer, "overlap_comm", False) else {}
        return {b.untyped_storage().data_ptr() for bucket in buckets.values() if len(bucket.buffer) == 2
                for b in bucket.buffer}

    def finish(self, keep: int | None = None) -> None:
        """Wait for the sends in flight, except those from the buffer whose storage is `keep`."""
        for work, storage, _ in self.pending:
            if storage != keep:
                work.wait()
        self.pending = [item for item in self.pending if item[1] == keep]


def _offset(tensor: torch.Tensor, flat: torch.Tensor) -> int:
    """Element offset of a view inside the flat buffer it was cut from."""
    return (tensor.data_ptr() - flat.data_ptr()) // tensor.element_size()


def _inside(tensor: torch.Tensor, flat: torch.Tensor) -> bool:
    return 0 <= _offset(tensor, flat) and _offset(tensor, flat) + tensor.numel() <= flat.numel() \
        and tensor.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


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
        memory.release_pages(self.optimizer.grad_partitions_flat_buffer)
        return result

    def local_state(self) -> dict[str, torch.Tensor]:
        params = {name: p.ds_tensor for name, p in self._raw.named_parameters()}
        return {**params, **{name: b for name, b in self._raw.named_buffers()}}

    def assemble(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors from every rank's equal, padded slice (collective)."""
        out = {}
        for name, p in self._raw.named_parameters():
            pieces = [torch.empty_like(local[name]) for _ in range(self.world_size)]
            dist.all_gather(pieces, local[name].contiguous())
            out[name] = torch.cat(pieces)[:p.ds_numel].view(p.ds_shape).detach().cpu().clone()
        for name, b in self._raw.named_buffers():
            out[name] = local[name].detach().cpu().clone()
        state_keys = self._raw.state_dict().keys()
        return {k: out[k] for k in state_keys if k in out}

    def param_shards(self) -> list[ParamShard]:
        """Each parameter is cut into equal flat slices (the last padded); rank r holds slice r in `ds_tensor`,
        a view into one of ZeRO's flat sub-group partitions, whose fp32 master copy the optimizer steps."""
        opt, rank = self.optimizer, dist.get_rank(group=self.optimizer.dp_process_group)
        shards = []
        for name, p in self._raw.named_parameters():
            part = p.ds_tensor
            lo = min(rank * part.numel(), p.ds_numel)
            hi = min(lo + part.numel(), p.ds_numel)
            # a parameter the optimizer does not train (DFL's fixed conv) sits in no flat partition
            span = next((OptimizerSpan(lo, hi, opt.fp32_partitioned_groups_flat[j], _offset(part, flat))
                         for j, flat in enumerate(opt.fp16_partitioned_groups_flat) if _inside(part, flat)), None)
            shards.append(ParamShard(name, tuple(p.ds_shape), lo, hi, part.data.view(-1)[:hi - lo], (0, 1), span,
                                     full=p.data.view(-1) if getattr(p, "ds_persist", False) else None))
        return shards

    def _master_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        opt = self.optimizer
        return list(zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat))

    def _local_params(self) -> list[torch.Tensor]:
        return [p.ds_tensor for p in self._raw.parameters()]

    def _master_params(self) -> list[torch.Tensor]:
        return self._wrapper_tensors("fp32_partitioned_groups_flat")

    def optimizer_units(self) -> list[list[torch.Tensor]]:
        """Stage 3 steps each sub-group's flat partition in a call of its own (`_optimizer_step`)."""
        return [[t] for t in self.optimizer.fp32_partitioned_groups_flat]


def _unshare_stateless_children(model: torch.nn.Module) -> None:
    """Give every parent its own copy of a child module it shares with other parents, when the child holds no
    tensors (a copy changes nothing then).

    DeepSpeed registers ZeRO-3's fetch/release hooks on a child once per parent that lists it, and Ultralytics' Conv
    layers all share one SiLU (`Conv.default_act`): in yolov8x each activation call ran ~100 hook pairs, 9762 per
    forward, and a step took 9.2 s instead of 5.9 s (2 CPU processes, 320 px, batch 4)."""
    import copy

    seen: set[int] = set()
    for parent in list(model.modules()):  # listed first: the loop replaces children
        for name, child in list(parent.named_children()):
            if id(child) in seen and next(child.parameters(), None) is None and next(child.buffers(), None) is None:
                setattr(parent, name, copy.deepcopy(child))
            seen.add(id(child))


@register
class Zero3OffloadStrategy(Zero3Strategy):
    name = "zero3_offload"
    master_copy = True  # DeepSpeed steps an fp32 copy in CPU memory, the parameters' partitions stay on the device

    def ds_config(self) -> dict:
        config = super().ds_config()
        config["zero_optimization"].setdefault("offload_optimizer", {"device": "cpu"})
        config["zero_optimization"].setdefault("offload_param", {"device": "cpu"})
        return config
