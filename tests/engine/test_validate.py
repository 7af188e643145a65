"""`parallel-yolo val` on a checkpoint reports what the trainer reported when it saved it, on 1 or 2 processes."""

from __future__ import annotations

import json

import pytest
from conftest import check, read_csv, run_cli

KEYS = ("metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)",
        "val/box_loss", "val/cls_loss", "val/dfl_loss")


@pytest.mark.slow
def test_val_checkpoint_matches_training_validation(trained_run, workdir):
    """The shards are read directly (no full file is written), by one process or by two."""
    trained = read_csv(trained_run / "results.csv")[-1]
    assert float(trained["val/box_loss"]) > 0 and float(trained["metrics/mAP50(B)"]) > 0.05
    # training validated 16 images per pass on each of 2 ranks (twice the per-rank train batch): the val batch
    # is global, so 16 on one process and 32 on two
    last = trained_run / "weights" / "last"
    for name, extra in (("one", ["batch=16"]), ("two", ["nproc=2", "batch=32"])):
        check(run_cli("val", f"checkpoint={last}", "project=runs", f"name={name}", *extra, cwd=workdir))
        reported = json.loads((workdir / "runs" / name / "val.json").read_text())
        for key in KEYS:
            assert reported[key] == pytest.approx(float(trained[key]), rel=1e-4, abs=1e-5), (name, key)
