"""parallel_yolo: train Ultralytics YOLO detectors under DDP, DeepSpeed ZeRO and FSDP2 behind one strategy layer."""

import os

# Nothing may be downloaded at run time: Ultralytics checks for updates, fonts and assets unless told it is offline.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", os.environ.get("YOLO_VERBOSE", "True"))

__version__ = "0.1.0"
__all__ = ["__version__", "add_callback", "clear_callbacks"]


def __getattr__(name: str):
    """`parallel_yolo.add_callback` without importing torch and Ultralytics when the package is imported."""
    if name in ("add_callback", "clear_callbacks"):
        from . import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'parallel_yolo' has no attribute '{name}'")
