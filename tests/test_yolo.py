"""The Ultralytics adapter builds any detection yaml and loads a local .pt without downloading."""

from __future__ import annotations

import pytest
import torch

from parallel_yolo import yolo
from parallel_yolo.config import ConfigError, TrainConfig


@pytest.mark.parametrize("spec", ["yolov8s.yaml", "yolov8n-p6.yaml", "yolo11n.yaml", "yolo26n.yaml"])
def test_builds_detection_yamls_with_their_loss(spec):
    hyp = yolo.hyp_namespace(TrainConfig(model=spec))
    model = yolo.build_model(spec, nc=5, names={i: str(i) for i in range(5)}, hyp=hyp)
    assert model.nc == 5 and model.model[-1].nc == 5
    preds = model(torch.zeros(2, 3, 64, 64))
    batch = {"batch_idx": torch.tensor([0.0]), "cls": torch.tensor([[1.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "img": torch.zeros(2, 3, 64, 64)}
    loss, _ = yolo.build_criterion(model)(preds, batch)
    assert torch.isfinite(loss.sum())


def test_local_pt_weights_are_loaded(tmp_path):
    hyp = yolo.hyp_namespace(TrainConfig())
    source = yolo.build_model("yolov8n.yaml", nc=3, names={0: "a", 1: "b", 2: "c"}, hyp=hyp)
    torch.nn.init.constant_(source.model[0].conv.weight, 0.125)
    torch.save({"model": source}, tmp_path / "w.pt")
    loaded = yolo.build_model(str(tmp_path / "w.pt"), nc=3, names={0: "a", 1: "b", 2: "c"}, hyp=hyp)
    assert torch.equal(loaded.model[0].conv.weight, source.model[0].conv.weight)


def test_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        yolo.build_model(str(tmp_path / "bad.pt"), nc=3, names={}, hyp=None)
