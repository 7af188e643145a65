"""Strategy registry, presets (strategies/*.yaml, shipped as package data) and selection from key + launcher."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from ..config import STRATEGY_NAMES, ConfigError
from ..launch.dist import DistEnv

__all__ = ["REGISTRY", "register", "preset", "select", "from_launcher", "default_precision"]

REGISTRY: dict[str, type] = {}

_ACCELERATE_PRECISION = {"bf16": "bf16-mixed", "fp16": "fp16-mixed"}


def register(cls: type) -> type:
    """Add a strategy class under its name, which config.STRATEGY_NAMES (the one list, checked before any strategy
    module is imported) must hold."""
    if cls.name not in STRATEGY_NAMES:
        raise RuntimeError(f"strategy {cls.name!r} is not in config.STRATEGY_NAMES; add it there")
    REGISTRY[cls.name] = cls
    return cls


def preset(name: str, *, cuda: bool = False) -> dict[str, Any]:
    """The knobs a user edits for one strategy, from strategies/NAME.yaml; on GPUs its `cuda:` section overrides
    them (values tuned on CPU processes that differ on GPUs, where NCCL works in CUDA streams beside the compute)."""
    file = resources.files("parallel_yolo.presets") / f"{name}.yaml"
    values = (yaml.safe_load(file.read_text()) or {}) if file.is_file() else {}
    gpu = values.pop("cuda", None) or {}
    return _merge(values, gpu) if cuda else values


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def select(*, strategy: str | None, precision: str | None, sync_bn: bool, env: DistEnv, world_size: int,
           cuda: bool) -> tuple[str, str]:
    """(strategy, precision) from the keys, else from accelerate's exported config, else from the world size."""
    launched_strategy, launched_precision = _from_accelerate(env.accelerate or {})
    if strategy and launched_strategy and strategy != launched_strategy:
        raise ConfigError(f"strategy={strategy} conflicts with the accelerate config, which asks for "
                          f"{launched_strategy}; drop strategy= or launch with a {strategy} config")
    if precision and launched_precision and precision != launched_precision:
        raise ConfigError(f"precision={precision} conflicts with the accelerate config's mixed_precision "
                          f"({launched_precision}); drop precision= or change mixed_precision in the config")
    name = strategy or launched_strategy or ("ddp" if world_size > 1 else "single")
    if name not in REGISTRY:
        raise ConfigError(f"strategy={name} is not available in this version; use one of {', '.join(REGISTRY)}")
    chosen = precision or launched_precision or default_precision(REGISTRY[name], cuda=cuda)
    if chosen == "fp16-mixed" and not REGISTRY[name].supports_loss_scaling:
        raise ConfigError(f"precision=fp16-mixed is not available with strategy={name} (its fp16 mode would cast "
                          "BatchNorm to fp16); use precision=bf16-mixed, or strategy=ddp or fsdp for fp16")
    if name == "single" and world_size > 1:
        raise ConfigError(f"strategy=single cannot run on {world_size} processes; use strategy=ddp or one process")
    if sync_bn and world_size > 1 and not cuda:
        raise ConfigError("sync_bn=true needs CUDA (torch's SyncBatchNorm refuses CPU tensors); drop sync_bn "
                          "on CPU")
    return name, chosen


def default_precision(strategy: type, *, cuda: bool) -> str:
    """bf16-mixed on GPUs with bf16 (Ampere and newer); fp16-mixed on older GPUs where the strategy can scale the
    loss; fp32 on CPU, where low-precision convolutions are slower, and elsewhere."""
    import torch

    if not cuda:
        return "fp32"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16-mixed"
    return "fp16-mixed" if strategy.supports_loss_scaling else "fp32"


def from_launcher(env: DistEnv) -> tuple[str | None, str | None]:
    """(strategy, precision) that the launcher's accelerate config asks for, None where it says nothing."""
    return _from_accelerate(env.accelerate or {})


def _from_accelerate(acc: dict[str, str]) -> tuple[str | None, str | None]:
    precision = _ACCELERATE_PRECISION.get(acc.get("ACCELERATE_MIXED_PRECISION", "").lower())
    if _true(acc.get("ACCELERATE_USE_DEEPSPEED")):
        stage = acc.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        offload = any(acc.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind}_DEVICE", "none").lower() == "cpu"
                      for kind in ("OPTIMIZER", "PARAM"))
        return ("zero3_offload" if stage == "3" and offload else f"zero{stage}"), precision
    if _true(acc.get("ACCELERATE_USE_FSDP")):
        sharding = acc.get("FSDP_SHARDING_STRATEGY", "").upper()
        if "HYBRID" in sharding or sharding in {"4", "5"}:
            return "hsdp", precision
        reshard = acc.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
        grad_op = reshard in {"false", "0", "shard_grad_op"} or "SHARD_GRAD_OP" in sharding
        return ("fsdp_grad_op" if grad_op else "fsdp"), precision
    return None, precision


def _true(value: str | None) -> bool:
    return str(value).lower() in {"1", "true", "yes"}
