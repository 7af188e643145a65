"""Checkpoint folders written by every rank at once, readable by any number of ranks under any strategy.

Every tensor of the training state (model, EMA, optimizer state by parameter, buffers) is addressed by a key
such as `model/model.0.conv.weight` or `optim/momentum_buffer/model.0.conv.weight` and stored as flat element
ranges: each rank writes the ranges it holds into its own `rankNNNNN.safetensors` (ranks that hold the same
range split it, so DDP writes in parallel too). `manifest.json` lists every file with its size and sha256, and
for every key its full shape and which file holds which range. A reader asks for any range of any key and gets
it from whichever files hold it (safetensors slices: no rank reads more than it needs), so a checkpoint is
independent of the strategy and world size that wrote it.

Atomicity: all files go into a temporary sibling folder; rank 0 writes the manifest last, fsyncs and renames.
A reader trusts a folder only if its manifest exists and the files match it, so a crash mid-write leaves at
most a temporary folder, which the next save in that place removes.

Layer 5: imports data/ (the cache folder of remote.py), config/ and the leaves; never strategies/ or above.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, Unanimous

if TYPE_CHECKING:  # torch is imported where a tensor is made: the uploader process (remote.py) needs none
    import torch

__all__ = ["FORMAT_VERSION", "CheckpointError", "Slab", "begin", "write_shard", "commit", "duplicate", "abort",
           "rotate", "load_manifest", "newest_intact", "Reader"]

# 3: random-generator states as numbers (2 held them as pickles, which this version never loads)
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


class CheckpointError(ConfigError):
    """A checkpoint that is missing, incomplete, corrupted or for another model: reported like a bad key."""


class SaveFailed(CheckpointError, Unanimous):
    """A save that failed on some rank (disk full, folder not writable); every rank raises it with the same words."""


@dataclass(frozen=True, slots=True)
class Slab:
    """Flat elements [lo, hi) of the full tensor `key` (of `shape`), held in `data` (1-D, a view into live
    storage, so loading fills it in place). `share=(i, n)`: n ranks hold this range; this one writes part i."""

    key: str
    shape: tuple[int, ...]
    lo: int
    hi: int
    data: torch.Tensor
    share: tuple[int, int] = (0, 1)

    def part(self) -> tuple[int, int]:
        index, count = self.share
        size = -(-(self.hi - self.lo) // count)
        return min(self.lo + index * size, self.hi), min(self.lo + (index + 1) * size, self.hi)


# ---- writing ---------------------------------------------------------------------------------------------------
def begin(folder: Path) -> Path:
    """Create the temporary folder next to `folder` (rank 0), clearing what interrupted saves left there (saves
    into one parent folder never overlap: the trainer writes one checkpoint at a time)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".*{TMP_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in folder.parent.glob(f".{folder.name}{OLD_MARK}*"):
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:  # a crash between the two renames of commit(): the previous checkpoint comes back
            old.rename(folder)
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}{TMP_MARK}", dir=folder.parent))


def write_shard(tmp: Path, rank: int, slabs: list[Slab]) -> dict[str, Any]:
    """Write this rank's part of every slab into one safetensors file; returns its manifest entry."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors, ranges = {}, []
    for slab in slabs:
        a, b = slab.part()
        if a < b:
            # a copy: safetensors refuses views that share storage (ZeRO keeps parameters in flat buffers)
            tensors[f"{slab.key}@{a}"] = slab.data[a - slab.lo:b - slab.lo].detach().cpu().clone()
            ranges.append([slab.key, list(slab.shape), a, b])
    path = Path(tmp) / f"rank{rank:05d}.safetensors"
    try:
        save_file(tensors, str(path))
    except SafetensorError as e:  # its I/O errors (a full disk) are not OSErrors
        raise OSError(f"{path.name}: {e}") from None
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path), "ranges": ranges}


def commit(tmp: Path, folder: Path, meta: dict[str, Any], shards: list[dict[str, Any]]) -> Path:
    """Rank 0, after every rank wrote its file: check that the ranges cover every tensor, write the manifest,
    then swap the folder into place."""
    tensors: dict[str, dict[str, Any]] = {}
    for shard in shards:
        for key, shape, lo, hi in shard["ranges"]:
            entry = tensors.setdefault(key, {"shape": shape, "parts": []})
            entry["parts"].append([shard["file"], lo, hi])
    for key, entry in tensors.items():
        _check_coverage(key, entry)
    files = {s["file"]: {"bytes": s["bytes"], "sha256": s["sha256"]} for s in shards}
    manifest = {"format_version": FORMAT_VERSION, **meta, "files": files, "tensors": tensors}
    path = Path(tmp) / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, default=str))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return _swap_in(Path(tmp), Path(folder))


def duplicate(source: Path, folder: Path) -> Path:
    """A complete checkpoint at `folder` identical to the committed `source` (weights/best when it is the state just
    saved as weights/last), swapped into place as `commit` does. Files are hard-linked where the file system allows
    (no checkpoint file is ever modified in place: every save writes a new folder), else copied."""
    tmp = begin(folder)
    try:
        for file in Path(source).iterdir():
            try:
                os.link(file, tmp / file.name)
            except OSError:
                shutil.copy2(file, tmp / file.name)
        return _swap_in(tmp, Path(folder))
    except BaseException:
        abort(tmp)
        raise


def _swap_in(tmp: Path, folder: Path) -> Path:
    if folder.exists():
        old = folder.with_name(f".{folder.name}{OLD_MARK}{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)
    return folder


def abort(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def rotate(parent: Path, *, keep: int) -> None:
    """Delete all but the newest `keep` step_N checkpoints under `parent`."""
    steps = sorted((p for p in Path(parent).glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---- reading ---------------------------------------------------------------------------------------------------
def load_manifest(folder: Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of a complete checkpoint; with `verify`, every file's size and sha256 are checked."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST}; not a complete parallel_yolo checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: unreadable manifest (corrupted file)") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version == 2:
        raise CheckpointError(f"{folder}: checkpoint format 2 keeps its random-generator states as pickles, which "
                              f"this version never loads (format {FORMAT_VERSION}); consolidate it to a .pt with "
                              "parallel_yolo 0.1.0 and start a new run from it (model=FILE.pt)")
    if version != FORMAT_VERSION or not isinstance(manifest.get("tensors"), dict):
        raise CheckpointError(f"{folder}: checkpoint format {version}, this version reads {FORMAT_VERSION}")
    _check_ranks(folder, manifest)
    if verify:
        for name, info in manifest["files"].items():
            file = folder / name
            if not file.is_file():
                raise CheckpointError(f"{file}: missing (listed in the manifest)")
            if file.stat().st_size != info["bytes"] or _sha256(file) != info["sha256"]:
                raise CheckpointError(f"{file}: corrupted or truncated (size or sha256 differs from the manifest)")
    return manifest


def _check_ranks(folder: Path, manifest: dict[str, Any]) -> None:
    """Every rank's entry holds its random-generator states as the numbers `rng.capture` writes."""
    from .rng import check

    ranks = manifest.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != manifest.get("world_size"):
        raise CheckpointError(f"{folder}: its manifest lists no entry per rank (a damaged or foreign manifest)")
    for rank, entry in enumerate(ranks):
        try:
            check(entry.get("rng") if isinstance(entry, dict) else None)
        except CheckpointError as e:
            raise CheckpointError(f"{folder}: rank {rank}: {e}") from None


def newest_intact(folders: list[Path]) -> tuple[Path, dict[str, Any], list[str]]:
    """The complete, uncorrupted checkpoint with the highest step among `folders`, and why the newer ones were
    passed over."""
    candidates = []
    for folder in folders:
        try:
            step = json.loads((Path(folder) / MANIFEST).read_text()).get("step", -1)
        except (OSError, json.JSONDecodeError):
            step = -1
        candidates.append((step, str(folder)))
    problems = []
    for _, folder in sorted(candidates, reverse=True):
        try:
            return Path(folder), load_manifest(Path(folder)), problems
        except CheckpointError as e:
            problems.append(str(e))
    raise CheckpointError("no intact checkpoint: " + ("; ".join(problems) or "none found"))


class Reader:
    """Reads any element range of any stored tensor, opening only the files that hold it."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder, self.manifest, self.tensors = Path(folder), manifest, manifest["tensors"]
        self._open: dict[str, Any] = {}

    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.tensors if k.startswith(prefix)]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key]["shape"])

    def read_into(self, key: str, lo: int, hi: int, out: torch.Tensor) -> None:
        """Fill the 1-D `out` (hi - lo elements) with elements [lo, hi) of `key`."""
        if key not in self.tensors:
            raise CheckpointError(f"{self.folder}: no tensor '{key}' (the checkpoint is for another model or "
                                  "optimizer)")
        for file, a, b in self.tensors[key]["parts"]:
            start, stop = max(a, lo), min(b, hi)
            if start < stop:
                piece = self._file(file).get_slice(f"{key}@{a}")[start - a:stop - a]
                out[start - lo:stop - lo].copy_(piece)

    def full(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        import torch

        shape = self.shape(key)
        file, a, _ = self.tensors[key]["parts"][0]
        dtype = dtype or self._file(file).get_slice(f"{key}@{a}")[0:0].dtype
        out = torch.empty(math.prod(shape), dtype=dtype)
        self.read_into(key, 0, out.numel(), out)
        return out.view(shape)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Full tensors of every key under `prefix` (e.g. 'ema/'), keyed by the rest of the name."""
        return {k[len(prefix):]: self.full(k) for k in self.keys(prefix)}

    def _file(self, name: str):
        from safetensors import safe_open

        if name not in self._open:
            self._open[name] = safe_open(str(self.folder / name), framework="pt")
        return self._open[name]


def _check_coverage(key: str, entry: dict[str, Any]) -> None:
    numel, covered = math.prod(entry["shape"]), 0
    for _, lo, hi in sorted(entry["parts"], key=lambda p: p[1]):
        if lo > covered:
            break
        covered = max(covered, hi)
    if covered < numel:
        raise CheckpointError(f"internal error: the ranks wrote elements [0, {covered}) of {key}, not all {numel}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
