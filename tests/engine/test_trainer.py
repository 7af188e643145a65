"""The training loop's host synchronisations: one per optimizer step, where the norm and the losses come back
together (Strategy.step); nothing else in the loop reads a tensor into Python more often than once per epoch."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import parallel_yolo

PACKAGE = Path(parallel_yolo.__file__).parent
# the code of the loop itself; validation, checkpoints and memory reports run once per epoch or less
LOOP = [PACKAGE / "engine" / "trainer.py", PACKAGE / "engine" / "step.py", PACKAGE / "data", PACKAGE / "engine" /
        "recipe.py", PACKAGE / "strategies", PACKAGE / "optim"]
_COMM = str(PACKAGE / "monitor" / "comm.py")
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__float__,
         torch.Tensor.__int__, torch.Tensor.__bool__}


class HostReads(TorchFunctionMode):
    """Counts, by the function that asks, the reads of tensor values into Python (a host synchronisation on a GPU)."""

    def __init__(self):
        super().__init__()
        self.lines: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            caller = sys._getframe(1)
            while caller.f_code.co_filename == _COMM:  # the strict mode's own frame, when it is on (the suite)
                caller = caller.f_back
            path = Path(caller.f_code.co_filename)
            if any(path == place or place in path.parents for place in LOOP):
                self.lines[f"{path.name}:{caller.f_code.co_name}"] += 1
        return func(*args, **(kwargs or {}))


def test_one_host_read_per_optimizer_step(tmp_path, monkeypatch):
    from conftest import TINY, read_csv

    from parallel_yolo.config import parse_overrides
    from parallel_yolo.engine.trainer import train

    monkeypatch.chdir(tmp_path)
    cfg = parse_overrides([*TINY, "epochs=2", "batch=8", "nbs=8", "micro_batch=4", "fraction=0.1", "val=false",
                           f"project={tmp_path}", "strategy=single"], parallel_yolo.config.TrainConfig)
    with HostReads() as reads:
        train(cfg)
    steps, epochs = len(read_csv(tmp_path / "train" / "steps.csv")), 2
    assert steps == 8
    # per step: only the strategy's one copy of the norm and the losses; the rest at most once per epoch (the
    # sampler's permutation, the epoch's mean losses) or once per run (the model's stride)
    assert {where: n for where, n in reads.lines.items() if n > epochs} == {"base.py:host_values": steps}, reads.lines
