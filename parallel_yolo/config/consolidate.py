"""`parallel-yolo consolidate`'s schema."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..urls import is_url
from .checks import exists


@dataclass(kw_only=True, slots=True)
class ConsolidateConfig:
    """What `parallel-yolo consolidate` accepts."""

    checkpoint: str
    """A checkpoint folder (weights/last, weights/best, checkpoints/step_N)."""
    out: str
    """X.pt (an Ultralytics checkpoint for YOLO(X).val/predict/export) or X.safetensors."""
    weights: str = "ema"
    """ema (what Ultralytics evaluates and exports) or model (the raw trained weights)."""

    def __post_init__(self) -> None:
        if not (exists("checkpoint", self.checkpoint) if is_url(self.checkpoint) else Path(self.checkpoint).is_dir()):
            raise ConfigError(f"checkpoint={self.checkpoint}: not a checkpoint folder; pass a run's weights/last, "
                              "weights/best or checkpoints/step_N")
