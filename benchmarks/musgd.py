"""MuSGD against SGD under each strategy, measured side by side in one run and printed as ratios.

    python benchmarks/musgd.py [model=yolov8x.yaml] [nproc=2] [imgsz=320] [batch=4] [steps=5]
                               [strategies=ddp,zero1,zero2,zero3,fsdp] [parts=optimizer,training]

`optimizer`: the optimizer step alone, on random gradients of the model, one thread per process: Ultralytics' own
MuSGD in one process against ours on `nproc` ranks under ddp, zero2 and fsdp, with the seconds each rank spends in
Newton–Schulz (Ultralytics' function, timed by wrapping it): the owner-based step splits that work over the ranks.
`training`: `parallel-yolo compare` over the strategies with optimizer=SGD, then with optimizer=MuSGD (each strategy
in fresh processes, the same synthetic batch); per strategy the step time of MuSGD over SGD's, the bytes MuSGD's
Newton–Schulz exchange sends per step and rank (every rank sends the owners its pieces of each matrix's update and
gets the orthogonalised pieces back), and MuSGD's model states against the formula (a momentum per parameter, a
second one per parameter of the muon groups: memory.OPTIMIZER_STATES), checked within +-2% on every rank.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> None:
    args = {"model": "yolov8x.yaml", "nproc": "2", "imgsz": "320", "batch": "4", "steps": "5",
            "strategies": "ddp,zero1,zero2,zero3,fsdp", "parts": "optimizer,training"}
    args.update(a.split("=", 1) for a in argv)
    if "optimizer" in args["parts"]:
        optimizer_step(args)
    if "training" in args["parts"]:
        training_step(args)


def optimizer_step(args: dict[str, str]) -> None:
    import torch.multiprocessing as mp

    print(f"\noptimizer step alone, {args['model']}, 1 thread per process: seconds per step (median of 3) and in "
          "Newton-Schulz, per rank")
    for name, world in (("ultralytics", 1), *((n, int(args["nproc"])) for n in ("ddp", "zero2", "fsdp"))):
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_optimizer_worker, args=(world, _free_port(), name, args["model"], queue), nprocs=world, join=True)
        ranks = sorted(queue.get() for _ in range(world))
        print(f"{name:<12} x{world}  step " + "  ".join(f"{s:.2f}" for _, s, _ in ranks) + "   newton-schulz "
              + "  ".join(f"{n:.2f}" for _, _, n in ranks), flush=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _optimizer_worker(rank: int, world: int, port: int, name: str, model_yaml: str, queue) -> None:
    import os
    import statistics
    import time

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    from ultralytics.optim import muon

    from parallel_yolo._ultralytics_internals import build_optimizer
    from parallel_yolo.config import TrainConfig
    from parallel_yolo.launch import dist
    from parallel_yolo.strategies import create, preset
    from parallel_yolo.strategies.precision import policy
    from parallel_yolo.tasks import yolo

    torch.set_num_threads(1)
    spent, newton_schulz = [0.0], muon.zeropower_via_newtonschulz5

    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return newton_schulz(*a, **k)
        finally:
            spent[0] += time.perf_counter() - start

    muon.zeropower_via_newtonschulz5 = timed
    torch.manual_seed(0)
    cfg = TrainConfig(optimizer="MuSGD", lr0=0.01, batch=4)
    hyp = yolo.hyp_namespace(cfg)
    model = yolo.build_model(model_yaml, nc=80, names={i: str(i) for i in range(80)}, hyp=hyp)
    env = dist.read_env()
    with dist.process_group(env, torch.device("cpu")):
        if name == "ultralytics":
            optimizer = build_optimizer(model, hyp=hyp, nc=80, name="MuSGD", lr=0.01, momentum=0.9, decay=5e-4,
                                        iterations=1)
        else:
            strategy = create(name, env=env, device=torch.device("cpu"), precision=policy("fp32"), options=preset(name))
            strategy.setup(model, make_optimizer=yolo.optimizer_factory(cfg, hyp, nc=80, dataset_size=8,
                                                                        weight_decay=5e-4))
            optimizer = strategy.inner_optimizer()
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p) * 1e-3
        times = []
        for _ in range(4):  # the first builds the state and the exchange plan: not counted
            torch.distributed.barrier()
            start, spent[0] = time.perf_counter(), 0.0
            optimizer.step()
            times.append((time.perf_counter() - start, spent[0]))
        queue.put((rank, statistics.median(t for t, _ in times[1:]), statistics.median(n for _, n in times[1:])))


def training_step(args: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="pyolo-musgd-") as work:
        reports = {}
        for optimizer in ("SGD", "MuSGD"):
            command = [sys.executable, "-m", "parallel_yolo", "compare", f"model={args['model']}",
                       f"strategies={args['strategies']}", f"nproc={args['nproc']}", f"imgsz={args['imgsz']}",
                       f"batch={args['batch']}", f"steps={args['steps']}", f"optimizer={optimizer}",
                       f"project={work}", f"name={optimizer}"]
            subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
            reports[optimizer] = json.loads((Path(work) / optimizer / "compare.json").read_text())
    sgd = {s["strategy"]: s for s in reports["SGD"]["summary"]}
    musgd = {s["strategy"]: s for s in reports["MuSGD"]["summary"]}
    print(f"\n{reports['MuSGD']['device']}; {args['model']}, x{args['nproc']}, imgsz {args['imgsz']}, global batch "
          f"{args['batch']}, fp32")
    print(f"{'strategy':<10}{'SGD step s':>12}{'MuSGD step s':>14}{'MuSGD / SGD':>13}{'muon MiB/step':>15}"
          f"{'states vs formula':>19}")
    ok = True
    for name, row in musgd.items():
        worst = max(abs(sum(r["states"].values()) / sum(r["formula"].values()) - 1)
                    for entry in reports["MuSGD"]["ranks"] if entry["strategy"] == name for r in entry["ranks"])
        ok &= worst <= 0.02
        print(f"{name:<10}{sgd[name]['step_s']:>12.2f}{row['step_s']:>14.2f}{row['step_s'] / sgd[name]['step_s']:>13.2f}"
              f"{row['muon_sent_MiB_per_step']:>15.1f}{100 * worst:>18.2f}%")
    print(f"MuSGD model states within 2% of the formula on every rank: {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main(sys.argv[1:])
