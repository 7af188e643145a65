"""parallel_yolo: train Ultralytics YOLO detectors under DDP, DeepSpeed ZeRO and FSDP2 behind one strategy layer.

The package in layers, lowest first; a module imports only from its own subpackage or from a lower layer
(tests/test_layers.py checks every import, function-level ones too):

0. errors.py, _internals.py (the error the library adapters raise); then urls.py, _torch_internals.py,
   _ultralytics_internals.py: the leaves
2. config (the schemas and the key=value parser), monitor (memory, collectives counted, the run log)
3. launch (launchers, process groups, restarts, exit), optim (MuSGD, EMA)
4. data (loaders, every task's demo data), tasks (Ultralytics' tasks and the adapter)
5. checkpoint (sharded folders, resharding, S3 mirror)
6. strategies (ddp, zero1/2/3, fsdp, precision)
7. engine (the train state, loop, step, validation, resume, consolidate)
8. tools (compare)
9. cli.py; then __main__.py
"""

import os

# Nothing may be downloaded at run time: Ultralytics checks for updates, fonts and assets unless told it is offline.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", os.environ.get("YOLO_VERBOSE", "True"))

__version__ = "0.1.0"
__all__ = ["__version__", "add_callback", "clear_callbacks"]


def __getattr__(name: str):
    """`parallel_yolo.add_callback` without importing torch and Ultralytics when the package is imported."""
    if name in ("add_callback", "clear_callbacks"):
        from .engine import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'parallel_yolo' has no attribute '{name}'")
