"""Precision policies: plain data that each strategy translates into its backend's knobs.

Under every policy the master weights, the optimizer state, BatchNorm and the loss stay fp32; only the
convolutions' compute runs in the low-precision dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PRECISIONS, ConfigError

__all__ = ["PrecisionPolicy", "policy"]


@dataclass(frozen=True, kw_only=True, slots=True)
class PrecisionPolicy:
    name: str
    compute_dtype: torch.dtype
    """dtype of the convolutions' activations (autocast)."""
    param_dtype: torch.dtype = torch.float32
    """Master weights and optimizer state."""
    reduce_dtype: torch.dtype = torch.float32
    """Gradient communication."""
    loss_scaling: bool = False
    """Dynamic loss scaling (fp16 only: bf16 has fp32's exponent range)."""

    @property
    def mixed(self) -> bool:
        return self.compute_dtype != torch.float32


def policy(name: str) -> PrecisionPolicy:
    if name == "fp32":
        return PrecisionPolicy(name=name, compute_dtype=torch.float32)
    if name == "bf16-mixed":
        return PrecisionPolicy(name=name, compute_dtype=torch.bfloat16)
    if name == "fp16-mixed":
        return PrecisionPolicy(name=name, compute_dtype=torch.float16, loss_scaling=True)
    raise ConfigError(f"precision={name}: unknown; choose one of {', '.join(PRECISIONS)}")
