"""The configuration reference, generated from the schemas: every key of every command with its type, default and
the docstring written under it in the code. docs/configuration.md holds the output between its markers
(tests/test_docs.py compares; `python -m parallel_yolo.config.reference --write` rewrites it)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from pathlib import Path

from .compare import CompareConfig
from .consolidate import ConsolidateConfig
from .names import ULTRALYTICS_KEYS
from .train import TrainConfig
from .val import ValConfig

__all__ = ["markdown", "MARKERS"]

SCHEMAS = (("train", TrainConfig), ("val", ValConfig), ("consolidate", ConsolidateConfig), ("compare", CompareConfig))
MARKERS = ("<!-- reference: parallel_yolo/config/reference.py writes this -->", "<!-- /reference -->")


def field_docs(schema: type) -> dict[str, str]:
    """The string written under each field in the class body (an attribute docstring), by field name."""
    body = ast.parse(textwrap.dedent(inspect.getsource(schema))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "" if f.default is None else f"`{f.default}`"
    return "(required)" if f.default_factory is dataclasses.MISSING else ""


def _type(hint) -> str:
    text = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
    return (text or str(hint).replace("typing.", "")).replace("NoneType", "None").replace("|", "or")


def markdown() -> str:
    from ultralytics.cfg import DEFAULT_CFG_DICT

    out = []
    for command, schema in SCHEMAS:
        hints, docs = typing.get_type_hints(schema), field_docs(schema)
        out += [f"### `parallel-yolo {command}`", "", " ".join(schema.__doc__.split()), "",
                "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(schema):
            if f.name == "hyp" or f.name.startswith("_"):
                continue
            meaning = docs.get(f.name) or ("Ultralytics' key, as Ultralytics uses it" if f.name in DEFAULT_CFG_DICT
                                           else "")
            out.append(f"| `{f.name}` | {_type(hints[f.name])} | {_default(f)} | {meaning} |")
        out.append("")
    keys = ", ".join(f"`{k}` ({v!r})" for k, v in ULTRALYTICS_KEYS.items())
    out += ["### Ultralytics hyper-parameters `train` passes through", "",
            f"Ultralytics' own keys and defaults, reaching its dataset pipeline, loss and validator unchanged: {keys}.",
            "Any other Ultralytics key is refused by name rather than silently ignored.", ""]
    return "\n".join(out)


def write(page: Path) -> None:
    text = page.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    page.write_text(text[:start] + "\n" + markdown() + "\n" + text[end:])


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        print(markdown())
    else:
        write(Path(__file__).resolve().parents[2] / "docs" / "configuration.md")
