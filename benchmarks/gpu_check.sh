#!/usr/bin/env bash
# One-GPU check of the real multi-GPU path (H100 / H200), under 8 minutes:
#  1. `parallel-yolo train` under `torchrun --nproc_per_node 1`: a process group on NCCL, so every collective of an
#     8-GPU run is made (the loss window, the grad norm, DDP's buckets, ZeRO's and FSDP's gathers and reductions,
#     EMA and checkpoint collectives), on a 640-px dataset generated here, through the real mosaic pipeline, in the
#     GPU defaults (bf16-mixed, channels_last, pinned memory, persistent workers): ddp, zero2, fsdp.
#  2. `parallel-yolo compare` for the same strategies (the trainer's own step on a synthetic batch).
#  3. Ultralytics' own trainer (AMP) on the same card, data and batch, as the reference.
# Prints, and writes to $OUT/gpu_check.json (OUT defaults to the current folder): images/s (median step), MFU,
# data-wait fraction and peak memory per run.
#
#   bash benchmarks/gpu_check.sh                     # yolov8x, 640 px, batch 32, 1024 images
#   MODEL=yolov8n.yaml IMGSZ=64 BATCH=4 IMAGES=16 STRATEGIES=ddp bash benchmarks/gpu_check.sh   # a CPU smoke run
#
# MFU = images/s x 3 x 257.8 GFLOP (forward + backward of YOLOv8x at 640 px; scaled by (IMGSZ/640)^2) / the card's
# dense bf16 peak (H100 SXM / H200: 989.4 TFLOPS, H100 PCIe 756; override with PEAK_TFLOPS).
set -uo pipefail
MODEL=${MODEL:-yolov8x.yaml}
IMGSZ=${IMGSZ:-640}
BATCH=${BATCH:-32}
IMAGES=${IMAGES:-1024}
STEPS=${STEPS:-8}
STRATEGIES=${STRATEGIES:-"ddp zero2 fsdp"}
OUT=${OUT:-.}
WORK=$(mktemp -d)
export YOLO_OFFLINE=1 PYTHONUNBUFFERED=1 PARALLEL_YOLO_CACHE="$WORK/cache"
mkdir -p "$OUT"

DATA=$(python -c "from parallel_yolo.data.demo import demo_dataset; print(demo_dataset(n_train=$IMAGES, n_val=64, size=$IMGSZ))") \
  || { echo "dataset generation failed" >&2; exit 1; }

for strategy in $STRATEGIES; do
  timeout 240 torchrun --standalone --nproc_per_node 1 -m parallel_yolo train model="$MODEL" data="$DATA" \
    imgsz="$IMGSZ" batch="$BATCH" epochs=1 close_mosaic=0 val=false strategy="$strategy" project="$WORK/train" \
    name="$strategy" > "$WORK/train_$strategy.log" 2>&1 || echo "train $strategy failed: see $WORK/train_$strategy.log" >&2
done

timeout 200 python -m parallel_yolo compare model="$MODEL" strategies="$(echo $STRATEGIES | tr ' ' ,)" nproc=1 \
  imgsz="$IMGSZ" batch="$BATCH" steps="$STEPS" precision=bf16-mixed optimizer=SGD channels_last=true \
  project="$WORK" name=compare > "$WORK/compare.log" 2>&1 || echo "compare failed: see $WORK/compare.log" >&2

timeout 200 python - "$MODEL" "$IMGSZ" "$BATCH" "$WORK" "$DATA" <<'PY' > "$WORK/ultralytics.json" 2> "$WORK/ultralytics.log" \
  || echo "ultralytics reference failed: see $WORK/ultralytics.log" >&2
import json, statistics, sys, time
import torch
from ultralytics import YOLO
model, imgsz, batch, work, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
ticks = []
yolo = YOLO(model)
yolo.add_callback("on_train_batch_end", lambda trainer: ticks.append(time.perf_counter()))
yolo.train(data=data, epochs=1, imgsz=imgsz, batch=batch, val=False, plots=False, amp=True, workers=8,
           close_mosaic=0, project=work, name="ultralytics", exist_ok=True, verbose=False)
steps = [b - a for a, b in zip(ticks[3:], ticks[4:])]
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print(json.dumps({"images_per_s": batch / statistics.median(steps) if steps else None, "iterations": len(ticks),
                  "peak_MiB": peak / 2**20 if peak else None}))
PY

python - "$MODEL" "$IMGSZ" "$BATCH" "$WORK" "$OUT/gpu_check.json" $STRATEGIES <<'PY'
import csv, json, os, statistics, sys
from pathlib import Path
import torch
model, imgsz, batch, work, out, strategies = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5], sys.argv[6:]
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
peak = float(os.environ.get("PEAK_TFLOPS", 756.0 if "PCIe" in name else 989.4 if ("H100" in name or "H200" in name) else 0)) * 1e12
flops_per_image = 3 * 257.8e9 * (imgsz / 640) ** 2
def mfu(images_per_s):
    return None if not (images_per_s and peak) else images_per_s * flops_per_image / peak
train = []
for strategy in strategies:
    folder = work / "train" / strategy
    if not (folder / "steps.csv").exists():
        train.append({"strategy": strategy, "error": f"see {work / f'train_{strategy}.log'}"})
        continue
    rows = list(csv.DictReader(open(folder / "steps.csv")))
    steady = rows[2:] or rows  # the first steps include cuDNN's autotuning and the allocator's growth
    rate = statistics.median(float(r["images_per_s"]) for r in steady)
    waited, total = sum(float(r["data_s"]) for r in steady), sum(float(r["step_s"]) for r in steady)
    ranks = json.loads((folder / "memory.json").read_text())["ranks"]
    peak = max(r.get("peak_allocated_bytes", r.get("peak_above_baseline_bytes", 0)) for r in ranks)
    args = (folder / "args.yaml").read_text()
    train.append({"strategy": strategy, "images_per_s": rate, "mfu": mfu(rate), "steps": len(rows),
                  "data_wait_fraction": waited / total if total else None, "peak_MiB": peak / 2**20,
                  "precision": next((l.split(": ", 1)[1] for l in args.splitlines() if l.startswith("precision:")), None)})
compare = []
report = work / "compare" / "compare.json"
if report.exists():
    for s in json.loads(report.read_text())["summary"]:
        compare.append({"strategy": s["strategy"], "images_per_s": s["images_per_s"], "step_s": s["step_s"],
                        "peak_MiB": s["peak_MiB"], "mfu": mfu(s["images_per_s"])})
else:
    compare.append({"error": f"see {work / 'compare.log'}"})
reference = work / "ultralytics.json"
ultra = json.loads(reference.read_text()) if reference.exists() and reference.stat().st_size else {"error": f"see {work / 'ultralytics.log'}"}
result = {"device": name, "model": model, "imgsz": imgsz, "batch": batch, "peak_tflops": peak / 1e12,
          "gflop_per_image": flops_per_image / 1e9, "train_torchrun_1gpu": train, "compare": compare,
          "ultralytics": {**ultra, "mfu": mfu(ultra.get("images_per_s"))}}
Path(out).write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
PY
