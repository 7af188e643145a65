"""Every task's demo data: generated locally, the same bytes every time, and read by Ultralytics' own dataset of the
task with no label skipped."""

from __future__ import annotations

import pytest

from parallel_yolo.config import TrainConfig
from parallel_yolo.data import demo, loader
from parallel_yolo.tasks import yolo
from parallel_yolo.tasks.task import TASKS


def test_every_task_has_a_demo():
    assert set(demo.DEMOS) == set(TASKS)
    assert all(demo.demo_task(name) == task for task, name in demo.DEMOS.items())


@pytest.mark.parametrize("task", sorted(demo.DEMOS))
def test_demo_is_deterministic_and_read_whole_by_ultralytics(task, tmp_path, monkeypatch):
    trees = []
    for sub in ("a", "b"):
        monkeypatch.setenv("PARALLEL_YOLO_CACHE", str(tmp_path / sub))
        made = demo.demo_dataset(task, n_train=8, n_val=4, size=64, seed=3)
        root = made if made.is_dir() else made.parent
        trees.append({p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*"))
                      if p.is_file() and p.name != "data.yaml" and p.suffix != ".cache"})
        data = loader.resolve_dataset(str(made), task)
    assert trees[0] == trees[1]
    images = [p for p in trees[0] if p.parts[0] in ("images", "train", "val") and p.suffix == ".png"]
    assert len(images) == 8 + 4
    hyp = yolo.hyp_namespace(TrainConfig(imgsz=64), TASKS[task])
    for split in ("train", "val"):  # build_dataset refuses any label Ultralytics would skip
        dataset = loader.build_dataset(hyp, data, split, batch=4, stride=32, mode="val")
        assert len(dataset) == (8 if split == "train" else 4)
    if task in ("detect", "segment", "obb", "pose"):
        for name, content in trees[0].items():
            if name.suffix == ".txt":
                for line in content.decode().splitlines():
                    cls, *values = line.split()
                    assert int(cls) < data["nc"] and all(0.0 <= float(v) <= 2.0 for v in values)


def test_detection_demo_is_unchanged(tmp_path, monkeypatch):
    """The detection demo kept its folder and files when the other tasks' demos came (read from the code before
    them), so its figures stay comparable and existing caches stay valid."""
    monkeypatch.setenv("PARALLEL_YOLO_CACHE", str(tmp_path))
    made = demo.demo_dataset("detect", n_train=2, n_val=1, size=64, seed=3)
    assert made.parent.name == "demo-16c1da0f08"
    assert (made.parent / "labels" / "train" / "00000.txt").read_text() == \
        "2 0.179688 0.851562 0.265625 0.265625\n2 0.476562 0.226562 0.296875 0.296875\n"
