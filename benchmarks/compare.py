"""Issue targets for `parallel-yolo compare`, measured side by side in one run and printed as ratios.

    python benchmarks/compare.py [model=yolov8x.yaml] [nprocs=2,4] [imgsz=320] [batch=4] [steps=5] [optimizer=SGD]

For each process count it runs `parallel-yolo compare` over ddp, zero1, zero2, zero3 and fsdp (each strategy in
fresh processes), prints its table, then checks:
- model-state bytes within +-2% of the formula, every strategy and rank;
- peak memory above baseline of zero3 and fsdp <= 0.75x DDP's (at the first process count);
- bytes sent per step: zero1/zero2 within +-2% of DDP's, zero3/fsdp <= 1.5x;
- step time: zero1/zero2 <= 1.1x DDP, zero3/fsdp <= 1.3x (at the first process count).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> None:
    args = {"model": "yolov8x.yaml", "nprocs": "2,4", "imgsz": "320", "batch": "4", "steps": "5", "optimizer": "SGD"}
    args.update(a.split("=", 1) for a in argv)
    with tempfile.TemporaryDirectory(prefix="pyolo-compare-") as work:
        measure(args, Path(work))


def measure(args: dict[str, str], work: Path) -> None:
    checks = []
    for i, nproc in enumerate(args["nprocs"].split(",")):
        command = [sys.executable, "-m", "parallel_yolo", "compare", f"model={args['model']}",
                   "strategies=ddp,zero1,zero2,zero3,fsdp", f"nproc={nproc}", f"imgsz={args['imgsz']}",
                   f"batch={args['batch']}", f"steps={args['steps']}", f"optimizer={args['optimizer']}",
                   f"project={work}", f"name=n{nproc}"]
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
        report = json.loads((work / f"n{nproc}" / "compare.json").read_text())
        summary = {s["strategy"]: s for s in report["summary"]}
        worst = max(abs(sum(r["states"].values()) / sum(r["formula"].values()) - 1)
                    for entry in report["ranks"] for r in entry["ranks"])
        checks.append((f"x{nproc} model states vs formula, worst rank", f"{100 * worst:.2f}%", worst <= 0.02))
        for name in ("zero1", "zero2"):
            ratio = summary[name]["sent_vs_ddp"]
            checks.append((f"x{nproc} {name} bytes sent / ddp", f"{ratio:.3f}", abs(ratio - 1) <= 0.02))
        for name in ("zero3", "fsdp"):
            ratio = summary[name]["sent_vs_ddp"]
            checks.append((f"x{nproc} {name} bytes sent / ddp", f"{ratio:.3f}", ratio <= 1.5 * 1.02))
        if i == 0:
            for name in ("zero3", "fsdp"):
                ratio = summary[name]["peak_vs_ddp"]
                checks.append((f"x{nproc} {name} peak / ddp", f"{ratio:.2f}", ratio <= 0.75))
            for name, bound in (("zero1", 1.1), ("zero2", 1.1), ("zero3", 1.3), ("fsdp", 1.3)):
                ratio = summary[name]["step_vs_ddp"]
                checks.append((f"x{nproc} {name} step time / ddp", f"{ratio:.2f}", ratio <= bound))
    print(f"\n{report['device']}; {args['model']}, imgsz {args['imgsz']}, global batch {args['batch']}, "
          f"{args['optimizer']}, fp32")
    for what, value, ok in checks:
        print(f"{what:<44}{value:>10}  {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main(sys.argv[1:])
