"""Every task's sharded checkpoints: a resumed run ends bit-identical to the run it resumes, a checkpoint written by
ZeRO-3 on 2 processes resumes under FSDP on 1, consolidates to a .pt that Ultralytics' own YOLO(pt).val() and
predict() take for that task, and `val checkpoint=` from the shards gives the same metrics as Ultralytics on the .pt."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NO_AUGMENT, check, load_weights, run_cli

MODELS = {"segment": "yolov8n-seg.yaml", "pose": "yolov8n-pose.yaml", "obb": "yolov8n-obb.yaml",
          "classify": "yolov8n-cls.yaml", "semantic": "yolo26n-sem.yaml", "depth": "yolo26n-depth.yaml"}
COMMON = ["data=demo", "imgsz=64", "epochs=1", "workers=0", "seed=0", "plots=false", *NO_AUGMENT, "batch=8", "nbs=8",
          "optimizer=SGD", "lr0=0.01", "val=false", "project=runs"]
# pose by default (its keypoint shape travels in the checkpoint and the .pt); the others when the suite's time allows
CASES = [task if task == "pose" else pytest.param(task, marks=pytest.mark.extended) for task in MODELS]


def _metrics(results) -> dict[str, float]:
    """Ultralytics' metrics object of a task as the flat dict our val.json holds (its `results_dict`)."""
    return {k: float(v) for k, v in results.results_dict.items() if k.startswith("metrics/")}


@pytest.mark.slow
@pytest.mark.parametrize("task", CASES)
def test_task_checkpoint_resumes_reshards_consolidates_and_validates(task, workdir):
    model = f"model={MODELS[task]}"
    # 3 steps straight on zero3 x2, a checkpoint after each; then the same run resumed from step 2
    check(run_cli("train", *COMMON, model, "strategy=zero3", "nproc=2", "max_steps=3", "ckpt_every=1",
                  "name=straight", cwd=workdir))
    straight = workdir / "runs" / "straight"
    first = load_weights(straight / "weights" / "last")
    check(run_cli("train", *COMMON, model, "strategy=zero3", "nproc=2", "max_steps=3",
                  f"resume={straight}/checkpoints/step_2", cwd=workdir))  # goes on in its run folder
    again = load_weights(straight / "weights" / "last")
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)
    # resharded: the step-2 checkpoint of 2 ZeRO-3 ranks, one FSDP process, one more step, then the final validation
    check(run_cli("train", *COMMON, model, "strategy=fsdp", "nproc=1", "max_steps=3",
                  f"resume={straight}/checkpoints/step_2", cwd=workdir))
    last = straight / "weights" / "last"
    manifest = json.loads((last / "manifest.json").read_text())
    assert manifest["task"] == task and manifest["strategy"] == "fsdp" and manifest["step"] == 3
    check(run_cli("consolidate", f"checkpoint={last}", "out=model.pt", cwd=workdir))
    check(run_cli("val", f"checkpoint={last}", "batch=16", "name=val", "project=vals", cwd=workdir))
    ours = {k: v for k, v in json.loads((workdir / "vals" / "val" / "val.json").read_text()).items()
            if k.startswith("metrics/")}
    from ultralytics import YOLO

    yolo = YOLO(str(workdir / "model.pt"))
    assert yolo.task == task
    theirs = _metrics(yolo.val(imgsz=64, batch=16, plots=False, verbose=False, project=str(workdir / "u"),
                                     name="val", exist_ok=True, workers=0))
    assert ours.keys() == theirs.keys() and ours, (ours, theirs)
    # the same numbers; ours as Ultralytics' training-time validation reports them, rounded to 5 decimals
    differ = {k: (ours[k], theirs[k]) for k in ours if abs(ours[k] - theirs[k]) > 5e-6 + 1e-9}
    assert not differ, differ
    from parallel_yolo.data.demo import demo_dataset

    made = demo_dataset(task)
    image = next(p for p in sorted((made if made.is_dir() else made.parent).rglob("*.png"))
                 if "images" in p.parts or task == "classify")
    predicted = yolo.predict(str(image), imgsz=64, verbose=False)
    assert len(predicted) == 1
