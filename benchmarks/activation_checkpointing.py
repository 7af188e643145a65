"""Issue 17's activation-checkpointing targets, measured side by side in one `parallel-yolo compare` run and printed
as ratios:

    python benchmarks/activation_checkpointing.py [model=yolov8x.yaml] [imgsz=640] [nproc=2] [batch=4]
        [strategies=ddp] [modes=backbone,all] [steps=3] [optimizer=SGD]

Every strategy is measured without checkpointing and with each mode (fresh processes each), then per strategy and
mode: activation memory (peak above baseline minus model states, worst rank) and median step time, each over the
same strategy without checkpointing. Targets for `all`: activations <= 0.4x, step time <= 1.35x. Also printed: the
largest per-GPU batch under the budget (80 GiB) each way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> None:
    args = {"model": "yolov8x.yaml", "imgsz": "640", "nproc": "2", "batch": "4", "strategies": "ddp",
            "modes": "backbone,all", "steps": "3", "optimizer": "SGD"}
    args.update(a.split("=", 1) for a in argv)
    with tempfile.TemporaryDirectory(prefix="pyolo-recompute-") as work:
        command = [sys.executable, "-m", "parallel_yolo", "compare", f"model={args['model']}",
                   f"strategies={args['strategies']}", f"activation_checkpointing=none,{args['modes']}",
                   f"nproc={args['nproc']}", f"imgsz={args['imgsz']}", f"batch={args['batch']}",
                   f"steps={args['steps']}", f"optimizer={args['optimizer']}", f"project={work}", "name=run"]
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
        report = json.loads((Path(work) / "run" / "compare.json").read_text())
    rows = {s["strategy"]: s for s in report["summary"]}
    print(f"\n{report['device']}; {args['model']}, imgsz {args['imgsz']}, global batch {args['batch']} on "
          f"{args['nproc']} processes, {args['optimizer']}, fp32")
    for name in args["strategies"].split(","):
        plain = rows[name]
        print(f"{name}: activations {plain['activations_MiB']:.0f} MiB, step {plain['step_s']:.2f} s, "
              f"largest batch per GPU {plain['max_batch_per_gpu']}")
        for mode in args["modes"].split(","):
            row = rows[f"{name}+{mode}"]
            memory = row["activations_MiB"] / plain["activations_MiB"]
            time = row["step_s"] / plain["step_s"]
            verdict = ("met" if memory <= 0.4 and time <= 1.35 else "MISSED") if mode == "all" else "-"
            print(f"{name}+{mode}: activations {row['activations_MiB']:.0f} MiB = {memory:.2f}x, step "
                  f"{row['step_s']:.2f} s = {time:.2f}x, largest batch per GPU {row['max_batch_per_gpu']}  {verdict}")


if __name__ == "__main__":
    main(sys.argv[1:])
