"""Strategy selection from the key, accelerate's exported config and the world size; presets; conflicts."""

from __future__ import annotations

import pytest

from parallel_yolo.config import ConfigError, TrainConfig
from parallel_yolo.launch.dist import read_env
from parallel_yolo.strategies import REGISTRY, preset, select

LAUNCHED = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}


def _select(env: dict, **keys):
    return _choose(TrainConfig(**keys), read_env({**LAUNCHED, **env}), cuda=False)


def _choose(cfg: TrainConfig, env, *, cuda: bool):
    return select(strategy=cfg.strategy, precision=cfg.precision, sync_bn=cfg.sync_bn, env=env, world_size=2,
                  cuda=cuda)


@pytest.mark.parametrize("env,expected", [
    ({}, ("ddp", "fp32")),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, ("ddp", "bf16-mixed")),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, ("zero1", "fp32")),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
      "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}, ("zero3_offload", "fp32")),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "true"}, ("fsdp", "fp32")),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false"}, ("fsdp_grad_op", "fp32")),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, ("hsdp", "fp32")),
])
def test_accelerate_environment_picks_strategy_and_precision(env, expected):
    assert _select(env) == expected


def test_key_conflicting_with_accelerate_config_names_the_fix():
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    assert _select(env, strategy="zero2") == ("zero2", "fp32")
    with pytest.raises(ConfigError, match="strategy=fsdp conflicts .* asks for zero2"):
        _select(env, strategy="fsdp")
    with pytest.raises(ConfigError, match="mixed_precision"):
        _select({"ACCELERATE_MIXED_PRECISION": "fp16"}, precision="bf16-mixed")


def test_fp16_refused_where_loss_scaling_is_impossible():
    with pytest.raises(ConfigError, match="fp16-mixed is not available with strategy=zero3"):
        _select({}, strategy="zero3", precision="fp16-mixed")
    assert _select({}, strategy="fsdp", precision="fp16-mixed") == ("fsdp", "fp16-mixed")


def test_every_strategy_has_a_preset_file():
    from importlib import resources

    from parallel_yolo.config import STRATEGY_NAMES
    from parallel_yolo.strategies.registry import register

    assert set(REGISTRY) == set(STRATEGY_NAMES)  # the one list of names the config validates against
    assert {p.name for p in resources.files("parallel_yolo.presets").iterdir() if p.name.endswith(".yaml")} == {
        f"{name}.yaml" for name in STRATEGY_NAMES}
    with pytest.raises(RuntimeError, match="not in config.STRATEGY_NAMES"):
        register(type("Unlisted", (), {"name": "zero4"}))
    assert preset("zero3")["zero_optimization"]["stage3_param_persistence_threshold"] > 0
    assert preset("fsdp_grad_op")["reshard_after_forward"] is False


@pytest.mark.parametrize("bf16,strategy,expected", [
    (True, "ddp", "bf16-mixed"), (True, "zero3", "bf16-mixed"),
    (False, "ddp", "fp16-mixed"), (False, "fsdp", "fp16-mixed"), (False, "zero2", "fp32"),
])
def test_gpus_default_to_mixed_precision(monkeypatch, bf16, strategy, expected):
    """bf16-mixed where the GPU has bf16, else fp16-mixed where the strategy scales the loss; a key or the accelerate
    config still decides; CPU stays fp32."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    env = read_env(LAUNCHED)
    assert _choose(TrainConfig(strategy=strategy), env, cuda=True) == (strategy, expected)
    assert _choose(TrainConfig(strategy=strategy, precision="fp32"), env, cuda=True)[1] == "fp32"
    assert _choose(TrainConfig(strategy=strategy), env, cuda=False)[1] == "fp32"
    launched = read_env({**LAUNCHED, "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert _choose(TrainConfig(strategy=strategy), launched, cuda=True)[1] == "bf16-mixed"


def test_gpu_accelerate_configs_ask_for_bf16_and_cpu_ones_for_fp32():
    import yaml
    from conftest import ROOT

    for config in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        wanted = "no" if config.name.startswith("cpu_") else "bf16"
        assert yaml.safe_load(config.read_text())["mixed_precision"] == wanted, config.name


def test_gpu_sections_of_the_presets_override_only_on_cuda():
    assert preset("zero3")["zero_optimization"]["overlap_comm"] is False
    gpu = preset("zero3", cuda=True)["zero_optimization"]
    assert gpu["overlap_comm"] is True and gpu["reduce_bucket_size"] == preset("zero3")["zero_optimization"][
        "reduce_bucket_size"]
    assert "cuda" not in preset("zero3") and "cuda" not in preset("zero3", cuda=True)
    assert preset("ddp", cuda=True) == preset("ddp")
