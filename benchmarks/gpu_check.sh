#!/usr/bin/env bash
# One-GPU speed check (H100 / H200), under 8 minutes: YOLOv8x bf16-mixed training images/s and MFU for
# single, fsdp (1 rank) and zero2 (1 rank), plain / channels_last / channels_last + torch.compile, and
# Ultralytics' own trainer (AMP) on the same card and batch as the reference. Writes $OUT/gpu_check.json
# (OUT defaults to the current folder) and prints it.
#
#   bash benchmarks/gpu_check.sh                      # yolov8x, 640 px, batch 32
#   MODEL=yolov8n.yaml IMGSZ=64 BATCH=4 STEPS=3 VARIANTS="plain" bash benchmarks/gpu_check.sh   # a CPU smoke run
#
# Images/s are from the median step of `parallel-yolo compare` (synthetic batch, no data loading) and from the
# median iteration of Ultralytics' trainer (its callbacks, the first 3 iterations dropped). MFU = images/s x
# 3 x 257.8 GFLOP (forward + backward of YOLOv8x at 640 px, scaled by (IMGSZ/640)^2 for other sizes) / peak, the
# card's dense bf16 peak (H100 SXM / H200: 989.4 TFLOPS; override with PEAK_TFLOPS).
set -uo pipefail
MODEL=${MODEL:-yolov8x.yaml}
IMGSZ=${IMGSZ:-640}
BATCH=${BATCH:-32}
STEPS=${STEPS:-8}
VARIANTS=${VARIANTS:-"plain channels_last channels_last+compile"}
OUT=${OUT:-.}
WORK=$(mktemp -d)
export YOLO_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"

for variant in $VARIANTS; do
  flags=()
  [[ $variant == *channels_last* ]] && flags+=(channels_last=true)
  [[ $variant == *compile* ]] && flags+=(compile=true)
  timeout 300 python -m parallel_yolo compare model="$MODEL" strategies=single,fsdp,zero2 nproc=1 imgsz="$IMGSZ" \
    batch="$BATCH" steps="$STEPS" precision=bf16-mixed optimizer=SGD "${flags[@]}" project="$WORK" \
    name="$variant" > "$WORK/$variant.log" 2>&1 || echo "compare $variant failed: see $WORK/$variant.log" >&2
done

timeout 240 python - "$MODEL" "$IMGSZ" "$BATCH" "$WORK" <<'PY' > "$WORK/ultralytics.json" 2> "$WORK/ultralytics.log" \
  || echo "ultralytics reference failed: see $WORK/ultralytics.log" >&2
import json, statistics, sys, time
from ultralytics import YOLO
from parallel_yolo.data import demo_dataset
model, imgsz, batch, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ticks = []
yolo = YOLO(model)
yolo.add_callback("on_train_batch_end", lambda trainer: ticks.append(time.perf_counter()))
yolo.train(data=str(demo_dataset()), epochs=1, imgsz=imgsz, batch=batch, val=False, plots=False, amp=True,
           workers=8, project=work, name="ultralytics", exist_ok=True, verbose=False)
steps = [b - a for a, b in zip(ticks[3:], ticks[4:])]
print(json.dumps({"images_per_s": batch / statistics.median(steps) if steps else None, "iterations": len(ticks)}))
PY

python - "$MODEL" "$IMGSZ" "$BATCH" "$WORK" "$OUT/gpu_check.json" $VARIANTS <<'PY'
import json, os, sys
from pathlib import Path
import torch
model, imgsz, batch, work, out, variants = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5], sys.argv[6:]
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
peak = float(os.environ.get("PEAK_TFLOPS", 756.0 if "PCIe" in name else 989.4 if ("H100" in name or "H200" in name) else 0)) * 1e12
flops_per_image = 3 * 257.8e9 * (imgsz / 640) ** 2
def mfu(images_per_s):
    return None if not (images_per_s and peak) else images_per_s * flops_per_image / peak
rows = []
for variant in variants:
    report = work / variant / "compare.json"
    if not report.exists():
        rows.append({"variant": variant, "error": f"see {work / (variant + '.log')}"})
        continue
    for s in json.loads(report.read_text())["summary"]:
        rows.append({"variant": variant, "strategy": s["strategy"], "images_per_s": s["images_per_s"],
                     "step_s": s["step_s"], "peak_MiB": s["peak_MiB"], "mfu": mfu(s["images_per_s"])})
reference = work / "ultralytics.json"
ultra = json.loads(reference.read_text()) if reference.exists() and reference.stat().st_size else {}
result = {"device": name, "model": model, "imgsz": imgsz, "batch": batch, "precision": "bf16-mixed",
          "peak_tflops": peak / 1e12, "gflop_per_image": flops_per_image / 1e9, "runs": rows,
          "ultralytics": {**ultra, "mfu": mfu(ultra.get("images_per_s"))}}
Path(out).write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
PY
