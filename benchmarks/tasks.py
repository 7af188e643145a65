"""Every task's main metric after the same short recipe: `parallel-yolo train` sharded on 2 processes against
Ultralytics' own trainer in one process, on the same generated demo data and seeds, side by side.

    python benchmarks/tasks.py                      # every task, the demo recipe (15 epochs, 256 images), 1 seed
    python benchmarks/tasks.py tasks=segment,pose epochs=3 seeds=2

Per task and seed it prints one JSON line with both main metrics (ultralytics.cfg.TASK2METRIC: mask mAP50-95,
pose mAP50-95, OBB mAP50-95, top-1, mIoU, depth delta1); the summary gives per task the mean of each over the seeds
and the spread of Ultralytics' own over the seeds (the noise the difference is measured against). Both use the demo's
recipe (configs/train/demo.yaml: batch 16, nbs 16, 128 px, close_mosaic 4, optimizer auto, which both resolve to the
same optimizer), validate once at the end, plots off.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {"detect": "yolov8n.yaml", "segment": "yolov8n-seg.yaml", "pose": "yolov8n-pose.yaml",
          "obb": "yolov8n-obb.yaml", "classify": "yolov8n-cls.yaml", "semantic": "yolo26n-sem.yaml",
          "depth": "yolo26n-depth.yaml"}
ULTRALYTICS = """
import sys
from ultralytics import YOLO
model, data, epochs, imgsz, seed, out = sys.argv[1:]
YOLO(model).train(data=data, epochs=int(epochs), batch=16, nbs=16, imgsz=int(imgsz), close_mosaic=4, workers=1,
                  device="cpu", project=out, name="ultralytics", exist_ok=True, plots=False, verbose=False,
                  seed=int(seed), deterministic=True, amp=False, val=False)
"""


def _last_metric(results_csv: Path, key: str) -> float:
    with open(results_csv, newline="") as f:
        rows = [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    if key not in rows[-1]:
        raise SystemExit(f"{results_csv}: no column {key}; its columns: {list(rows[-1])}")
    return float(rows[-1][key])


def main(argv: list[str]) -> None:
    args = {"tasks": ",".join(MODELS), "epochs": "15", "images": "256", "imgsz": "128", "seeds": "1",
            "strategy": "zero2"}
    args.update(a.split("=", 1) for a in argv)
    from ultralytics.cfg import TASK2METRIC

    from parallel_yolo.data.demo import demo_dataset

    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False"}
    summary = {}
    for task in args["tasks"].split(","):
        n = int(args["images"])
        data = str(demo_dataset(task, n_train=n, n_val=n // 4))
        key, pairs = TASK2METRIC[task], []
        for seed in range(int(args["seeds"])):
            with tempfile.TemporaryDirectory() as out:
                ours = [sys.executable, "-m", "parallel_yolo", "train", f"model={MODELS[task]}", f"data={data}",
                        f"epochs={args['epochs']}", "batch=16", "nbs=16", f"imgsz={args['imgsz']}", "close_mosaic=4",
                        "workers=1", "val=false", "plots=false", f"seed={seed}", f"project={out}", "name=ours",
                        "nproc=2", f"strategy={args['strategy']}"]
                theirs = [sys.executable, "-c", ULTRALYTICS, MODELS[task], data, args["epochs"], args["imgsz"],
                          str(seed), out]
                for name, command in (("parallel_yolo", ours), ("ultralytics", theirs)):
                    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=out)
                    if result.returncode:
                        raise SystemExit(f"{task} {name} failed:\n{result.stderr[-3000:]}")
                pair = (_last_metric(Path(out) / "ours" / "results.csv", key),
                        _last_metric(Path(out) / "ultralytics" / "results.csv", key))
            pairs.append(pair)
            print(json.dumps({"task": task, "seed": seed, "metric": key, "parallel_yolo": round(pair[0], 4),
                              "ultralytics": round(pair[1], 4)}), flush=True)
        ours_mean, theirs_mean = (statistics.mean(p[i] for p in pairs) for i in (0, 1))
        spread = max(p[1] for p in pairs) - min(p[1] for p in pairs)
        summary[task] = {"metric": key, "parallel_yolo": round(ours_mean, 4), "ultralytics": round(theirs_mean, 4),
                         "difference": round(ours_mean - theirs_mean, 4), "ultralytics_seed_spread": round(spread, 4)}
    print(json.dumps({"summary": {**args, "tasks": summary}}))


if __name__ == "__main__":
    main(sys.argv[1:])
