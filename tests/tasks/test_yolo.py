"""The Ultralytics adapter builds any detection yaml and loads a local .pt without downloading."""

from __future__ import annotations

import pytest
import torch
from conftest import DETECT, ROOT, THREE

from parallel_yolo.config import ConfigError, TrainConfig
from parallel_yolo.tasks import yolo


@pytest.mark.parametrize("spec", ["yolov8s.yaml", "yolov8n-p6.yaml", "yolo11n.yaml", "yolo26n.yaml"])
def test_builds_detection_yamls_with_their_loss(spec):
    hyp = yolo.hyp_namespace(TrainConfig(model=spec), DETECT)
    model = yolo.build_model(spec, task=DETECT, data={"nc": 5, "names": {i: str(i) for i in range(5)}}, hyp=hyp)
    assert model.nc == 5 and model.model[-1].nc == 5
    preds = model(torch.zeros(2, 3, 64, 64))
    batch = {"batch_idx": torch.tensor([0.0]), "cls": torch.tensor([[1.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "img": torch.zeros(2, 3, 64, 64)}
    loss, _ = yolo.build_criterion(model)(preds, batch)
    assert torch.isfinite(loss.sum())


def test_local_pt_weights_are_loaded(tmp_path):
    hyp = yolo.hyp_namespace(TrainConfig(), DETECT)
    source = yolo.build_model("yolov8n.yaml", task=DETECT, data=THREE, hyp=hyp)
    torch.nn.init.constant_(source.model[0].conv.weight, 0.125)
    torch.save({"model": source}, tmp_path / "w.pt")
    loaded = yolo.build_model(str(tmp_path / "w.pt"), task=DETECT, data=THREE, hyp=hyp)
    assert torch.equal(loaded.model[0].conv.weight, source.model[0].conv.weight)


def test_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        yolo.build_model(str(tmp_path / "bad.pt"), task=DETECT, data=THREE, hyp=None)


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_optimizer_steps_with_the_fused_kernel_and_the_same_result(name):
    cfg = TrainConfig(optimizer=name, lr0=0.01)
    hyp = yolo.hyp_namespace(cfg, DETECT)
    models = [yolo.build_model("yolov8n.yaml", task=DETECT, data=THREE, hyp=hyp) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = yolo.optimizer_factory(cfg, hyp, nc=3, dataset_size=8, weight_decay=0.0005)(models[0])
    assert all(group["fused"] for group in fused.param_groups)
    reference = type(fused)([{**{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")},
                              "params": _twins(g["params"], models)} for g in fused.param_groups])
    assert not any(group["fused"] for group in reference.param_groups)  # torch's default loop on CPU
    for _ in range(3):
        for model in models:
            for p in model.parameters():
                p.grad = torch.sin(p.detach() * 7 + 1)
        fused.step()
        reference.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _twins(params, models):
    """The second model's parameters at the places of `params` in the first."""
    index = {id(p): i for i, p in enumerate(models[0].parameters())}
    twins = list(models[1].parameters())
    return [twins[index[id(p)]] for p in params]


def test_other_optimizers_are_left_as_built():
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = yolo.fused(torch.optim.RMSprop(params))
    assert "fused" not in optimizer.param_groups[0]


def test_every_shipped_model_yaml_passes_the_layer_check_and_code_does_not():
    """What Ultralytics' parse_model would evaluate or call must be a module class (yolo.check_layers)."""
    import glob
    import os

    import ultralytics
    from ultralytics.nn.tasks import yaml_model_load

    shipped = sorted(glob.glob(os.path.join(os.path.dirname(ultralytics.__file__), "cfg", "models", "**", "*.yaml"),
                          recursive=True))
    assert len(shipped) > 40
    for path in shipped:
        yolo.check_layers(yaml_model_load(path), path)
    good = yaml_model_load("yolov8n.yaml")
    for act in ("nn.SiLU()", "nn.LeakyReLU(0.1)", "nn.ReLU(inplace=True)"):
        yolo.check_layers({**good, "act": act}, "test")
    bad = [{**good, "act": "__import__('os').system('true')"}, {**good, "act": "nn.SiLU(print(1))"},
           {**good, "act": "nn.Module.__subclasses__()"}, {**good, "act": "torch.nn.SiLU()"},
           {**good, "head": [*good["head"][:-1], [-1, 1, "torch_safe_load", ["x.pt"]]]},
           {**good, "backbone": [[-1, 1, "yaml_model_load", ["x.yaml"]]]}, {**good, "head": "Detect"}, None]
    for layers in bad:
        with pytest.raises(ConfigError, match="not a torch or Ultralytics module"):
            yolo.check_layers(layers, "test")


def test_the_wide_yaml_is_yolov8x_with_every_channel_count_doubled():
    """configs/models/yolov8x-wide.yaml, the larger-than-x model of the README and benchmarks/sharded_init.py."""
    import copy

    from ultralytics.nn.tasks import parse_model, yaml_model_load

    def layers(spec):
        with torch.device("meta"):  # shapes only
            return parse_model(copy.deepcopy(yaml_model_load(spec)), ch=3, verbose=False)[0]

    wide, x = layers(str(ROOT / "configs" / "models" / "yolov8x-wide.yaml")), layers("yolov8x.yaml")
    convs = [(a, b) for a, b in zip(wide.modules(), x.modules()) if isinstance(a, torch.nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in x.modules())
    # every convolution doubled, but the head's class and box outputs and its fixed DFL projection
    doubled = [a.out_channels == 2 * b.out_channels for a, b in convs]
    assert sum(doubled) == len(convs) - 7, [(a.out_channels, b.out_channels) for a, b in convs]
    assert 270e6 < sum(p.numel() for p in wide.parameters()) < 275e6
