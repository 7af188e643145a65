"""The optimizer step alone (unscale, clip, step, zero grads: `strategy.step()`), per strategy and optimizer, on
`nproc` CPU processes with one thread each, printed as a ratio to DDP's step measured in the same run.

    python benchmarks/optimizer_step.py [model=yolov8x.yaml] [nproc=2] [strategies=ddp,zero2,fsdp]
                                        [optimizers=SGD,AdamW] [repeats=5]

Gradients come from a real forward and backward of a 64-px batch before each timed step (not timed). Seconds are
the median over `repeats` steps of the slowest rank.
"""

from __future__ import annotations

import socket
import statistics
import sys


def main(argv: list[str]) -> None:
    import torch.multiprocessing as mp

    args = {"model": "yolov8x.yaml", "nproc": "2", "strategies": "ddp,zero2,fsdp", "optimizers": "SGD,AdamW",
            "repeats": "5"}
    args.update(a.split("=", 1) for a in argv)
    world = int(args["nproc"])
    print(f"optimizer step alone, {args['model']}, {world} processes, 1 thread each: seconds (median, slowest rank)")
    for optimizer in args["optimizers"].split(","):
        seconds = {}
        for name in args["strategies"].split(","):
            queue = mp.get_context("spawn").SimpleQueue()
            mp.spawn(_worker, args=(world, _free_port(), name, optimizer, args["model"], int(args["repeats"]), queue),
                     nprocs=world, join=True)
            seconds[name] = max(queue.get() for _ in range(world))
        base = seconds.get("ddp")
        print(f"{optimizer:<6} " + "  ".join(f"{n} {s:.3f}s" + (f" ({s / base:.2f}x ddp)" if base else "")
                                            for n, s in seconds.items()), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, name: str, optimizer: str, model_yaml: str, repeats: int, queue) -> None:
    import os
    import time

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", YOLO_VERBOSE="False")
    import torch

    from parallel_yolo.config import TrainConfig
    from parallel_yolo.launch import dist as pdist
    from parallel_yolo.strategies import create, preset
    from parallel_yolo.strategies.precision import policy
    from parallel_yolo.tasks import yolo

    torch.manual_seed(0)
    env, device = pdist.read_env(), torch.device("cpu")
    with pdist.process_group(env, device):
        cfg = TrainConfig(optimizer=optimizer, lr0=0.001, batch=2 * world)
        hyp = yolo.hyp_namespace(cfg)
        model = yolo.build_model(model_yaml, nc=80, names={i: str(i) for i in range(80)}, hyp=hyp)
        criterion = yolo.build_criterion(model)
        strategy = create(name, env=env, device=device, precision=policy("fp32"), options=preset(name))
        strategy.setup(model, make_optimizer=yolo.optimizer_factory(cfg, hyp, nc=80, dataset_size=8,
                                                                     weight_decay=0.0005))
        batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]),
                 "cls": torch.tensor([[0.0], [2.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.6, 0.2, 0.4]])}
        times = []
        for _ in range(repeats + 1):  # the first step creates the optimizer state: not counted
            loss, _ = criterion(strategy.model(batch["img"]), batch)
            strategy.backward(loss.sum() * world)
            start = time.perf_counter()
            strategy.step()
            times.append(time.perf_counter() - start)
        queue.put(statistics.median(times[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
