"""The command line's `key=value` tokens and `cfg=FILE` recipes, typed against a schema's annotations."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .checks import suggest
from .names import ULTRALYTICS_KEYS


def parse_overrides(tokens: list[str], schema: type) -> Any:
    """Build `schema` from `key=value` tokens; `cfg=FILE` first loads a recipe yaml that the other tokens override."""
    return build(schema, read_overrides(tokens))


def read_overrides(tokens: list[str]) -> dict[str, Any]:
    """The keys set by `key=value` tokens and the `cfg=FILE` recipe they override, unvalidated."""
    pairs: dict[str, Any] = {}
    for token in tokens:
        if token.startswith("--local_rank") or token.startswith("--local-rank"):
            continue  # the deepspeed launcher appends this; LOCAL_RANK in the environment says the same
        key, sep, raw = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"'{token}': arguments are key=value pairs, e.g. epochs=10")
        pairs[key.strip()] = _parse_value(raw)
    recipe = pairs.pop("cfg", None)
    return {**(_load_recipe(recipe) if recipe else {}), **pairs}


def build(schema: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)} - {"hyp"}
    kwargs: dict[str, Any] = {}
    hyp: dict[str, Any] = {}
    for key, value in values.items():
        if key in names:
            kwargs[key] = _check_type(key, value, hints[key])
        elif "hyp" in hints and key in ULTRALYTICS_KEYS:
            default = ULTRALYTICS_KEYS[key]
            hyp[key] = value if default is None else _check_type(key, value, type(default))
        else:
            raise ConfigError(_unknown_key(key, names | (set(ULTRALYTICS_KEYS) if "hyp" in hints else set())))
    if "hyp" in hints:
        kwargs["hyp"] = hyp
    missing = [f.name for f in dataclasses.fields(schema)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise ConfigError(f"missing {missing[0]}=...; e.g. {missing[0]}=runs/detect/train/weights/best")
    return schema(**kwargs)


def _parse_value(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, (dict, list)) else value


def _load_recipe(path: Any) -> dict[str, Any]:
    file = Path(str(path))
    if not file.is_file():
        raise ConfigError(f"cfg={path}: recipe file not found; pass a yaml such as configs/train/demo.yaml")
    try:
        content = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cfg={path}: not valid yaml ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(content, dict):
        raise ConfigError(f"cfg={path}: must be a mapping of key: value lines")
    return {str(k): v for k, v in content.items()}


def _check_type(key: str, value: Any, hint: Any) -> Any:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    wanted = " or ".join(_type_word(o) for o in options if o is not type(None))
    raise ConfigError(f"{key}={value!r}: expected {wanted}, e.g. {key}={_example(options)}")


_UnionType = type(int | None)


def _type_word(option: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(option, str(option))


def _example(options: tuple) -> str:
    for option, example in ((bool, "true"), (int, "10"), (float, "0.01"), (str, "value")):
        if option in options:
            return example
    return "value"


def _unknown_key(key: str, known: set[str]) -> str:
    from ultralytics.cfg import DEFAULT_CFG_DICT

    if key in DEFAULT_CFG_DICT:
        return (f"{key}: an Ultralytics key that parallel-yolo does not use (it would be silently ignored); "
                f"remove it")
    return f"{key}: unknown key{suggest(key, known)}; see `parallel-yolo help` for the keys"
