"""parallel_yolo/engine/step.py: a loader batch cut into micro-batches keeps every image with its own boxes, and the
forward and backward over the micro-batches accumulates their gradients (the loss is a per-image sum) and averages
their loss items."""

from __future__ import annotations

import torch
from conftest import DETECT, THREE, demo_train_set

from parallel_yolo.config import TrainConfig
from parallel_yolo.engine.build import build_train_state, make_strategy
from parallel_yolo.engine.step import forward_backward, micro_batches
from parallel_yolo.launch.dist import DistEnv


def loader_batch(n: int = 4) -> dict:
    dataset = demo_train_set()
    return dataset.collate_fn([dataset[i] for i in range(n)])


def test_micro_batches_keep_each_image_with_its_boxes():
    batch = loader_batch()
    parts = micro_batches(batch, micro=2, device=torch.device("cpu"), per_object=DETECT.per_object)
    assert [p["img"].shape[0] for p in parts] == [2, 2]
    assert all(p["img"].dtype == torch.float32 and p["img"].max() <= 1 for p in parts)  # preprocessed to [0, 1]
    for k, part in enumerate(parts):
        for i in range(2):  # image i of part k is image 2k+i of the batch, with the same boxes
            own = batch["batch_idx"] == 2 * k + i
            assert torch.equal(part["bboxes"][part["batch_idx"] == i], batch["bboxes"][own])
            assert torch.equal(part["img"][i], batch["img"][2 * k + i].float() / 255)


def test_micro_batches_accumulate_gradients_and_average_the_loss_items(one_rank_group):
    cfg = TrainConfig(imgsz=64, batch=4, optimizer="SGD")
    strategy = make_strategy("single", "fp32", env=DistEnv(), device=torch.device("cpu"), gloo_collectives=False)
    state = build_train_state(cfg, strategy, spec="yolov8n.yaml", task=DETECT, data=THREE, images=4,
                              sizing=lambda *_: (64, 5e-4))
    batch = loader_batch()
    params = [p for p in strategy.raw_model.parameters() if p.requires_grad]

    def run(parts):
        for p in params:
            p.grad = None
        items, names = forward_backward(strategy, state.criterion, parts, sync=True, mean_loss=False)
        return items, names, [p.grad.clone() for p in params]

    first, second = micro_batches(batch, micro=2, device=strategy.device, per_object=DETECT.per_object)
    both, names, both_grads = run([first, second])
    one, _, one_grads = run([first])
    two, _, two_grads = run([second])
    assert names == ("box_loss", "cls_loss", "dfl_loss") and both.shape == (3,)
    # gradients accumulate over the micro-batches (BatchNorm normalises each part by its own statistics, so this,
    # not one forward over all 4 images, is what micro_batch=2 computes); the items are the parts' mean
    assert all(torch.allclose(g, a + b, rtol=1e-5, atol=1e-7) for g, a, b in zip(both_grads, one_grads, two_grads))
    assert torch.allclose(both, (one + two) / 2, rtol=1e-6)
    assert not torch.equal(one, two)
