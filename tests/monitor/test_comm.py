"""comm.StrictDevice: a CPU run refuses, in a collective, what NCCL would refuse on GPUs (the suite runs with it on,
see conftest), and the training loop hands collectives device tensors only."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as tdist
from conftest import TINY, check, read_csv, run_cli

from parallel_yolo.monitor.comm import STRICT_DEVICE, HostTensorError, StrictDevice


def test_host_tensors_are_refused_and_device_tensors_pass(one_rank_group):
    device = torch.device("cpu")  # what the strategy's device is on this machine
    weight = torch.nn.Parameter(torch.ones(3))  # made outside: a model's tensor
    with StrictDevice():
        host = [torch.zeros(3), weight.detach().cpu(), torch.zeros(3) / 2 + torch.ones(3), torch.tensor([1.0, 2.0])]
        for tensor in host:
            with pytest.raises(HostTensorError, match="all_reduce was handed a tensor held in host memory"):
                tdist.all_reduce(tensor)
        with pytest.raises(HostTensorError, match="broadcast"):
            tdist.broadcast(torch.ones(2), src=0)
        on_device = [torch.zeros(3, device=device), torch.zeros(3).to(device), weight * 2, torch.zeros(3) + weight,
                     torch.zeros(()) + weight.sum(), torch.zeros_like(weight), torch.tensor(0.0).to("cpu")]
        for tensor in on_device:
            tdist.all_reduce(tensor)
        # object collectives move their own tensors to the group's device
        box = [{"a": 1}]
        tdist.broadcast_object_list(box, src=0)
        out = [None]
        tdist.all_gather_object(out, "x")
    tdist.all_reduce(torch.zeros(3))  # outside the context nothing is checked
    assert box == [{"a": 1}] and out == ["x"]


def test_the_suite_runs_in_strict_mode():
    import os

    assert os.environ.get(STRICT_DEVICE) == "1"


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("zero2", marks=pytest.mark.extended),
                                      pytest.param("fsdp", marks=pytest.mark.extended)])
def test_training_hands_collectives_device_tensors_only(tmp_path, strategy):
    """Two processes, strict: the loss window, the grad norm, validation, EMA and checkpoints (per step and at the
    epoch end, through close_mosaic's new loader) make no collective over a host tensor."""
    result = check(run_cli("train", *TINY, f"strategy={strategy}", "nproc=2", "batch=8", "nbs=8", "fraction=0.1",
                           "epochs=2", "close_mosaic=1", "ckpt_every=2", "workers=1", f"project={tmp_path}",
                           cwd=tmp_path, env={STRICT_DEVICE: "1"}))
    assert (tmp_path / "train" / "weights" / "last").is_dir()
    steps = read_csv(tmp_path / "train" / "steps.csv")
    assert len(steps) == 8 and all(0 <= float(r["data_s"]) <= float(r["step_s"]) for r in steps)
    assert re.search(r"data loading: waited \d+\.\ds of \d+\.\ds training \(\d+\.\d%, slowest rank\)", result.stdout)
