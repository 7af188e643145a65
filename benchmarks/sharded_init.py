"""Issue 17's sharded-initialisation targets, measured on CPU processes (gloo) and printed as ratios:

    python benchmarks/sharded_init.py [models=yolov8x.yaml,configs/models/yolov8x-wide.yaml] [nprocs=2,4]
        [strategies=fsdp,zero3] [limit=3GiB] [limit_model=configs/models/yolov8x-wide.yaml]

1. Setup peak. For every model, process count and strategy, with sharded_init=false (every rank builds the whole
   model, then the strategy shards it) and true (each rank keeps its share of each layer as Ultralytics makes it):
   each rank's peak resident memory above its baseline while the model is built and set up, beside the bound
   "that rank's sharded model states (memory.formula, SGD: params, gradients, momentum, EMA) + the largest layer's
   full size". Target: peak <= bound with sharded_init=true.
2. A real per-process limit. The wide model under ddp and under fsdp, 4 processes each, every process under
   RLIMIT_AS = its address space after start-up + `limit`: build, set up, one SGD step with EMA at 64 px. DDP's
   model states alone are ~4.1 GiB per process and do not fit 3 GiB; fsdp's are a quarter of that and fit.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

MIB = 2**20


def _environment(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _parts(model: str, strategy, cfg, sharded_init: bool):
    from parallel_yolo.tasks import yolo

    hyp = yolo.hyp_namespace(cfg)
    torch.manual_seed(0)
    built = yolo.build_model(model, nc=80, names={i: str(i) for i in range(80)}, hyp=hyp,
                             keep=strategy.layer_keeper() if sharded_init else None)
    largest = max(sum(strategy.full_shape(t).numel() * t.element_size() for t in (*layer.parameters(),
                                                                                   *layer.buffers()))
                  for layer in built.model)
    numel = sum(strategy.full_shape(p).numel() for p in built.parameters())
    strategy.setup(built, make_optimizer=yolo.optimizer_factory(cfg, hyp, nc=80, dataset_size=8, weight_decay=5e-4))
    return numel, largest


def _setup_worker(rank: int, world: int, port: int, model: str, name: str, sharded_init: bool, out: str) -> None:
    _environment(rank, world, port)
    from parallel_yolo.config import TrainConfig
    from parallel_yolo.launch import dist as pdist
    from parallel_yolo.monitor import memory
    from parallel_yolo.strategies import create, preset
    from parallel_yolo.strategies.precision import policy

    env, device = pdist.read_env(), torch.device("cpu")
    cfg = TrainConfig(optimizer="SGD", batch=world)
    _load_code(name, cfg)
    with pdist.process_group(env, device), memory.returning_freed_memory():
        memory.reset_peak(device)
        strategy = create(name, env=env, device=device, precision=policy("fp32"),
                          options={**preset(name), "sharded_init": sharded_init})
        numel, largest = _parts(model, strategy, cfg, sharded_init)
        peak = memory.peak_rss() - strategy.baseline_rss
        states = sum(memory.strategy_formula(strategy, numel=numel, optimizer="SGD").values())
        strategy.barrier()
    Path(out, f"{rank}.json").write_text(json.dumps({"peak": peak, "states": states, "largest": largest,
                                                     "whole": 4 * numel}))


def _load_code(name: str, cfg) -> None:
    """Import what the build and setup import (Ultralytics' model and trainer modules, FSDP and torch's meta-device
    kernels, DeepSpeed: ~60, ~150 and ~100 MiB of code) before the baseline, with and without sharded_init, so that
    what is measured above it is the model's memory."""
    from parallel_yolo.monitor import memory
    from parallel_yolo.tasks import yolo

    yolo.hyp_namespace(cfg)
    for module in ("ultralytics.engine.trainer", "ultralytics.nn.tasks", "torch.distributed.fsdp"):
        importlib.import_module(module)
    memory.load_meta_kernels()  # also what FSDP's first fully_shard imports (~150 MiB) in a whole build

    if name.startswith("zero"):
        from parallel_yolo.strategies.deepspeed import import_deepspeed

        import_deepspeed()


def _limited_worker(rank: int, world: int, port: int, model: str, name: str, limit: int, out: str) -> None:
    _environment(rank, world, port)
    from parallel_yolo.config import TrainConfig
    from parallel_yolo.engine.step import forward_backward
    from parallel_yolo.launch import dist as pdist
    from parallel_yolo.strategies import create, preset
    from parallel_yolo.strategies.precision import policy
    from parallel_yolo.tasks import yolo
    from parallel_yolo.tools.compare import synthetic_batch

    env, device = pdist.read_env(), torch.device("cpu")
    cfg = TrainConfig(optimizer="SGD", batch=world)
    outcome = "fits: built, set up, one step with EMA"
    with pdist.process_group(env, device, timeout_s=120):
        strategy = create(name, env=env, device=device, precision=policy("fp32"), options=preset(name))
        # threads and their arenas first (a collective, a small forward and backward), then the limit
        strategy.barrier()
        torch.nn.Conv2d(3, 8, 3)(torch.rand(1, 3, 16, 16)).sum().backward()
        with open("/proc/self/statm") as f:
            start = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (start + limit, resource.RLIM_INFINITY))
        try:
            _parts(model, strategy, cfg, True)
            criterion = yolo.build_criterion(strategy.raw_model)
            ema = strategy.make_ema()
            batch = synthetic_batch(world, 64, device, env)
            items, _ = forward_backward(strategy, criterion, [batch], sync=True)
            strategy.step(items)
            ema.update()
        except (MemoryError, RuntimeError) as e:
            outcome = f"does not fit: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            traceback.print_exc(limit=2)
    Path(out, f"{rank}.json").write_text(json.dumps({"outcome": outcome}))


def _spawn(worker, world: int, *args) -> list[dict]:
    with socket.socket() as s, tempfile.TemporaryDirectory() as out:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(worker, args=(world, port, *args, out), nprocs=world, join=True)
        return [json.loads(Path(out, f"{rank}.json").read_text()) for rank in range(world)]


def _bytes(text: str) -> int:
    from parallel_yolo.config import size_bytes

    return size_bytes("limit", text)


def main(argv: list[str]) -> None:
    args = {"models": "yolov8x.yaml,configs/models/yolov8x-wide.yaml", "nprocs": "2,4", "strategies": "fsdp,zero3",
            "limit": "3GiB", "limit_model": "configs/models/yolov8x-wide.yaml"}
    args.update(a.split("=", 1) for a in argv)
    print(f"CPU, {len(os.sched_getaffinity(0))} cores, gloo, fp32; MiB per rank (worst rank)")
    print(f"{'model':34} {'N':>2} {'strategy':8} {'sharded_init':12} {'setup peak':>10} {'states':>7} "
          f"{'largest layer':>13} {'bound':>7} {'peak/bound':>10} {'whole model':>11}")
    for model in args["models"].split(","):
        for world in map(int, args["nprocs"].split(",")):
            for name in args["strategies"].split(","):
                for sharded_init in (False, True):
                    ranks = _spawn(_setup_worker, world, model, name, sharded_init)
                    worst = max(ranks, key=lambda r: r["peak"])
                    bound = worst["states"] + worst["largest"]
                    verdict = ("met" if worst["peak"] <= bound else "MISSED") if sharded_init else ""
                    figures = (f"{worst['peak'] / MIB:>10.0f} {worst['states'] / MIB:>7.0f} "
                               f"{worst['largest'] / MIB:>13.0f} {bound / MIB:>7.0f} {worst['peak'] / bound:>10.2f} "
                               f"{worst['whole'] / MIB:>11.0f}")
                    print(f"{model:34} {world:>2} {name:8} {str(sharded_init).lower():12} {figures}  {verdict}",
                          flush=True)
    if args["limit"] != "none":
        limit = _bytes(args["limit"])
        print(f"\n{args['limit_model']}, 4 processes, each under RLIMIT_AS = its start-up address space + "
              f"{args['limit']}:")
        for name in ("ddp", "fsdp"):
            ranks = _spawn(_limited_worker, 4, args["limit_model"], name, limit)
            outcomes = sorted({r["outcome"] for r in ranks})
            print(f"  {name}: {' | '.join(outcomes)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
