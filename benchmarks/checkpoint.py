"""Sharded checkpoint save and load time and size on disk, per strategy, side by side in one run.

    python benchmarks/checkpoint.py [model=yolov8x.yaml] [nproc=2] [imgsz=320] [batch=4] [strategies=ddp,zero1,...]

Each strategy trains one optimizer step (SGD, so the optimizer state is one momentum buffer per parameter) and
saves weights/last; a second run resumes from it, under the same strategy, and takes one more step. Save time is
what the trainer reports for the first checkpoint (every rank writing its files, sha256 included, manifest,
rename); load time is the slowest rank's read of its ranges; size is the checkpoint folder on disk.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from parallel_yolo.data.demo import demo_dataset


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


def _run(args: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "parallel_yolo", "train", *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return result.stdout


def main(argv: list[str]) -> None:
    args = {"model": "yolov8x.yaml", "nproc": "2", "imgsz": "320", "batch": "4",
            "strategies": "ddp,zero1,zero2,zero3,fsdp"}
    args.update(a.split("=", 1) for a in argv)
    with tempfile.TemporaryDirectory(prefix="pyolo-ckpt-") as work:  # gigabytes of yolov8x checkpoints: removed
        measure(args, Path(work))


def measure(args: dict[str, str], work: Path) -> None:
    data = tiny_val_data(work / "data")
    print(f"{args['model']}  nproc={args['nproc']}  imgsz={args['imgsz']}  SGD fp32, CPU")
    print(f"{'strategy':<14}{'save (s)':>10}{'load (s)':>10}{'size (MiB)':>12}{'files':>7}")
    for strategy in args["strategies"].split(","):
        common = [f"nproc={args['nproc']}", f"strategy={strategy}"]
        out = _run([f"model={args['model']}", f"data={data}", f"imgsz={args['imgsz']}", f"batch={args['batch']}",
                    f"nbs={args['batch']}", "epochs=1", "max_steps=1", "optimizer=SGD", "workers=0", "val=false",
                    f"project={work}", f"name={strategy}", *common])
        saved = float(re.search(r"saved \S+/weights/last in ([\d.]+)s", out).group(1))
        out = _run([f"resume={work / strategy}", "max_steps=2", *common])
        loaded = float(re.search(r"loaded in ([\d.]+)s", out).group(1))
        files = list((work / strategy / "weights" / "last").iterdir())
        size = sum(f.stat().st_size for f in files) / 2**20
        print(f"{strategy:<14}{saved:10.2f}{loaded:10.2f}{size:12.1f}{len(files):7d}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
