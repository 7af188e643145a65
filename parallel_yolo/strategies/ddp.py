"""Plain data parallelism: every rank holds the whole model; gradients are all-reduced in buckets."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._torch_internals import ddp_no_forward_buffer_sync
from .base import Strategy
from .registry import register


@register
class DDPStrategy(Strategy):
    name = "ddp"
    comm_volume = 2.0

    def wrap(self, model, *, make_optimizer):
        model = model.to(self.device)
        if self.options.get("sync_bn") and self.world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self._raw = model
        # broadcast_buffers=False: rank 0's BatchNorm statistics would overwrite the others' at every forward;
        # instead each rank keeps its own and sync_buffers() averages them before validation and checkpoints.
        self.model = DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.options.get("find_unused_parameters", False),
            **ddp_no_forward_buffer_sync(),
            bucket_cap_mb=self.options.get("bucket_cap_mb", 25),
            gradient_as_bucket_view=self.options.get("gradient_as_bucket_view", True),
        )
        self.optimizer = make_optimizer(model)
        return self.model, self.optimizer

    def no_sync(self):
        return self.model.no_sync()

    def expose_communication(self) -> None:
        # the reducer all-reduces from C++; torch's own Python hook does the same all-reduce through dist.all_reduce
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.model.register_comm_hook(None, default_hooks.allreduce_hook)

