"""The Ultralytics adapter per task: model, loss, hyper-parameters, optimizer parameter groups (yolo.py: detection).

Layer 4: imports config/, optim/ and the leaves.
"""
