"""recompute.py: activation checkpointing at YOLO-layer granularity leaves training exactly as without it: per-step
losses, final weights, EMA, every BatchNorm buffer and the random generators, in one process and under ddp, zero3
and fsdp on 2 processes; torch's checkpoint as it comes would not (BatchNorm's statistics updated twice)."""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import DETECT, THREE, free_port, rank_environment, tiny_batch

from parallel_yolo.config import CompareConfig, ConfigError, TrainConfig
from parallel_yolo.engine import recompute
from parallel_yolo.tasks import yolo


def _model():
    torch.manual_seed(0)
    return yolo.build_model("yolov8n.yaml", task=DETECT, data=THREE, hyp=yolo.hyp_namespace(TrainConfig(), DETECT))


def _two_steps(model):
    """Forward and backward twice in train mode: (losses, gradients, buffers, the generators' states after)."""
    criterion, batch, losses = yolo.build_criterion(model), tiny_batch(), []
    model.train()
    for _ in range(2):
        loss, _ = criterion(model(batch["img"]), batch)
        loss.sum().backward()
        losses.append(loss.detach().clone())
    return (losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            {n: b.clone() for n, b in model.named_buffers()}, torch.get_rng_state())


def _same(a, b) -> dict[str, bool]:
    return {"loss": all(torch.equal(x, y) for x, y in zip(a[0], b[0])),
            "grads": a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1]),
            "buffers": all(torch.equal(a[2][k], b[2][k]) for k in a[2]), "rng": torch.equal(a[3], b[3])}


def test_one_process_trains_exactly_as_without_and_plain_checkpointing_does_not():
    base = _model()
    torch.manual_seed(1)
    reference = _two_steps(copy.deepcopy(base))
    safe = copy.deepcopy(base)
    chosen = recompute.apply(safe, "all")
    assert len(chosen) == sum(1 for layer in safe.model if any(True for _ in layer.parameters()))
    torch.manual_seed(1)
    assert _same(reference, _two_steps(safe)) == dict.fromkeys(("loss", "grads", "buffers", "rng"), True)
    # the same layers under torch's checkpoint with no BatchNorm handling: the gradients agree, the statistics not
    plain = copy.deepcopy(base)
    from parallel_yolo._torch_internals import checkpoint_module

    for i in chosen:
        checkpoint_module(plain.model[i], context_fn=lambda: (contextlib.nullcontext(), contextlib.nullcontext()))
    torch.manual_seed(1)
    found = _same(reference, _two_steps(plain))
    assert found["grads"] and not found["buffers"]


def test_modes_choose_layers_and_unknown_values_are_refused():
    model = _model()
    backbone = recompute.chosen_layers(model, "backbone")
    assert backbone and max(backbone) < len(model.yaml["backbone"]) <= max(recompute.chosen_layers(model, "all"))
    assert recompute.chosen_layers(model, "none") == []
    with pytest.raises(ConfigError, match=r"activation_checkpointing=al: unknown \(did you mean all\?\)"):
        TrainConfig(activation_checkpointing="al")
    with pytest.raises(ConfigError, match="cannot be combined with compile=true"):
        TrainConfig(activation_checkpointing="all", compile=True)
    with pytest.raises(ConfigError, match="cannot be combined with compile=true"):
        CompareConfig(activation_checkpointing="none,backbone", compile=True)


def test_the_forecast_counts_what_autograd_keeps():
    """The meta-device profile finds exactly the bytes a real forward keeps for backward (one image; parameters and
    buffers left out)."""
    model = _model().train()
    profiled = recompute.profile(model, 128)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.rand(1, 3, 128, 128))
    forecast = {}
    for saved in profiled.saved:
        forecast.update(saved)
    assert sum(kept.values()) == sum(forecast.values()) > 0
    none, every = profiled.activation_bytes([]), profiled.activation_bytes(profiled.candidates)
    assert none == int(recompute.TRANSIENT * sum(forecast.values())) and every < none / 2
    assert sum(profiled.flops) > 0 and all(profiled.flops[i] > 0 for i in profiled.candidates)


def test_auto_recomputes_the_least_that_fits_the_budget():
    from types import SimpleNamespace

    model = _model().train()
    ddp = SimpleNamespace(shard_ranks=lambda: 1, sharded=frozenset(), master_copy=False, full_shape=lambda t: t.shape)
    profiled = recompute.profile(model, 128)
    states = 4 * 4 * sum(p.numel() for p in model.parameters())  # params, grads, SGD momentum, EMA in fp32

    def choose(budget):
        return recompute.choose(model, "auto", strategy=ddp, optimizer="SGD", images=8, imgsz=128, budget=budget,
                                profiled=profiled)

    none, every = (states + 8 * profiled.activation_bytes(layers) for layers in ([], profiled.candidates))
    layers, note = choose(none)
    assert layers == [] and "per rank for 8 images of 128 px" in note
    assert choose(every)[0] == profiled.candidates
    chosen = []
    for budget in (none - 1, (none + every) // 2, every + 1):  # less room, more recompute
        layers, _ = choose(budget)
        assert states + 8 * profiled.activation_bytes(layers) <= budget
        assert all(states + 8 * profiled.activation_bytes(layers[:k] + layers[k + 1:]) > budget  # none unnecessary
                   for k in range(len(layers)))
        chosen.append(layers)
    assert 0 < len(chosen[0]) <= len(chosen[1]) <= len(chosen[2]) and chosen[1] != profiled.candidates
    with pytest.raises(ConfigError, match=r"auto: the forecast with every layer recomputed is .* over budget=.*; "
                                          r"lower batch or imgsz"):
        choose(every - 1)
    with pytest.raises(ConfigError, match="activation_checkpointing=auto plans for a memory budget: add budget="):
        TrainConfig(activation_checkpointing="auto")
    assert TrainConfig(activation_checkpointing="auto", budget="24GB").budget_bytes == 24 * 10**9


STRATEGIES = ("ddp", "zero3", "fsdp")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    rank_environment(rank, world, port)
    from parallel_yolo.engine.step import forward_backward
    from parallel_yolo.launch import dist as pdist
    from parallel_yolo.strategies import create, preset
    from parallel_yolo.strategies.precision import policy

    env, device = pdist.read_env(), torch.device("cpu")
    cfg = TrainConfig(optimizer="SGD", lr0=0.01, batch=4)
    results = {}
    with pdist.process_group(env, device):
        for name in STRATEGIES:
            for mode in ("none", "all"):
                model = _model()
                criterion = yolo.build_criterion(model)
                recompute.apply(model, mode)
                strategy = create(name, env=env, device=device, precision=policy("fp32"), options=preset(name))
                strategy.setup(model, make_optimizer=yolo.optimizer_factory(cfg, yolo.hyp_namespace(cfg, DETECT), nc=3,
                                                                              dataset_size=8, weight_decay=5e-4))
                ema, losses = strategy.make_ema(), []
                torch.manual_seed(10 + rank)  # each rank its own images
                for _ in range(3):
                    batch = tiny_batch()
                    items, _ = forward_backward(strategy, criterion, [batch], sync=True, mean_loss=False)
                    losses.append(items.clone())
                    strategy.step(items)
                    ema.update()
                results[name, mode] = {
                    "losses": torch.stack(losses), "rng": torch.get_rng_state(),
                    "weights": strategy.full_state_dict(), "ema": ema.full_model().state_dict(),
                    "own_buffers": {k: b.clone() for k, b in strategy.raw_model.named_buffers()}}
                del strategy, ema
    same = {}
    for name in STRATEGIES:
        a, b = results[name, "none"], results[name, "all"]
        same[name] = {"losses": torch.equal(a["losses"], b["losses"]), "rng": torch.equal(a["rng"], b["rng"]),
                      **{part: a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k])
                                                                        for k in a[part])
                         for part in ("weights", "ema", "own_buffers")}}
    torch.save(same, os.path.join(out, f"{rank}.pt"))


@pytest.mark.slow
def test_every_strategy_trains_bit_identically_with_checkpointing(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    expected = dict.fromkeys(("losses", "rng", "weights", "ema", "own_buffers"), True)
    for rank in range(2):
        assert torch.load(tmp_path / f"{rank}.pt") == dict.fromkeys(STRATEGIES, expected), rank
