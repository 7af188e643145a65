"""parallel_yolo/config/: the schemas' defaults are Ultralytics' own where they share its names, the optimizer
names are those Ultralytics builds, and the key=value parser types and refuses as documented. (The CLI's whole
bad-input catalogue is tests/test_cli.py.)"""

from __future__ import annotations

import dataclasses

import pytest
from ultralytics.cfg import DEFAULT_CFG_DICT

from parallel_yolo.config import ULTRALYTICS_KEYS, ConfigError, TrainConfig, ValConfig, parse_overrides

# Where a schema's default differs from Ultralytics' on purpose, and why. Any other difference fails below.
OWN_DEFAULTS = {
    ("TrainConfig", "model"): "Ultralytics has none; a small model trains on the demo out of the box",
    ("TrainConfig", "data"): "Ultralytics has none; demo is the embedded synthetic dataset",
    ("TrainConfig", "project"): "Ultralytics derives it from the task; one folder for every task, so that resume=true "
                                "finds the newest run before the task is known",
    ("TrainConfig", "imgsz"): "None: the task's own default as Ultralytics' (640, classification 224)",
    ("TrainConfig", "name"): "the same",
    ("ValConfig", "project"): "the same",
    ("ValConfig", "name"): "the same",
    ("ValConfig", "imgsz"): "None: the checkpoint's own training size",
    ("ValConfig", "workers"): "a validation-only run on a small machine",
}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


@pytest.mark.parametrize("key", sorted(ULTRALYTICS_KEYS))
def test_each_passed_through_ultralytics_key_has_ultralytics_default(key):
    assert key in DEFAULT_CFG_DICT, f"{key}: no longer an Ultralytics key"
    assert ULTRALYTICS_KEYS[key] == DEFAULT_CFG_DICT[key], (key, ULTRALYTICS_KEYS[key], DEFAULT_CFG_DICT[key])


# compare measures a setup it names itself (yolov8x, 320 px, SGD ...): its defaults are its own by design
@pytest.mark.parametrize("schema", [TrainConfig, ValConfig], ids=lambda s: s.__name__)
def test_schema_keys_named_as_ultralytics_default_as_ultralytics(schema):
    shared = [f for f in dataclasses.fields(schema) if f.name in DEFAULT_CFG_DICT]
    assert shared, "no key shared with Ultralytics: the test would check nothing"
    differ = {f.name: (_default(f), DEFAULT_CFG_DICT[f.name]) for f in shared
              if _default(f) != DEFAULT_CFG_DICT[f.name] and (schema.__name__, f.name) not in OWN_DEFAULTS}
    assert not differ, differ


def test_own_defaults_are_still_own():
    """An entry of OWN_DEFAULTS that now equals Ultralytics' default (or names a gone key) is stale."""
    schemas = {s.__name__: {f.name: f for f in dataclasses.fields(s)} for s in (TrainConfig, ValConfig)}
    for (schema, key) in OWN_DEFAULTS:
        assert key in schemas[schema], (schema, key)
        assert _default(schemas[schema][key]) != DEFAULT_CFG_DICT[key], (schema, key)


def test_overrides_are_typed_and_hyper_parameters_kept_apart():
    cfg = parse_overrides(["epochs=3", "lr0=0.02", "cos_lr=true", "mosaic=0.5", "strategy=zero2", "budget=24GiB",
                           "activation_checkpointing=auto"], TrainConfig)
    assert (cfg.epochs, cfg.lr0, cfg.cos_lr, cfg.strategy) == (3, 0.02, True, "zero2")
    assert cfg.budget_bytes == 24 * 2**30
    assert cfg.hyp == {"mosaic": 0.5}  # an Ultralytics key set explicitly, and only that one
    with pytest.raises(ConfigError, match="did you mean epochs"):
        parse_overrides(["epoch=3"], TrainConfig)
    with pytest.raises(ConfigError, match="expected an integer"):
        parse_overrides(["epochs=three"], TrainConfig)


def test_optimizer_names_are_ultralytics_own_in_any_case():
    """The names train= accepts are those Ultralytics' build_optimizer accepts (its error lists them), normalised as
    Ultralytics normalises them."""
    import re

    import torch

    from parallel_yolo._ultralytics_internals import build_optimizer
    from parallel_yolo.config import OPTIMIZERS, TrainConfig

    with pytest.raises(NotImplementedError) as refused:
        build_optimizer(torch.nn.Linear(2, 2), hyp=None, nc=0, name="Adagrad", lr=0.01, momentum=0.9, decay=0.0,
                        iterations=1)
    listed = set(re.findall(r"'(\w+)'", re.search(r"\{.*\}", str(refused.value)).group(0)))
    assert listed == set(OPTIMIZERS)
    assert TrainConfig(optimizer="musgd").optimizer == "MuSGD" and TrainConfig(optimizer="ADAMW").optimizer == "AdamW"
