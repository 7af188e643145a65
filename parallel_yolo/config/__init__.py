"""Typed run configuration: a recipe yaml (`cfg=FILE`) plus `key=value` overrides, validated up front.

Key names follow Ultralytics where one exists. Every mistake raises `ConfigError` with one line that names the
problem and the fix; the CLI turns it into exit code 2.

Layer 2: imports only the leaves (errors.py, urls.py). One module per schema (train, val, consolidate, compare), the
parser apart (parse.py), the names and the shared checks as leaves of the package; this module says what the rest of
parallel_yolo imports.
"""

from __future__ import annotations

from ..errors import ConfigError, Unanimous
from .checks import size_bytes, suggest
from .compare import CompareConfig
from .consolidate import ConsolidateConfig
from .names import CHECKPOINTING, OPTIMIZERS, PRECISIONS, STRATEGY_NAMES, ULTRALYTICS_KEYS
from .parse import build, parse_overrides, read_overrides
from .train import TrainConfig
from .val import ValConfig

__all__ = ["ConfigError", "Unanimous", "TrainConfig", "ValConfig", "ConsolidateConfig", "CompareConfig",
           "parse_overrides", "read_overrides", "build", "size_bytes", "suggest", "STRATEGY_NAMES", "PRECISIONS",
           "CHECKPOINTING", "OPTIMIZERS", "ULTRALYTICS_KEYS"]
