"""parallel_yolo/engine/build.py: the one build sequence of the train state, which `train` and `compare` both use."""

from __future__ import annotations

import re

import torch
from conftest import DETECT, ROOT, THREE

from parallel_yolo.config import TrainConfig
from parallel_yolo.engine.build import build_train_state, make_strategy
from parallel_yolo.launch.dist import DistEnv

# the steps of the sequence: whoever builds a model for training calls build_train_state instead of these
STEPS = (r"\.setup\(\w+, make_optimizer=", r"recompute\.choose\(", r"recompute\.apply\(", r"optimizer_factory\(",
         r"build_criterion\(")


def test_the_sequence_is_written_once_and_train_and_compare_call_it():
    package = ROOT / "parallel_yolo"
    for step in STEPS:
        found = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py")
                       if any(re.search(step, line) and not line.lstrip().startswith("def ")
                              for line in p.read_text().splitlines()))
        assert found == ["engine/build.py"], (step, found)
    for user in ("engine/trainer.py", "tools/compare.py"):
        assert "build_train_state(" in (package / user).read_text(), user


def test_a_state_built_for_single_trains_with_what_it_was_asked(one_rank_group):
    cfg = TrainConfig(imgsz=64, batch=2, optimizer="SGD", activation_checkpointing="backbone")
    strategy = make_strategy("single", "fp32", env=DistEnv(), device=torch.device("cpu"), gloo_collectives=False)
    asked = []

    def sizing(hyp, imgsz, stride):
        asked.append((hyp.imgsz, imgsz, stride))
        return 64, 5e-4

    state = build_train_state(cfg, strategy, spec="yolov8n.yaml", task=DETECT, data=THREE, images=2,
                              sizing=sizing, profile=True)
    assert asked == [(64, 64, 32)]  # once, with the checked size, before the optimizer
    assert state.recomputed == list(range(10))  # yolov8's backbone: layers 0-9
    assert state.profiled is not None and state.profiled.activation_bytes(state.recomputed) > 0
    assert sum(state.sizes.values()) == sum(p.numel() for p in strategy.raw_model.parameters())
    groups = strategy.param_groups()
    assert len(groups) == 3 and groups[0]["weight_decay"] > 0  # Ultralytics' three groups, decay on weights only
    images = torch.rand(2, 3, 64, 64)
    batch = {"img": images, "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [2.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.6, 0.2, 0.4]])}
    loss, _ = state.criterion(state.model(images), batch)
    assert torch.isfinite(loss).all()
    state.ema.update()
    assert state.ema.updates == 1
