"""`parallel-yolo val`'s schema."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .checks import exists, positive


@dataclass(kw_only=True, slots=True)
class ValConfig:
    """What `parallel-yolo val` accepts."""

    checkpoint: str
    """A checkpoint folder written by training, or a consolidated .pt."""
    data: str | None = None
    """Data yaml; default: the one the checkpoint was trained on."""
    imgsz: int | None = None
    batch: int = 16
    workers: int = 2
    device: str | None = None
    split: str = "val"
    conf: float | None = None
    iou: float = 0.7
    plots: bool = True
    """The validator's curves, confusion matrix and sample batches in the run folder."""
    nproc: int | None = None
    project: str = "runs/detect"
    name: str = "val"
    exist_ok: bool = False

    def __post_init__(self) -> None:
        positive(self, "batch")
        if self.imgsz is not None:
            positive(self, "imgsz")
        if not exists("checkpoint", self.checkpoint):
            raise ConfigError(f"checkpoint={self.checkpoint}: not found; pass a run's weights/last or weights/best "
                              "folder (or its s3:// copy), or a consolidated .pt")
