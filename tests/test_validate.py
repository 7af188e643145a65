"""`parallel-yolo val` on a checkpoint reports what the trainer reported when it saved it, on 1 or 2 processes."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, check, read_csv, run_cli

KEYS = ("metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)",
        "val/box_loss", "val/cls_loss", "val/dfl_loss")


@pytest.mark.slow
def test_val_checkpoint_matches_training_validation(workdir):
    check(run_cli("train", *TINY, "batch=16", "max_steps=6", "nbs=16", "project=runs", "name=run", cwd=workdir))
    trained = read_csv(workdir / "runs" / "run" / "results.csv")[-1]
    assert float(trained["val/box_loss"]) > 0
    # training validated 32 images per pass (twice the train batch): the val batch is global, so 64 on 2 ranks
    for name, extra in (("one", ["batch=32"]), ("two", ["nproc=2", "batch=64"])):
        check(run_cli("val", "checkpoint=runs/run/weights/last", "project=runs", f"name={name}", *extra,
                      cwd=workdir))
        reported = json.loads((workdir / "runs" / name / "val.json").read_text())
        for key in KEYS:
            assert reported[key] == pytest.approx(float(trained[key]), rel=1e-4, abs=1e-5), (name, key)
