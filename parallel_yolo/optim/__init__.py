"""Optimizers whose update needs more than the elements a rank holds (Ultralytics' MuSGD: whole matrices), and the
EMA of the weights (ema.py), sharded like the model.

Layer 3: imports only the leaves (the torch and Ultralytics adapters).
"""

from .musgd import DistributedMuSGD, distributed

__all__ = ["DistributedMuSGD", "distributed"]
