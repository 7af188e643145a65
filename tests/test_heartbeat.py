"""A rank that stops answering: the others stop within the collective timeout and name it; no endless hang."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import CKPT_RUN, rows, start_cli, wait_until, worker_pid


@pytest.mark.slow
def test_a_frozen_rank_is_named_and_the_run_stops_in_bounded_time(tmp_path):
    timeout = 15
    process = start_cli("train", *CKPT_RUN, "epochs=3", "strategy=ddp", "nproc=2", f"timeout={timeout}",
                        f"project={tmp_path}", "name=run", cwd=tmp_path)
    try:
        wait_until(lambda: rows(tmp_path / "run" / "steps.csv") >= 2, process)
        os.kill(worker_pid(process.pid, rank=1), signal.SIGSTOP)  # alive, but never answers again
        frozen = time.time()
        out, err = process.communicate(timeout=timeout + 120)
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    took = time.time() - frozen
    print(f"frozen rank named and the group stopped {took:.1f}s after it froze (timeout={timeout})")
    assert process.returncode == 1
    named = [line for line in err.splitlines() if line.startswith("parallel-yolo: error:")]
    assert named and "rank 1 (last seen at" in named[0] and "stopped answering" in named[0], err[-3000:]
    assert took < timeout + 60
