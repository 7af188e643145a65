"""`parallel-yolo <train|val|help> key=value ...` (also `python -m parallel_yolo ...`).

Mistakes in the command exit with code 2 and one line naming the fix; `nproc=N` outside a launcher starts N
local processes through torch's elastic launcher, each of which runs this same entry point.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from .config import CompareConfig, ConfigError, ConsolidateConfig, TrainConfig, Unanimous, ValConfig, parse_overrides
from .launch.heartbeat import LAUNCHER_REPORTS, PeerLost

__all__ = ["main", "run"]

USAGE = """usage: parallel-yolo COMMAND key=value ...

commands:
  train        train a detector        e.g. parallel-yolo train cfg=configs/train/demo.yaml
               continue a run          e.g. parallel-yolo train resume=runs/detect/train strategy=ddp nproc=4
  val          evaluate a checkpoint   e.g. parallel-yolo val checkpoint=runs/detect/train/weights/best
  consolidate  one file from shards    e.g. parallel-yolo consolidate checkpoint=runs/detect/train/weights/best out=best.pt
  compare      memory, communication and speed of strategies, measured beside theory
                                       e.g. parallel-yolo compare model=yolov8x.yaml strategies=ddp,zero2,zero3,fsdp nproc=2
  help         this text and the keys of every command

launch: add nproc=N for N local processes, or run under torchrun / accelerate launch / deepspeed.
"""


def run() -> None:
    """The `parallel-yolo` command and `python -m parallel_yolo`: `main`, then the exit of shutdown.finish (Python's
    shutdown order without the module teardown; a rank whose exit hangs is ended and named). An exception leaves
    through Python's usual exit."""
    from .launch.shutdown import finish

    finish(main())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"help", "-h", "--help"}:
        print(USAGE + _keys_help())
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            return _train(rest)
        if command == "val":
            return _val(rest)
        if command == "compare":
            from .tools.compare import run_compare

            run_compare(parse_overrides(rest, CompareConfig), rest)
            return 0
        if command == "consolidate":
            from .engine.consolidate import consolidate

            cfg = parse_overrides(rest, ConsolidateConfig)
            consolidate(checkpoint=cfg.checkpoint, out=cfg.out, weights=cfg.weights)
            return 0
        raise ConfigError(f"unknown command '{command}'; use train, val, consolidate, compare or help")
    except (ConfigError, PeerLost) as e:
        code = 2 if isinstance(e, ConfigError) else 1
        _report(str(e), exitcode=code, every_rank=not isinstance(e, Unanimous))
        return code
    except KeyboardInterrupt:
        print("parallel-yolo: interrupted", file=sys.stderr)
        return 130


def _report(message: str, *, exitcode: int, every_rank: bool) -> None:
    """A rank's error, in one line on stderr and in the file torch's elastic agent reads (TORCHELASTIC_ERROR_FILE),
    which torchrun's summary and our own launcher show. Under our launcher the rank does not print: once one rank
    has failed, the agent stops the others, perhaps the very rank that was about to print a shared error, so the
    launcher prints the cause after the group has stopped. Unless the group restarts, which the launcher does not
    report: then the rank prints, as without it."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError), open(error_file, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time()), "exitcode": exitcode}, f)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if os.environ.get(LAUNCHER_REPORTS) and restarts >= int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0):
        return
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(f"parallel-yolo: error: {message}", file=sys.stderr, flush=True)


def _train(tokens: list[str]) -> int:
    from .engine import resume
    from .engine.trainer import preflight, train
    from .launch import dist

    cfg = parse_overrides(tokens, TrainConfig)
    env = dist.read_env()
    record = resume.launch_record(tokens, cfg.project) if env.launched else None
    if env.launched and resume.restart_count():
        tokens = resume.after_restart(tokens, record)
        if tokens is None:
            print("parallel-yolo: restarted after this launch had finished; nothing to do", file=sys.stderr)
            return 0
        cfg = parse_overrides(tokens, TrainConfig)
    if cfg.resume:
        from .strategies.registry import from_launcher

        cfg = resume.resolve(tokens, launched=env.launched, world_size=env.world_size,
                             launcher_choice=from_launcher(env))
        tokens = [*tokens, f"resume={cfg.resume}"]  # the processes started below load this very checkpoint
    dist.check_nproc(cfg.nproc, env)
    if cfg.nproc and not env.launched:
        preflight(cfg, world_size=cfg.nproc)
        return dist.launch_local(cfg.nproc, ["train", *tokens], max_restarts=cfg.max_restarts)
    train(cfg, launch_record=record)
    return 0


def _val(tokens: list[str]) -> int:
    from .engine.validate import run_val
    from .launch import dist

    cfg = parse_overrides(tokens, ValConfig)
    env = dist.read_env()
    if cfg.nproc and not env.launched:
        return dist.launch_local(cfg.nproc, ["val", *tokens])
    run_val(cfg)
    return 0


def _keys_help() -> str:
    import dataclasses

    lines = []
    for name, schema in (("train", TrainConfig), ("val", ValConfig), ("consolidate", ConsolidateConfig),
                         ("compare", CompareConfig)):
        keys = [f.name for f in dataclasses.fields(schema) if f.name != "hyp" and not f.name.startswith("_")]
        lines.append(f"\n{name} keys: " + ", ".join(keys))
    from .config import ULTRALYTICS_KEYS

    lines.append("\nUltralytics hyper-parameters also accepted by train: " + ", ".join(ULTRALYTICS_KEYS))
    return "\n".join(lines)
