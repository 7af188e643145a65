"""Checks the schemas share: numbers in range, sizes, names with a suggestion for a typo. Each raises ConfigError
with one line naming the key and the fix."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..urls import is_url, split_url
from .names import CHECKPOINTING


def size_bytes(key: str, value: Any) -> int:
    """A memory size written as 80GiB, 24GB, 512MiB or a number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    try:
        return int(float(match[1]) * units[match[2].upper()])
    except (TypeError, KeyError, ValueError):
        raise ConfigError(f"{key}={value}: expected a size such as 80GiB, 24GB or 512MiB") from None


def exists(key: str, path: str) -> bool:
    """A local path that exists, or a well-formed s3:// URL (read when it is used; checkpoint/remote.py)."""
    if is_url(path):
        split_url(key, path)
        return True
    return Path(path).exists()


def check_checkpointing(mode: str, *, compile: bool) -> None:
    if mode not in CHECKPOINTING:
        raise ConfigError(f"activation_checkpointing={mode}: unknown{suggest(mode, CHECKPOINTING)}; choose one of "
                          f"{', '.join(CHECKPOINTING)}")
    if compile and mode != "none":
        # measured: the compiled model's recompute in backward yields tensors whose metadata differ from the forward's,
        # and torch's checkpoint stops the run at the first backward
        raise ConfigError(f"activation_checkpointing={mode} cannot be combined with compile=true (torch's checkpoint "
                          "refuses the compiled recompute); drop one of them")


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def positive(cfg: Any, *keys: str) -> None:
    at_least(cfg, 1, *keys)


def at_least(cfg: Any, low: float, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if value < low:
            raise ConfigError(f"{key}={value}: must be >= {low}")


def is_cuda_spec(device: str) -> bool:
    return device.startswith("cuda") or all(part.strip().isdigit() for part in device.split(","))


def optimizer_name(name: str, choices: tuple[str, ...]) -> str:
    """`name` spelled as Ultralytics spells it (it accepts any case), or a one-line refusal naming the choices."""
    found = {choice.lower(): choice for choice in choices}.get(str(name).lower())
    if found is None:
        raise ConfigError(f"optimizer={name}: unknown{suggest(str(name), choices)}; choose one of {', '.join(choices)}")
    return found
