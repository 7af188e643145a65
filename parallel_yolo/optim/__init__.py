"""Optimizers whose update needs more than the elements a rank holds (Ultralytics' MuSGD: whole matrices)."""

from .musgd import DistributedMuSGD, distributed

__all__ = ["DistributedMuSGD", "distributed"]
