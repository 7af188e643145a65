"""parallel_yolo/_ultralytics_internals.py: each Ultralytics internal the project relies on is where the adapter
expects it and behaves as the adapter assumes."""

from __future__ import annotations

import pytest
import torch
from conftest import DETECT, THREE, demo_train_set

from parallel_yolo import _ultralytics_internals as internals
from parallel_yolo.config import TrainConfig
from parallel_yolo.tasks import yolo


@pytest.fixture(scope="module")
def model_and_hyp():
    hyp = yolo.hyp_namespace(TrainConfig(), DETECT)
    return yolo.build_model("yolov8n.yaml", task=DETECT, data=THREE, hyp=hyp), hyp


@pytest.mark.parametrize("name", ["SGD", "AdamW", "MuSGD"])
def test_build_optimizer_runs_on_a_stand_in_trainer(model_and_hyp, name):
    model, hyp = model_and_hyp
    optimizer = internals.build_optimizer(model, hyp=hyp, nc=3, name=name, lr=0.01, momentum=0.9, decay=5e-4,
                                          iterations=100)
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert stepped == {id(p) for p in model.parameters()}  # every parameter, once (DFL's fixed conv included)
    decays = sorted({group["weight_decay"] for group in optimizer.param_groups})
    assert decays[0] == 0.0 and decays[-1] == pytest.approx(5e-4)  # Ultralytics' groups: no decay on BN and biases


def test_build_optimizer_auto_picks_musgd_past_10000_iterations(model_and_hyp):
    model, hyp = model_and_hyp
    build = lambda iterations: internals.build_optimizer(model, hyp=hyp, nc=3, name="auto", lr=0.01, momentum=0.9,
                                                         decay=5e-4, iterations=iterations)
    assert type(build(10_001)).__name__ == "MuSGD" and type(build(100)).__name__ == "AdamW"


def test_musgd_fields_and_defaults(model_and_hyp):
    model, hyp = model_and_hyp
    optimizer = internals.build_optimizer(model, hyp=hyp, nc=3, name="MuSGD", lr=0.01, momentum=0.9, decay=5e-4,
                                          iterations=100)
    muon, sgd, groups = internals.musgd_fields(optimizer)
    assert isinstance(muon, float) and isinstance(sgd, float)
    assert {use for _, use in groups} == {True, False}
    muon_params = [p for group, use in groups if use for p in group["params"]]
    assert muon_params and all(p.dim() >= 2 for p in muon_params)  # matrices and conv filters
    assert {"lr", "momentum", "weight_decay", "nesterov"} <= set(internals.musgd_defaults())


def test_muon_update_orthogonalises_whole_matrices():
    torch.manual_seed(0)
    matrices = [torch.randn(8, 4), torch.randn(16, 3, 3, 3)]
    updates = internals.muon_update(matrices)
    assert [u.shape for u in updates] == [m.shape for m in matrices]
    singular = torch.linalg.svdvals(updates[0].float() / updates[0].float().norm(dim=0).max())
    assert singular.max() / singular.min() < 2  # Newton–Schulz evens the singular values (a random matrix's do not)


def test_mosaic_draws_partners_from_the_whole_dataset_once_its_buffer_is_off():
    from ultralytics.data.augment import Mosaic

    dataset = demo_train_set()
    found = []

    def walk(transform):
        if isinstance(transform, Mosaic):
            found.append(transform)
        for child in (*getattr(transform, "transforms", ()), getattr(transform, "pre_transform", None)):
            if child is not None:
                walk(child)

    walk(dataset.transforms)
    assert found and all(m.buffer_enabled for m in found)  # Ultralytics' default without cache=ram
    dataset.buffer = [0]  # what a worker had loaded last: with the buffer on, every partner is image 0
    assert {i for _ in range(20) for i in found[0].get_indexes()} == {0}
    assert internals.mosaic_from_whole_dataset(dataset.transforms) >= len(found)
    partners = {i for _ in range(20) for i in found[0].get_indexes()}
    assert len(partners) > 5 and all(0 <= i < len(dataset) for i in partners)


def test_model_class_finds_what_parse_model_would_use():
    from ultralytics.nn.modules import C2f, Conv, Detect

    assert internals.model_class("Conv") is Conv and internals.model_class("C2f") is C2f
    assert internals.model_class("Detect") is Detect and internals.model_class("no_such_module") is None


def test_ema_decay_is_model_emas_ramp():
    from ultralytics.utils.torch_utils import ModelEMA

    ramp, reference = internals.ema_decay(decay=0.9999, tau=2000), ModelEMA(torch.nn.Linear(1, 1))
    assert [ramp(n) for n in (1, 100, 10_000)] == [reference.decay(n) for n in (1, 100, 10_000)]


def test_validator_runs_in_training_mode_on_the_trainer_stand_in(model_and_hyp, tmp_path):
    from copy import copy

    from ultralytics.models.yolo.detect import DetectionValidator

    from parallel_yolo.data import loader as data

    model, hyp = model_and_hyp
    hyp = copy(hyp)
    hyp.imgsz, hyp.plots = 64, False
    spec = data.resolve_dataset("demo")
    loader = data.val_loader(data.build_dataset(hyp, spec, "val", batch=8, stride=32, mode="val"), batch=8, workers=0,
                             distributed=False, device=torch.device("cpu"))
    model = copy(model)
    model.criterion = model.init_criterion()
    names = ("box_loss", "cls_loss", "dfl_loss")
    metrics = internals.validate_in_training_mode(DetectionValidator(loader, save_dir=tmp_path, args=hyp), model,
                                                  device=torch.device("cpu"), data=spec, loss_names=names, world_size=1,
                                                  plots=False)
    assert "fitness" in metrics and {"val/box_loss", "val/cls_loss", "val/dfl_loss"} <= set(metrics)


# heads with 4 strides, one-to-one and one-to-many branches, attention (tests/tasks/test_variants.py builds every family)
@pytest.mark.parametrize("spec", ["yolov8n-p6.yaml", "yolov10n.yaml", "yolo12n.yaml", "yolo26n.yaml"])
def test_a_model_built_layer_by_layer_is_the_whole_build(spec):
    """Sharded initialisation's build: every value, the strides, the attributes and the random generator afterwards
    as DetectionModel(yaml) makes them, while at most one layer holds real tensors at any time."""
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    torch.manual_seed(0)
    whole = DetectionModel(spec, nc=3, verbose=False)
    after_whole = torch.get_rng_state()
    kept, order = {}, []

    def take(layer, last):
        assert not any(t.is_meta for t in layer.parameters())  # made with real values ...
        assert all(t.is_meta for done in built_so_far.values() for t in done.parameters())  # ... the others gone
        order.append((layer.i, last))
        built_so_far[layer.i] = layer
        kept.update((f"model.{layer.i}.{k}", v.clone()) for k, v in layer.state_dict().items())
        layer.to("meta")

    built_so_far = {}
    torch.manual_seed(0)
    model = internals.build_layer_by_layer(yaml_model_load(spec), nc=3, take=take)
    assert torch.equal(torch.get_rng_state(), after_whole)
    reference = whole.state_dict()
    assert kept.keys() == reference.keys() and all(torch.equal(kept[k], reference[k]) for k in reference)
    count = len(whole.model)
    assert order == [(i, False) for i in range(count - 1)] + [(count - 1, True)]  # the head last, biases written
    assert torch.equal(model.stride, whole.stride) and torch.equal(model.model[-1].stride, whole.model[-1].stride)
    for ours, theirs in ((model, whole), (model.model[-1], whole.model[-1])):
        assert ours.__dict__.keys() == theirs.__dict__.keys()
        for key, value in theirs.__dict__.items():
            if not key.startswith("_"):
                mine = ours.__dict__[key]
                assert torch.equal(mine, value) if isinstance(value, torch.Tensor) else mine == value, key
    assert [m.training for m in model.modules()] == [m.training for m in whole.modules()]
