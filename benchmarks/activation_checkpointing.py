"""Issue 17's activation-checkpointing targets, measured side by side in one `parallel-yolo compare` run and printed
as ratios:

    python benchmarks/activation_checkpointing.py [model=yolov8x.yaml] [imgsz=640] [nproc=2] [batch=4]
        [strategies=ddp] [modes=backbone,all,auto] [steps=3] [optimizer=SGD] [budget=]

Every strategy is measured without checkpointing and with each mode (fresh processes each), then per strategy and
mode: activation memory (peak above baseline minus model states, worst rank) beside recompute.py's forecast of it,
and median step time, each over the same strategy without checkpointing. Targets for `all`: activations <= 0.4x,
step time <= 1.35x. Also printed: the largest per-GPU batch under the budget each way. `auto` plans for `budget`;
left out, the budget is set halfway between the forecast peaks without and with `all` (for the first strategy), so
that auto has to choose some layers; its verdict: the measured peak (states + activations) fits the budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> None:
    args = {"model": "yolov8x.yaml", "imgsz": "640", "nproc": "2", "batch": "4", "strategies": "ddp",
            "modes": "backbone,all,auto", "steps": "3", "optimizer": "SGD", "budget": ""}
    args.update(a.split("=", 1) for a in argv)
    budget = args["budget"] or f"{_halfway(args)}B"
    with tempfile.TemporaryDirectory(prefix="pyolo-recompute-") as work:
        command = [sys.executable, "-m", "parallel_yolo", "compare", f"model={args['model']}",
                   f"strategies={args['strategies']}", f"activation_checkpointing=none,{args['modes']}",
                   f"nproc={args['nproc']}", f"imgsz={args['imgsz']}", f"batch={args['batch']}",
                   f"steps={args['steps']}", f"optimizer={args['optimizer']}", f"budget={budget}",
                   f"project={work}", "name=run"]
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
        report = json.loads((Path(work) / "run" / "compare.json").read_text())
    rows = {s["strategy"]: s for s in report["summary"]}
    print(f"\n{report['device']}; {args['model']}, imgsz {args['imgsz']}, global batch {args['batch']} on "
          f"{args['nproc']} processes, {args['optimizer']}, fp32; budget {int(_size(budget)) / 2**20:.0f} MiB")
    for name in args["strategies"].split(","):
        plain = rows[name]
        print(f"{name}: activations {plain['activations_MiB']:.0f} MiB (forecast "
              f"{plain['forecast_activations_MiB']:.0f}), step {plain['step_s']:.2f} s, "
              f"largest batch per GPU {plain['max_batch_per_gpu']}")
        for mode in args["modes"].split(","):
            row = rows[f"{name}+{mode}"]
            memory = row["activations_MiB"] / plain["activations_MiB"]
            time = row["step_s"] / plain["step_s"]
            verdict = {"all": "met" if memory <= 0.4 and time <= 1.35 else "MISSED",
                       "auto": f"peak {row['peak_MiB']:.0f} MiB: " + (
                           "fits" if row["peak_MiB"] * 2**20 <= _size(budget) else "OVER")}.get(mode, "-")
            print(f"{name}+{mode}: activations {row['activations_MiB']:.0f} MiB (forecast "
                  f"{row['forecast_activations_MiB']:.0f}) = {memory:.2f}x, step {row['step_s']:.2f} s = {time:.2f}x, "
                  f"largest batch per GPU {row['max_batch_per_gpu']}  {verdict}")


def _size(text: str) -> int:
    from parallel_yolo.config import size_bytes

    return size_bytes("budget", text)


def _halfway(args: dict[str, str]) -> int:
    """States plus activations of the images per rank, halfway between no recompute and `all` (the forecast)."""
    from parallel_yolo.config import TrainConfig
    from parallel_yolo.engine import recompute
    from parallel_yolo.monitor import memory
    from parallel_yolo.strategies import REGISTRY
    from parallel_yolo.tasks import yolo

    model = yolo.build_model(args["model"], nc=80, names={i: str(i) for i in range(80)},
                             hyp=yolo.hyp_namespace(TrainConfig()))
    strategy = REGISTRY[args["strategies"].split(",")[0]]
    world = int(args["nproc"])
    numel = sum(p.numel() for p in model.parameters())
    states = sum(memory.formula(numel=numel, world_size=world, sharded=strategy.sharded, master=strategy.master_copy,
                                optimizer=args["optimizer"]).values())
    profiled = recompute.profile(model.train(), int(args["imgsz"]))
    images = int(args["batch"]) // world
    none, every = (profiled.activation_bytes(layers) for layers in ([], profiled.candidates))
    return states + images * (none + every) // 2


if __name__ == "__main__":
    main(sys.argv[1:])
