"""Every task in ultralytics.cfg.TASKS is served: its model, loss, validator and trainer exist where the table says,
the loss reports the names the table gives, and data of another task is refused by name before anything starts."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from parallel_yolo.config import ConfigError, TrainConfig
from parallel_yolo.data import loader
from parallel_yolo.tasks import yolo
from parallel_yolo.tasks.task import TASKS, served_tasks, task_named

# each task's model yamls of every family that has it (YOLOv8, YOLO11, YOLO26, YOLOv10 for detection)
YAMLS = {"detect": ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml", "yolov10n.yaml"],
         "segment": ["yolov8n-seg.yaml", "yolo11n-seg.yaml", "yolo26n-seg.yaml"],
         "pose": ["yolov8n-pose.yaml", "yolo11n-pose.yaml", "yolo26n-pose.yaml"],
         "obb": ["yolov8n-obb.yaml", "yolo11n-obb.yaml", "yolo26n-obb.yaml"],
         "classify": ["yolov8n-cls.yaml", "yolo11n-cls.yaml", "yolo26n-cls.yaml"],
         "semantic": ["yolo26n-sem.yaml"], "depth": ["yolo26n-depth.yaml"]}


def test_every_ultralytics_task_is_in_the_table():
    assert served_tasks() and all(name in TASKS for name in served_tasks())
    assert set(YAMLS) == set(TASKS)
    with pytest.raises(ConfigError, match="Ultralytics' tasks are detect"):
        task_named("caption")


@pytest.mark.parametrize("spec", [s for specs in YAMLS.values() for s in specs])
def test_the_task_follows_the_model_and_its_loss_names_are_the_tables(spec, tmp_path, monkeypatch):
    """Build each family's model of each task for its demo's data and run its loss on a demo batch: the items it
    returns are the names the trainer writes (yolo.loss_names), and Ultralytics' trainer would build the same class."""
    monkeypatch.setenv("PARALLEL_YOLO_CACHE", str(tmp_path))
    task = yolo.model_task(spec)
    assert task.name == next(name for name, specs in YAMLS.items() if spec in specs)
    from parallel_yolo.data.demo import demo_dataset

    made = demo_dataset(task.name, n_train=4, n_val=4, size=64)
    data = loader.resolve_dataset(str(made), task.name)
    hyp = yolo.hyp_namespace(TrainConfig(model=spec, imgsz=64), task)
    model = yolo.build_model(spec, task=task, data=data, hyp=hyp)
    assert type(model) is task.model_class() and model.nc == data["nc"]
    assert issubclass(task.validator_class(), __import__("ultralytics").engine.validator.BaseValidator)
    dataset = loader.build_dataset(hyp, data, "train", batch=4, stride=32, mode="val")
    collate = getattr(dataset, "collate_fn", None) or torch.utils.data.default_collate
    batch = loader.preprocess(collate([dataset[i] for i in range(4)]), torch.device("cpu"))
    criterion = yolo.build_criterion(model)
    loss, items = criterion(model(batch["img"]), batch)
    assert tuple(items) == yolo.loss_names(criterion, task) and torch.isfinite(loss.sum())
    if task.name == "pose":
        assert model.kpt_shape == [3, 3] and list(model.yaml["kpt_shape"]) == [3, 3]


@pytest.mark.parametrize("spec, head", [("rtdetr-l.yaml", "RTDETRDecoder"), ("yolov8s-world.yaml", "WorldDetect"),
                                        ("yoloe-11s-seg.yaml", "YOLOESegment")])
def test_heads_of_no_served_task_are_refused_with_the_reason(spec, head):
    with pytest.raises(ConfigError, match=f"its last layer is {head}, .* pass a YOLO model yaml of a task"):
        yolo.model_task(spec)


@pytest.mark.parametrize("task, data, message", [
    ("segment", "demo-pose", "data=demo-pose is the pose demo, and the model is a segment model; use data=demo-seg"),
    ("detect", "CLS_FOLDER", "is a folder: a detect model trains on an Ultralytics data yaml"),
    ("classify", "DETECT_YAML", "a classification model trains on a folder holding train/ and val/"),
    ("detect", "POSE_YAML", "is keypoint data .*; train it with a -pose model"),
    ("pose", "DETECT_YAML", "no 'kpt_shape:'; a pose model trains on keypoint data"),
])
def test_data_of_another_task_is_refused(task, data, message, tmp_path, monkeypatch):
    monkeypatch.setenv("PARALLEL_YOLO_CACHE", str(tmp_path))
    from parallel_yolo.data.demo import demo_dataset

    paths = {"CLS_FOLDER": demo_dataset("classify", n_train=3, n_val=3, size=64),
             "DETECT_YAML": demo_dataset("detect", n_train=3, n_val=3, size=64),
             "POSE_YAML": demo_dataset("pose", n_train=3, n_val=3, size=64)}
    with pytest.raises(ConfigError, match=message):
        loader.resolve_dataset(str(paths.get(data, data)), task)


@pytest.mark.parametrize("task", ["segment", "obb"])
def test_detection_labels_for_a_polygon_task_are_refused(task, tmp_path, monkeypatch):
    """A detection data yaml given to a segmentation or OBB model: the labels have boxes and no polygons."""
    monkeypatch.setenv("PARALLEL_YOLO_CACHE", str(tmp_path))
    from parallel_yolo.data.demo import demo_dataset

    data = loader.resolve_dataset(str(demo_dataset("detect", n_train=3, n_val=3, size=64)), task)
    hyp = yolo.hyp_namespace(TrainConfig(imgsz=64), TASKS[task])
    with pytest.raises(ConfigError, match=f"requires equal numbers of boxes and segments.* A {task} model trains on one 'class x1 y1"):
        loader.build_dataset(hyp, data, "train", batch=2, stride=32, mode="train")


def test_pose_keypoints_of_another_shape_are_refused(tmp_path, monkeypatch):
    """Keypoint labels with another count than the data yaml's kpt_shape: refused with Ultralytics' own verdict."""
    monkeypatch.setenv("PARALLEL_YOLO_CACHE", str(tmp_path))
    from parallel_yolo.data.demo import demo_dataset

    made = demo_dataset("pose", n_train=3, n_val=3, size=64)
    made.write_text(made.read_text().replace("kpt_shape: [3, 3]", "kpt_shape: [4, 3]").replace(
        "flip_idx: [0, 2, 1]", "flip_idx: [0, 2, 1, 3]").replace("[apex, left, right]", "[a, b, c, d]"))
    data = loader.resolve_dataset(str(made), "pose")
    hyp = yolo.hyp_namespace(TrainConfig(imgsz=64), TASKS["pose"])
    with pytest.raises(ConfigError, match="corrupt"):
        loader.build_dataset(hyp, data, "train", batch=2, stride=32, mode="train")


@pytest.mark.parametrize("strategy", ["zero3", "zero3_offload", "fsdp", "fsdp_grad_op", "hsdp"])
def test_a_loss_that_runs_the_model_outside_its_forward_is_refused_where_parameters_are_sharded(strategy):
    from parallel_yolo.strategies import REGISTRY

    assert "params" in REGISTRY[strategy].sharded
    with pytest.raises(ConfigError, match=f"yolo26n-pose.yaml under strategy={strategy}: its RLE keypoint loss"):
        yolo.model_task("yolo26n-pose.yaml", strategy=(strategy, True))
    assert yolo.model_task("yolo26n-pose.yaml", strategy=("zero2", False)).name == "pose"
    assert yolo.model_task("yolo11n-pose.yaml", strategy=(strategy, True)).name == "pose"


def test_a_mismatch_stops_the_command_in_one_line(workdir):
    """Through the real entry point, before any process starts: one line, exit 2."""
    result = run_cli("train", "model=yolov8n-seg.yaml", "data=demo-cls", "nproc=2", "strategy=zero2", cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "parallel-yolo: error: data=demo-cls is the classify demo, and the model is a segment model; use "
        "data=demo-seg (or data=demo, the demo of the model's task)")
    assert not (workdir / "runs").exists()



def _readme_task_lines() -> dict[str, str]:
    from conftest import ROOT

    text = (ROOT / "README.md").read_text()
    start, end = text.index("<!-- tasks:"), text.index("<!-- /tasks -->")
    return {row.split("|")[1].strip(): row.split("`")[1] for row in text[start:end].splitlines()
            if row.startswith("| ") and "`" in row}


def test_the_readme_shows_one_line_per_task_whose_model_is_of_that_task():
    lines = _readme_task_lines()
    assert sorted(lines) == sorted(served_tasks()) and len(lines) == len(served_tasks())
    for task, line in lines.items():
        spec = next(word[6:] for word in line.split() if word.startswith("model="))
        assert yolo.model_task(spec).name == task, line


@pytest.mark.slow
@pytest.mark.extended  # seven short runs of 2 processes
@pytest.mark.parametrize("task", list(TASKS))
def test_the_readme_task_lines_run(task, workdir):
    """Each launch line as written, shortened by keys only (one epoch of two steps at 64 px, no plots)."""
    from conftest import check

    words = _readme_task_lines()[task].split()[1:]
    check(run_cli(*words, "epochs=1", "max_steps=2", "imgsz=64", "workers=0", "plots=false", "fraction=0.25",
                  cwd=workdir))
    assert list((workdir / "runs" / "detect").glob("*/weights/last/manifest.json"))


@pytest.mark.slow
def test_compare_measures_a_task_on_its_demo_batch(workdir):
    """`compare` on a classification model: its batch comes from the task's demo through Ultralytics' dataset, and
    FSDP holds half of DDP's model states on each of 2 ranks, as for detection."""
    import json

    from conftest import check

    check(run_cli("compare", "model=yolov8n-cls.yaml", "nproc=2", "imgsz=64", "batch=4", "steps=2",
                  "strategies=ddp,fsdp", "project=cmp", "name=c", cwd=workdir))
    rows = {r["strategy"]: r for r in json.loads((workdir / "cmp" / "c" / "compare.json").read_text())["summary"]}
    assert 0.45 < rows["fsdp"]["states_MiB"] / rows["ddp"]["states_MiB"] < 0.55, rows


@pytest.mark.slow
def test_results_csv_has_the_tasks_columns_from_an_epoch_not_validated(workdir):
    """Depth's validator makes its metrics only when it first runs: the columns come from the task all the same
    (before, an unvalidated first epoch wrote detection's mAP columns and the metrics never found theirs)."""
    from conftest import check, read_csv

    check(run_cli("train", "model=yolo26n-depth.yaml", "data=demo", "imgsz=64", "epochs=2", "batch=8", "workers=0",
                  "plots=false", "val=false", "fraction=0.125", "project=runs", "name=d", cwd=workdir))
    rows = read_csv(workdir / "runs" / "d" / "results.csv")
    assert [r["metrics/delta1"] == "" for r in rows] == [True, False], rows
    assert "metrics/mAP50(B)" not in rows[0]
