"""Checkpoint folders: tensors in safetensors, a manifest.json written last, the folder renamed into place.

A reader trusts a folder only if its manifest exists and every file listed there has the recorded size and
sha256, so a crash mid-write leaves at most an ignored temporary folder and never a damaged checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT_VERSION", "CheckpointError", "save", "rotate", "load_manifest", "load_tensors"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or for another model."""


def save(folder: Path, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> Path:
    """Atomically write `folder`: one safetensors file per entry of `tensors`, then the manifest, then rename."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        files = {}
        for stem, state in tensors.items():
            path = tmp / f"{stem}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {"format_version": FORMAT_VERSION, **meta, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        _fsync_dir(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def rotate(parent: Path, *, keep: int) -> None:
    """Delete all but the newest `keep` step_N checkpoints under `parent`."""
    steps = sorted((p for p in Path(parent).glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_manifest(folder: Path, *, verify: bool = True) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST}; not a complete parallel_yolo checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: unreadable manifest (corrupted file)") from None
    if verify:
        for name, info in manifest.get("files", {}).items():
            file = folder / name
            if not file.is_file() or file.stat().st_size != info["bytes"] or _sha256(file) != info["sha256"]:
                raise CheckpointError(f"{file}: missing or corrupted (size or sha256 differs from the manifest)")
    return manifest


def load_tensors(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / f"{stem}.safetensors"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
