"""One process, no communication: the reference every other strategy is tested against."""

from __future__ import annotations

from .base import Strategy
from .registry import register


@register
class SingleStrategy(Strategy):
    name = "single"

    def wrap(self, model, *, make_optimizer):
        self._raw = self.model = model.to(self.device)
        self.optimizer = make_optimizer(model)
        return self.model, self.optimizer
