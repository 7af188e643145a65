"""One process on this machine: `parallel-yolo train` against Ultralytics' own trainer, same data and settings,
measured side by side (alternating, each in a fresh process, whole command wall time).

    python benchmarks/vs_ultralytics.py                       # yolov8n, 192 images of 160 px, 15 epochs, batch 16
    python benchmarks/vs_ultralytics.py epochs=3 rounds=1     # a quick look

Prints one JSON line per run and a summary with the ratio ours / Ultralytics (median over rounds). Both validate
every epoch and save a checkpoint every epoch, as their defaults do; plots are off for both (they need a font
download). `workers` is passed to both; Ultralytics uses none on CPU whatever it is given.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ULTRALYTICS = """
import sys
from ultralytics import YOLO
model, data, epochs, batch, imgsz, workers, out = sys.argv[1:]
YOLO(model).train(data=data, epochs=int(epochs), batch=int(batch), imgsz=int(imgsz), workers=int(workers),
                  device="cpu", project=out, name="ultralytics", exist_ok=True, plots=False, verbose=False, seed=0,
                  deterministic=True, amp=False)
"""


def main(argv: list[str]) -> None:
    args = {"model": "yolov8n.yaml", "epochs": "15", "batch": "16", "imgsz": "160", "workers": "2", "rounds": "2",
            "images": "192"}
    args.update(a.split("=", 1) for a in argv)
    from parallel_yolo.data.demo import demo_dataset

    data = str(demo_dataset(n_train=int(args["images"]), n_val=int(args["images"]) // 4, size=int(args["imgsz"])))
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False"}
    common = [args["model"], data, args["epochs"], args["batch"], args["imgsz"], args["workers"]]
    times: dict[str, list[float]] = {"parallel_yolo": [], "ultralytics": []}
    with tempfile.TemporaryDirectory() as out:
        commands = {
            "parallel_yolo": [sys.executable, "-m", "parallel_yolo", "train", f"model={args['model']}", f"data={data}",
                              f"epochs={args['epochs']}", f"batch={args['batch']}", f"imgsz={args['imgsz']}",
                              f"workers={args['workers']}", "device=cpu", f"project={out}", "name=ours",
                              "exist_ok=true", "seed=0"],
            "ultralytics": [sys.executable, "-c", ULTRALYTICS, *common, out],
        }
        for _ in range(int(args["rounds"])):
            for name, command in commands.items():
                start = time.perf_counter()
                result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=out)
                elapsed = time.perf_counter() - start
                if result.returncode:
                    raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
                times[name].append(elapsed)
                print(json.dumps({"run": name, "wall_s": round(elapsed, 2)}), flush=True)
    ours, theirs = (statistics.median(times[k]) for k in ("parallel_yolo", "ultralytics"))
    print(json.dumps({"summary": {**args, "parallel_yolo_s": round(ours, 2), "ultralytics_s": round(theirs, 2),
                                  "ratio": round(ours / theirs, 3)}}))


if __name__ == "__main__":
    main(sys.argv[1:])
