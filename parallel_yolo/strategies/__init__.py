"""Parallelism strategies behind one contract (base.py), one per file, and the precision policies they combine with;
importing this package registers every strategy. The top-level strategies/ folder holds their presets (one YAML per
named strategy: the knobs a user edits), shipped as the package data `parallel_yolo.presets`; registry.py reads them.

Layer 6: imports checkpoint/ and everything below it, never engine/ or above.
"""

from . import ddp, deepspeed, fsdp, single  # noqa: F401  (registration side effect)
from .base import Strategy
from .registry import REGISTRY, preset, select

__all__ = ["Strategy", "REGISTRY", "preset", "select", "create"]


def create(name: str, **kwargs) -> Strategy:
    return REGISTRY[name](**kwargs)
