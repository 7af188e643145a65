"""Per-rank memory of real training steps, per strategy, side by side in one run.

    python benchmarks/memory.py [model=yolov8x.yaml] [nproc=2] [imgsz=320] [batch=4] [steps=3] [strategies=ddp,zero1,...]

Each strategy trains `steps` optimizer steps (SGD) on the demo data through the normal CLI; its memory.json gives,
per rank, the bytes held by category (unique storages) and the peak resident memory above the baseline taken
before the model was built (CPU; CUDA peak on GPU). The final validation runs on a 2-image split so that it
does not dominate the time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from parallel_yolo.data import demo_dataset


def tiny_val_data(folder: Path) -> Path:
    demo = demo_dataset().parent
    for sub in ("images", "labels"):
        (folder / sub / "val").mkdir(parents=True)
        for f in sorted((demo / sub / "val").iterdir())[:2]:
            (folder / sub / "val" / f.name).symlink_to(f)
    (folder / "images" / "train").symlink_to(demo / "images" / "train")
    (folder / "labels" / "train").symlink_to(demo / "labels" / "train")
    names = (demo / "data.yaml").read_text().split("names:")[1]
    (folder / "data.yaml").write_text(f"path: {folder}\ntrain: images/train\nval: images/val\nnames:{names}")
    return folder / "data.yaml"


def main(argv: list[str]) -> None:
    args = {"model": "yolov8x.yaml", "nproc": "2", "imgsz": "320", "batch": "4", "steps": "3",
            "strategies": "ddp,zero1,zero2,zero3,fsdp"}
    args.update(a.split("=", 1) for a in argv)
    work = Path(tempfile.mkdtemp(prefix="pyolo-mem-"))
    data = tiny_val_data(work / "data")
    rows = []
    for strategy in args["strategies"].split(","):
        command = [sys.executable, "-m", "parallel_yolo", "train", f"model={args['model']}", f"data={data}",
                   f"imgsz={args['imgsz']}", f"batch={args['batch']}", f"nbs={args['batch']}", "epochs=1",
                   f"max_steps={args['steps']}", "optimizer=SGD", "workers=0", "val=false", f"nproc={args['nproc']}",
                   f"strategy={strategy}", f"project={work}", f"name={strategy}"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        report = json.loads((work / strategy / "memory.json").read_text())
        rows.append((strategy, report["ranks"]))
    mib = 2**20
    ddp_peak = max(r["peak_above_baseline_bytes"] for r in dict(rows).get("ddp", rows[0][1]))
    print(f"{args['model']}  nproc={args['nproc']}  imgsz={args['imgsz']}  batch={args['batch']} (global)  "
          f"SGD fp32, CPU; MiB per rank (max over ranks)")
    print(f"{'strategy':<14}{'params':>9}{'grads':>9}{'optim':>9}{'ema':>9}{'peak-base':>11}{'vs ddp':>8}")
    for strategy, ranks in rows:
        worst = {k: max(r[k] for r in ranks) for k in ranks[0]}
        print(f"{strategy:<14}{worst['params_bytes'] / mib:9.1f}{worst['grads_bytes'] / mib:9.1f}"
              f"{worst['optimizer_state_bytes'] / mib:9.1f}{worst['ema_bytes'] / mib:9.1f}"
              f"{worst['peak_above_baseline_bytes'] / mib:11.1f}{worst['peak_above_baseline_bytes'] / ddp_peak:8.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
