"""The training state as checkpoint slabs: what each rank writes, and where each rank loads what it needs.

Parameters, their EMA and their optimizer state come from the strategy's `param_shards()` (each rank's flat
range of every parameter, whatever the backend's layout). BatchNorm buffers are written twice: averaged over
ranks (`model/...`, what evaluation and a new world size use) and as each rank's own values (`rankN/model/...`,
restored when the world size is unchanged, so a resumed run continues exactly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import CheckpointError, Reader, SaveFailed, Slab, abort, begin, commit, duplicate, write_shard

__all__ = ["save", "save_copy", "load"]


_KEPT = ("; the checkpoints saved before are intact: make room on the disk (or make the folder writable), then "
         "continue with resume=RUN_FOLDER")


def save(folder: Path, *, strategy, ema, buffers: dict[str, torch.Tensor], meta: dict[str, Any],
         rank_meta: dict[str, Any]) -> None:
    """Every rank writes its shard in parallel; rank 0 commits. `buffers`: the model's buffers to store (this rank's
    values). Collective; a failure on any rank raises on all ranks and leaves the previous checkpoint in `folder`
    untouched."""
    tmp, error = None, None
    if strategy.is_main:
        try:
            tmp = str(begin(folder))
        except OSError as e:
            error = f"cannot write a checkpoint next to {folder}: {e}"
    tmp, error = strategy.broadcast_object((tmp, error))
    if error:
        raise SaveFailed(f"{error}{_KEPT}")
    entry = None
    try:
        entry = write_shard(Path(tmp), strategy.rank, slabs(strategy, ema, buffers=buffers))
    except (OSError, RuntimeError) as e:
        error = f"rank {strategy.rank} could not write its shard of {folder}: {e}"
    reports = strategy.gather_object((entry, error, rank_meta))
    error = next((e for _, e, _ in reports if e), None)
    if strategy.is_main:
        try:
            if error is None:
                commit(Path(tmp), folder, {**meta, "ranks": [m for _, _, m in reports]}, [e for e, _, _ in reports])
        except (OSError, CheckpointError) as e:
            error = f"could not finish checkpoint {folder}: {e}"
        if error:
            abort(Path(tmp))
    error = strategy.broadcast_object(error)
    if error:
        raise SaveFailed(f"{error}{_KEPT}")


def save_copy(source: Path, folder: Path, *, strategy) -> None:
    """`folder` as a copy of the checkpoint just saved at `source` (rank 0 links the files; collective)."""
    error = None
    if strategy.is_main:
        try:
            duplicate(source, folder)
        except OSError as e:
            error = f"could not copy checkpoint {source} to {folder}: {e}"
    error = strategy.broadcast_object(error)
    if error:
        raise SaveFailed(f"{error}{_KEPT}")


def load(folder: Path, manifest: dict[str, Any], *, strategy, ema) -> None:
    """Fill this rank's parameters, EMA, optimizer state and buffers from the checkpoint (reads only its ranges)."""
    reader = Reader(folder, manifest)
    same_world = manifest["world_size"] == strategy.world_size
    with torch.no_grad():
        for slab in slabs(strategy, ema, reader=reader, own_buffers=same_world):
            if slab.key in reader.tensors and reader.shape(slab.key) != slab.shape:
                raise CheckpointError(f"{folder} holds {slab.key.split('/', 1)[1]} of shape "
                                      f"{list(reader.shape(slab.key))}, the model built now has {list(slab.shape)}: "
                                      "the checkpoint is for another model or number of classes")
            reader.read_into(slab.key, slab.lo, slab.hi, slab.data)
    strategy.after_load()


def slabs(strategy, ema, *, reader: Reader | None = None, own_buffers: bool = False,
          buffers: dict[str, torch.Tensor] | None = None) -> list[Slab]:
    """The slabs this rank writes (no reader; `buffers` instead of the live ones) or fills from `reader`."""
    out = []
    state = strategy.inner_optimizer().state
    saved = _saved_optimizer_states(reader) if reader else None
    for shard in strategy.param_shards():
        if shard.hi > shard.lo:
            out.append(Slab(f"model/{shard.name}", shard.shape, shard.lo, shard.hi, shard.values, shard.share))
            out.append(Slab(f"ema/{shard.name}", shard.shape, shard.lo, shard.hi,
                            ema.param_view(shard.name, shard.lo, shard.hi), shard.share))
        if shard.full is not None and reader:
            out.append(Slab(f"model/{shard.name}", shard.shape, 0, shard.full.numel(), shard.full))
        span = shard.optimizer
        if span is None or span.hi <= span.lo:
            continue
        held = state[span.key]
        names = saved.get(shard.name, ()) if reader else [k for k, v in held.items() if torch.is_tensor(v)]
        for name in names:
            if name not in held:
                held[name] = torch.zeros((), dtype=torch.float32) if reader.shape(f"optim/{name}/{shard.name}") == () \
                    else torch.zeros_like(span.key)
            value = held[name]
            key = f"optim/{name}/{shard.name}"
            if value.dim() == 0:  # a per-parameter counter (Adam's step): written by the holder of element 0, read by all
                if span.lo == 0 or reader:
                    out.append(Slab(key, (), 0, 1, value.view(1), span.share))
                continue
            flat = _local(value).view(-1)
            if flat.numel() != _local(span.key).numel():
                raise CheckpointError(f"optimizer state '{name}' is not shaped like its parameter; this optimizer's "
                                      "state cannot be checkpointed by parameter")
            out.append(Slab(key, shard.shape, span.lo, span.hi, flat[span.offset:span.offset + span.hi - span.lo],
                            span.share))
    live = dict(strategy.raw_model.named_buffers())
    out += _buffer_slabs(strategy, "model", live if reader or buffers is None else buffers, reader, own_buffers)
    out += _buffer_slabs(strategy, "ema", ema.buffers(), reader, own_buffers)
    return out


def _buffer_slabs(strategy, prefix: str, live: dict[str, torch.Tensor], reader: Reader | None,
                  own_buffers: bool) -> list[Slab]:
    rank_prefix = f"rank{strategy.rank}/{prefix}"
    if reader:
        use = rank_prefix if own_buffers and reader.keys(f"{rank_prefix}/") else prefix
        return [Slab(f"{use}/{k}", tuple(b.shape), 0, b.numel(), b.view(-1)) for k, b in live.items()]
    averaged = strategy.averaged_copies(live)
    share = (strategy.rank, strategy.world_size)
    return ([Slab(f"{prefix}/{k}", tuple(b.shape), 0, b.numel(), b.view(-1), share) for k, b in averaged.items()]
            + [Slab(f"{rank_prefix}/{k}", tuple(b.shape), 0, b.numel(), b.view(-1)) for k, b in live.items()])


def _saved_optimizer_states(reader: Reader) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for key in reader.keys("optim/"):
        _, name, param = key.split("/", 2)
        names.setdefault(param, []).append(name)
    return names


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor

