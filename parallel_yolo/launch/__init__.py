"""Processes and process groups: reading whichever launcher started us (torchrun, accelerate, deepspeed), the
group's initialisation (nccl on CUDA, gloo on CPU), `nproc=N`'s local launcher with its restarts, the heartbeat
that names a lost rank, and how a process ends (shutdown.py).

Layer 3: imports config/ and monitor/ (the strict-device check of comm.py) and the leaves, nothing above.
"""
