"""A rank killed mid-training: the launcher restarts the group, which resumes from the newest checkpoint the launch
wrote and ends with exactly the weights of an uninterrupted run (tests/conftest.py `uninterrupted`)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from conftest import CKPT_RUN, load_weights, read_csv, rows, start_cli, wait_until, worker_pid


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [pytest.param(s, marks=pytest.mark.extended) if s != "fsdp" else s
                                      for s in ("ddp", "zero2", "fsdp")])
def test_killed_rank_restarts_the_group_and_ends_with_the_uninterrupted_weights(strategy, uninterrupted, tmp_path):
    reference = uninterrupted(strategy, 2)
    process = start_cli("train", *CKPT_RUN, f"strategy={strategy}", "nproc=2", "max_restarts=1",
                        f"project={tmp_path}", "name=run", cwd=tmp_path)
    run = tmp_path / "run"
    try:
        wait_until(lambda: rows(run / "steps.csv") >= 3, process)  # step 3 done, step_2 the newest checkpoint
        victim = worker_pid(process.pid, rank=1)
        assert victim, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        killed_at, at_step = time.time(), len(read_csv(run / "steps.csv"))
        out, err = process.communicate(timeout=600)
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    assert process.returncode == 0, err[-3000:]
    resumed = [line for line in err.splitlines() if "restart 1 of this launch: resuming from" in line]
    assert len(resumed) == 1, err[-3000:]
    from_step = int(resumed[0].rsplit("step ", 1)[1].rstrip(")"))
    print(f"{strategy}: killed after step {at_step}, resumed from step {from_step} ({at_step - from_step} steps "
          f"lost), finished {time.time() - killed_at:.1f}s after the kill")
    assert from_step in (2, 4)
    # every step logged once, with the uninterrupted run's losses; the same weights, EMA and optimizer state
    assert [row["loss"] for row in read_csv(run / "steps.csv")] == \
        [row["loss"] for row in read_csv(reference / "steps.csv")]
    for stem in ("model", "ema", "optim"):
        want, got = load_weights(reference / "weights" / "last", stem), load_weights(run / "weights" / "last", stem)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), (stem, key)


@pytest.mark.slow
def test_a_killed_rank_without_restarts_is_named_in_one_line(tmp_path):
    """The agent stops rank 0 once rank 1 is gone; what the user reads is the cause, not rank 0's SIGTERM."""
    process = start_cli("train", *CKPT_RUN, "strategy=ddp", "nproc=2", f"project={tmp_path}", "name=run", cwd=tmp_path)
    try:
        wait_until(lambda: rows(tmp_path / "run" / "steps.csv") >= 1, process)
        os.kill(worker_pid(process.pid, rank=1), signal.SIGKILL)
        out, err = process.communicate(timeout=120)
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    lines = [line for line in err.splitlines() if line.startswith("parallel-yolo:")]
    assert process.returncode == 1, err[-3000:]
    assert lines == ["parallel-yolo: error: rank 1 was killed by SIGKILL; add max_restarts=N to restart the group "
                     "and resume"], err[-3000:]
