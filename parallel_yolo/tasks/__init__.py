"""Ultralytics' tasks (task.py: each task's model class, validator, trainer, heads and batch keys) and the Ultralytics
adapter (yolo.py: model, loss, hyper-parameters, optimizer parameter groups, for every task).

Layer 4: imports config/, optim/ and the leaves.
"""
