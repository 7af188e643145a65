"""parallel_yolo/monitor/runlog.py: only the writer writes; rows go under the header a file already has (a resumed
run), rewinding keeps each step and epoch once, and Ultralytics' run-folder naming."""

from __future__ import annotations

import csv

from parallel_yolo.monitor.runlog import STEP_COLUMNS, RunLog


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_steps_and_epochs_are_logged_under_one_header_and_rewound_once(tmp_path):
    log = RunLog(tmp_path, writer=True)
    log.write_args({"epochs": 3, "strategy": "fsdp"})
    assert (tmp_path / "args.yaml").read_text().startswith("epochs: 3") and (tmp_path / "weights").is_dir()
    for step in (1, 2, 3):
        log.step({"step": step, "epoch": 0, "loss": 1.0 / 3, "seg_loss": 0.5, "peak_mib_rank0": 10,
                  "peak_mib_rank1": 11, "x": 5}, losses=("box_loss", "seg_loss"))
    log.epoch({"epoch": 1, "metrics/mAP50(B)": 0.5})
    log.epoch({"epoch": 2, "metrics/mAP50(B)": 0.6})
    steps = rows(tmp_path / "steps.csv")
    # the fixed columns with the task's loss items after `loss`, then per rank
    assert list(steps[0]) == [*STEP_COLUMNS[:3], "box_loss", "seg_loss", *STEP_COLUMNS[3:], "peak_mib_rank0",
                              "peak_mib_rank1"]
    assert steps[0]["seg_loss"] == "0.5" and steps[0]["box_loss"] == ""
    assert steps[0]["loss"] == "0.333333333" and steps[0]["images_per_s"] == ""  # floats to 9 digits, gaps empty
    # resumed from the checkpoint of step 2 (epoch 1): later rows go, and a new writer appends under the old header
    resumed = RunLog(tmp_path, writer=True)
    resumed.rewind(step=2, epochs=1)
    resumed.step({"step": 3, "epoch": 1, "loss": 0.25, "peak_mib_rank0": 9, "peak_mib_rank1": 9},
                 losses=("box_loss", "seg_loss"))
    assert [r["step"] for r in rows(tmp_path / "steps.csv")] == ["1", "2", "3"]
    assert rows(tmp_path / "steps.csv")[-1]["loss"] == "0.25"
    assert [r["epoch"] for r in rows(tmp_path / "results.csv")] == ["1"]
    resumed.rewind(step=0, epochs=0)  # nothing kept: the files go, the next row brings a fresh header
    assert not (tmp_path / "steps.csv").exists() and not (tmp_path / "results.csv").exists()


def test_other_ranks_write_nothing(tmp_path):
    log = RunLog(tmp_path / "run", writer=False)
    log.write_args({"a": 1})
    log.step({"step": 1}, losses=("loss",))
    log.epoch({"epoch": 1})
    log.rewind(step=0, epochs=0)
    assert not (tmp_path / "run").exists()


def test_new_folders_are_named_as_ultralytics_names_them(tmp_path):
    assert RunLog.new_folder(str(tmp_path), "train", exist_ok=False) == tmp_path / "train"
    (tmp_path / "train").mkdir()
    assert RunLog.new_folder(str(tmp_path), "train", exist_ok=False) == tmp_path / "train-2"
    assert RunLog.new_folder(str(tmp_path), "train", exist_ok=True) == tmp_path / "train"
