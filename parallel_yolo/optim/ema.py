"""EMA of a sharded model without gathering it: every rank averages only the tensors it holds.

Ultralytics' ModelEMA deep-copies the whole model and reads the full state dict at every update; under ZeRO-3 or
FSDP that would gather every parameter every step. Here each rank keeps the EMA of its own shards (plus the
small, replicated BatchNorm buffers) and the update is Ultralytics' own arithmetic (`_foreach_lerp_` with its
decay ramp); the full EMA model is assembled only when validation or a checkpoint asks for it.
"""

from __future__ import annotations

import torch
from torch import nn

from .._torch_internals import foreach
from .._ultralytics_internals import ema_decay

__all__ = ["ShardedEMA"]


class ShardedEMA:
    def __init__(self, strategy, *, decay: float = 0.9999, tau: float = 2000):
        self.strategy = strategy
        self.decay = ema_decay(decay=decay, tau=tau)  # Ultralytics' ramp, not a copy of it
        self.updates = 0
        local = strategy.local_state()
        self.shadow = {k: v.detach().clone() for k, v in local.items()}
        self._float = [k for k, v in self.shadow.items() if v.dtype.is_floating_point]

    def update(self) -> None:
        self.updates += 1
        local = self.strategy.local_state()
        foreach.lerp_([self.shadow[k] for k in self._float], [local[k].detach() for k in self._float],
                      1 - self.decay(self.updates))

    def tensors(self) -> list[torch.Tensor]:
        return list(self.shadow.values())

    def param_view(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of a parameter's EMA: the shadow of this rank's shard, which starts at `lo`."""
        return self.shadow[name].view(-1)[:hi - lo]

    def buffers(self) -> dict[str, torch.Tensor]:
        names = {name for name, _ in self.strategy.raw_model.named_buffers()}
        return {k: v for k, v in self.shadow.items() if k in names}

    def update_attr(self) -> None:
        """Nothing to copy: full_model() rebuilds the module from the live model's attributes."""

    def full_model(self) -> nn.Module:
        """A full, unsharded copy of the EMA model, buffers averaged over ranks (collective: every rank calls it)."""
        state = self.strategy.assemble({**self.shadow, **self.strategy.averaged_copies(self.buffers())})
        raw = self.strategy.raw_model
        # the task's model class (FSDP puts a class of its own in front of it)
        cls = next(c for c in type(raw).__mro__ if c.__module__.startswith("ultralytics."))
        model = cls(raw.yaml, nc=raw.nc, verbose=False).to(self.strategy.device)
        model.load_state_dict(state)
        for name in _TASK_ATTRIBUTES:
            if hasattr(raw, name):
                setattr(model, name, getattr(raw, name))
        return model.eval()


_TASK_ATTRIBUTES = ("nc", "names", "args", "kpt_shape", "kpt_oks_sigmas", "kpt_names")
"""What the task trainers set on their model besides its weights (tasks/yolo.py set_task_attributes)."""
