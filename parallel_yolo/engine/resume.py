"""`resume=true|DIR`: find the checkpoint to continue from and the configuration to continue with.

Runs before any process group exists (and before a self-launch), so a missing, corrupted or finished checkpoint
is reported as one line. The run continues with the settings it was trained with; keys given on the command line
override them, which is how a run moves to another strategy, world size or precision.

A group that torch's elastic agent restarts after a failure (`max_restarts=`, torchrun's `--max-restarts`) runs
the same command again; `after_restart` turns it into a resume from the newest checkpoint that launch wrote.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..checkpoint import remote
from ..config import ConfigError, TrainConfig, build, read_overrides

__all__ = ["resolve", "run_folder_of", "candidates", "launch_record", "after_restart", "restart_count"]

# settings that belong to the new launch, not to the run being continued
_NOT_INHERITED = {"resume", "device", "exist_ok", "project", "name"}


def resolve(tokens: list[str], *, launched: bool, world_size: int,
            launcher_choice: tuple[str | None, str | None]) -> TrainConfig:
    """The TrainConfig of a resumed run, its `resume` set to the checkpoint folder to load.

    On another world size the images per forward pass (micro_batch) stay what they were, when they still divide
    each process's share: BatchNorm normalises over exactly those images, so this keeps the run's numerics.
    """
    given = read_overrides(tokens)
    cfg = build(TrainConfig, given)
    chosen, manifest, skipped = checkpoint_to_resume(cfg.resume, project=cfg.project)
    from ..tasks.yolo import check_layers

    check_layers(manifest.get("model_yaml"), f"resume={chosen}")  # what the trainer will build, checked before launch
    for problem in skipped:
        print(f"parallel-yolo: warning: {problem}; resuming from {chosen} instead", file=sys.stderr, flush=True)
    inherited = {k: v for k, v in manifest["train_args"].items() if k not in _NOT_INHERITED}
    for key in ("model", "data"):
        if key in given and str(given[key]) != str(inherited.get(key)):
            raise ConfigError(f"{key}={given[key]}: {chosen} was trained with {key}={inherited.get(key)} and a resumed "
                              f"run keeps it; drop {key}=, or consolidate the checkpoint to a .pt and start a new run "
                              "with model=THAT.pt")
    if launched:
        inherited.pop("nproc", None)  # the launcher decides the world size now
    for key, from_launcher in zip(("strategy", "precision"), launcher_choice):
        if from_launcher:
            inherited.pop(key, None)  # the accelerate config decides
    world = world_size if launched else given.get("nproc") or inherited.get("nproc") or 1
    micro = manifest.get("micro_batch")
    if "micro_batch" not in given and micro and {**inherited, **given}.get("batch", 0) % (world * micro) == 0:
        inherited["micro_batch"] = micro
    resumed = build(TrainConfig, {**inherited, **given, "resume": str(chosen)})
    _refuse_finished(resumed, manifest, chosen)
    return resumed


def checkpoint_to_resume(resume: bool | str, *, project: str) -> tuple[Path, dict[str, Any], list[str]]:
    """(checkpoint folder, its verified manifest, why newer or named ones were passed over). An s3:// URL is fetched
    first (its newest intact checkpoint, checkpoint/remote.py)."""
    if remote.is_remote(resume):
        folder = remote.fetch(str(resume))
        return folder, checkpoint.load_manifest(folder), []
    if resume is True:
        runs = {m.parent.parent.parent for m in Path(project).glob("*/*/*/manifest.json")
                if m.parent.parent.name in ("weights", "checkpoints")}
        if not runs:
            raise ConfigError(f"resume=true: no checkpoint under project={project}; pass resume=RUN_FOLDER")
        newest = max(runs, key=lambda run: max(m.stat().st_mtime for m in run.glob("*/*/manifest.json")))
        return _newest_intact(candidates(newest))
    path = Path(str(resume))
    if (path / "weights").is_dir() or (path / "checkpoints").is_dir():
        return _newest_intact(candidates(path))
    try:
        return path, checkpoint.load_manifest(path), []
    except checkpoint.CheckpointError as e:
        run = run_folder_of(path)
        if run is None:
            raise ConfigError(f"resume={resume}: {e}") from None
        others = [c for c in candidates(run) if c != path]
        if not others:  # nothing to fall back to: the named checkpoint's own problem is the answer
            raise ConfigError(f"resume={resume}: {e}") from None
        chosen, manifest, skipped = _newest_intact(others)
        return chosen, manifest, [str(e), *skipped]


def restart_count() -> int:
    """How often torch's elastic agent has restarted this group (0: the first start, or no elastic agent)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def launch_record(tokens: list[str], project: str) -> Path | None:
    """Where this launch notes its run folder, so that a restarted group finds it: one file per launch (the elastic
    agent's run id and the command), under the project. None outside torch's elastic agent: nothing restarts."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    key = hashlib.sha1("\0".join([run_id, *tokens]).encode()).hexdigest()[:16]
    return Path(project) / ".launches" / key


def after_restart(tokens: list[str], record: Path | None) -> list[str] | None:
    """The command a restarted group runs: resume from the newest intact checkpoint this launch wrote; without one,
    the same command again, in the same run folder. None when the launch had already finished its work."""
    if record is None or not record.is_file():
        return tokens  # the group failed before it had a run folder: start again
    run, since, given = Path(record.read_text().strip()), record.stat().st_mtime, read_overrides(tokens)
    written = [c for c in candidates(run) if (c / "manifest.json").is_file()
               and (c / "manifest.json").stat().st_mtime >= since]
    if not written:
        return tokens if given.get("resume") else [*tokens, f"project={run.parent}", f"name={run.name}",
                                                   "exist_ok=true"]
    chosen, manifest, skipped = _newest_intact(written)
    for problem in skipped:
        print(f"parallel-yolo: warning: {problem}", file=sys.stderr, flush=True)
    max_steps = build(TrainConfig, given).max_steps
    if manifest["done"] or (max_steps and manifest["step"] >= max_steps):
        return None
    if os.environ.get("RANK", "0") == "0":
        print(f"parallel-yolo: restart {restart_count()} of this launch: resuming from {chosen} (step "
              f"{manifest['step']})", file=sys.stderr, flush=True)
    return [*tokens, f"resume={chosen}"]


def candidates(run: Path) -> list[Path]:
    """Every checkpoint folder of a run folder."""
    # .last.old-PID: the previous `last` when a save died between swapping the new one in and deleting the old
    return [p for p in (run / "weights" / "last", run / "weights" / "best", *(run / "checkpoints").glob("step_*"),
                        *(run / "weights").glob(f".*{checkpoint.OLD_MARK}*")) if p.is_dir()]


def run_folder_of(folder: Path) -> Path | None:
    """The run folder a checkpoint belongs to (weights/last, weights/best, checkpoints/step_N), if it is in one."""
    folder = Path(folder).resolve()
    return folder.parent.parent if folder.parent.name in ("weights", "checkpoints") else None


def _newest_intact(folders: list[Path]) -> tuple[Path, dict[str, Any], list[str]]:
    try:
        return checkpoint.newest_intact(folders)
    except checkpoint.CheckpointError as e:
        raise ConfigError(f"resume: {e}") from None


def _refuse_finished(cfg: TrainConfig, manifest: dict[str, Any], chosen: Path) -> None:
    if cfg.max_steps and manifest["step"] >= cfg.max_steps:
        raise ConfigError(f"resume: {chosen} is at step {manifest['step']}, already max_steps={cfg.max_steps}; "
                          "raise max_steps= (or drop it) to train further")
    if manifest["epoch"] >= cfg.epochs or (manifest["done"] and cfg.epochs <= manifest["train_args"]["epochs"]):
        raise ConfigError(f"resume: {chosen} finished all {cfg.epochs} epochs; raise epochs= to train further, "
                          "or start a new run without resume=")
