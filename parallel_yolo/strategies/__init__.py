"""Parallelism strategies behind one contract; importing this package registers every strategy."""

from . import ddp, deepspeed, fsdp, single  # noqa: F401  (registration side effect)
from .base import Strategy
from .registry import REGISTRY, preset, select

__all__ = ["Strategy", "REGISTRY", "preset", "select", "create"]


def create(name: str, **kwargs) -> Strategy:
    return REGISTRY[name](**kwargs)
