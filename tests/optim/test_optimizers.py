"""Every optimizer name Ultralytics accepts trains under every strategy, and its state checkpoints by parameter.

DeepSpeed hands the optimizer flat partitions, FSDP2 DTensor shards: each optimizer takes two steps on each, the
loss stays finite, the weights move, and every state tensor it keeps is one the checkpoint can write by name.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from conftest import DETECT, THREE, free_port, rank_environment, tiny_batch

from parallel_yolo.config import OPTIMIZERS
from parallel_yolo.strategies import REGISTRY

# ZeRO-3's flat partitions and FSDP's DTensors by default; the others run the same optimizers on another flat layout
# (zero1/2: one partition per param group) or on plain tensors (ddp's are those of one process)
DEFAULT = {"zero3", "fsdp"}


def _worker(rank: int, world: int, port: int, name: str, out: str) -> None:
    rank_environment(rank, world, port)
    from parallel_yolo.checkpoint import state as ckpt_state
    from parallel_yolo.config import TrainConfig
    from parallel_yolo.launch import dist as pdist
    from parallel_yolo.strategies import create, preset
    from parallel_yolo.strategies.precision import policy
    from parallel_yolo.tasks import yolo

    env, device, results = pdist.read_env(), torch.device("cpu"), {}
    with pdist.process_group(env, device):
        for optimizer in OPTIMIZERS:
            torch.manual_seed(0)
            cfg = TrainConfig(optimizer=optimizer, lr0=0.01, batch=4)
            hyp = yolo.hyp_namespace(cfg, DETECT)
            model = yolo.build_model("yolov8n.yaml", task=DETECT, data=THREE, hyp=hyp)
            criterion = yolo.build_criterion(model)
            strategy = create(name, env=env, device=device, precision=policy("fp32"), options=preset(name))
            # 20,000 images a step for 300 epochs: optimizer=auto picks MuSGD, as on a real dataset
            wrapped, _ = strategy.setup(model, make_optimizer=yolo.optimizer_factory(
                cfg, hyp, nc=3, dataset_size=20_000, weight_decay=5e-4))
            before = strategy.full_state_dict()
            losses = []
            for _ in range(2):
                batch = tiny_batch()
                loss, _ = criterion(wrapped(batch["img"]), batch)
                strategy.backward(loss.sum() * world)
                strategy.step()
                losses.append(float(loss.sum()))
            after = strategy.full_state_dict()
            moved = float(sum((after[k] - before[k]).abs().sum() for k in before if "running" not in k
                              and before[k].is_floating_point()))
            slabs = ckpt_state.slabs(strategy, strategy.make_ema(), buffers=dict(strategy.raw_model.named_buffers()))
            states = sorted({s.key.split("/")[1] for s in slabs if s.key.startswith("optim/")})
            results[optimizer] = (type(strategy.inner_optimizer()).__name__, losses, moved, states)
            del strategy, wrapped
    if rank == 0:
        torch.save(results, out)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.extended)
                                  for n in sorted(set(REGISTRY) - {"single"})])
def test_every_ultralytics_optimizer_trains_and_checkpoints(name, tmp_path):
    out = str(tmp_path / "results.pt")
    mp.spawn(_worker, args=(2, free_port(), name, out), nprocs=2, join=True)
    results = torch.load(out, weights_only=False)
    expected_states = {"SGD": ["momentum_buffer"], "MuSGD": ["momentum_buffer", "momentum_buffer_SGD"],
                       "Adam": ["exp_avg", "exp_avg_sq", "step"], "AdamW": ["exp_avg", "exp_avg_sq", "step"],
                       "Adamax": ["exp_avg", "exp_inf", "step"], "NAdam": ["exp_avg", "exp_avg_sq", "mu_product", "step"],
                       "RAdam": ["exp_avg", "exp_avg_sq", "step"], "RMSprop": ["momentum_buffer", "square_avg", "step"]}
    expected_states["auto"] = expected_states["MuSGD"]
    for optimizer, (built, losses, moved, states) in results.items():
        assert built == ("DistributedMuSGD" if optimizer in ("MuSGD", "auto") else optimizer), (optimizer, built)
        assert all(torch.isfinite(torch.tensor(losses))) and moved > 0, (optimizer, losses, moved)
        assert states == expected_states[optimizer], (optimizer, states)
