"""Ultralytics' learning-rate recipe: per-epoch linear or cosine decay, and the warm-up that ramps lr, momentum,
the bias lr and the nominal-batch accumulation over the first iterations.

Ultralytics writes this inline in its training loop (BaseTrainer._do_train), so it cannot be called; it is
restated here line for line and tests/engine/test_recipe.py checks it against a real Ultralytics trainer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Schedule"]


class Schedule:
    def __init__(self, *, epochs: int, lrf: float, cos_lr: bool, warmup_epochs: float, warmup_bias_lr: float,
                 warmup_momentum: float, momentum: float, batches_per_epoch: int, accumulate: int):
        from ultralytics.utils.torch_utils import one_cycle

        self.epochs = epochs
        self.lf = one_cycle(1, lrf, epochs) if cos_lr else (lambda x: max(1 - x / epochs, 0) * (1.0 - lrf) + lrf)
        # warm-up leaves at least the final epoch for regular training (BaseTrainer._get_warmup_iterations)
        warm = min(warmup_epochs, max(epochs - 1, 0))
        self.warmup_iters = round(warm * batches_per_epoch) if warm > 0 else 0
        self.accumulate0 = accumulate
        self.warmup_bias_lr, self.warmup_momentum, self.momentum = warmup_bias_lr, warmup_momentum, momentum

    @staticmethod
    def remember_initial(groups: list[dict[str, Any]]) -> None:
        for group in groups:
            group.setdefault("initial_lr", group["lr"])

    def start_epoch(self, groups: list[dict[str, Any]], epoch: int) -> None:
        """The LambdaLR step Ultralytics takes at the start of every epoch."""
        for group in groups:
            group["lr"] = group["initial_lr"] * self.lf(epoch)

    def warmup(self, groups: list[dict[str, Any]], ni: int, epoch: int) -> int:
        """Apply warm-up for global iteration `ni`; returns how many iterations to accumulate per optimizer step."""
        if not (self.warmup_iters and ni <= self.warmup_iters):
            return self.accumulate0
        xi = [0, self.warmup_iters]
        for group in groups:
            start = self.warmup_bias_lr if group.get("param_group") == "bias" else 0.0
            group["lr"] = float(np.interp(ni, xi, [start, group["initial_lr"] * self.lf(epoch)]))
            if "momentum" in group:  # SGD-family only: Adam's beta1 is not ramped (as in Ultralytics)
                group["momentum"] = float(np.interp(ni, xi, [self.warmup_momentum, self.momentum]))
        return max(1, int(np.interp(ni, xi, [1, self.accumulate0]).round()))
