"""A rank that stops answering: the others stop within the collective timeout and name it; no endless hang."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import CKPT_RUN, rows, start_cli, wait_until, worker_pid


@pytest.mark.slow
def test_a_frozen_rank_is_named_and_the_run_stops_in_bounded_time(tmp_path):
    timeout = 15
    process = start_cli("train", *CKPT_RUN, "epochs=3", "strategy=ddp", "nproc=2", f"timeout={timeout}",
                        f"project={tmp_path}", "name=run", cwd=tmp_path)
    try:
        wait_until(lambda: rows(tmp_path / "run" / "steps.csv") >= 2, process)
        naming, frozen_rank = worker_pid(process.pid, rank=0), worker_pid(process.pid, rank=1)
        os.kill(frozen_rank, signal.SIGSTOP)  # alive, but never answers again
        frozen = time.time()
        # A hung process dies of the SIGTERM the launcher sends once rank 0 has failed; a stopped one holds it
        # until continued, and the launcher would wait 30 s before its SIGKILL: let the signal in after rank 0 ended.
        wait_until(lambda: ended(naming), process, timeout=timeout + 60)
        os.kill(frozen_rank, signal.SIGCONT)
        out, err = process.communicate(timeout=60)
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    took = time.time() - frozen
    print(f"frozen rank named and the group stopped {took:.1f}s after it froze (timeout={timeout})")
    assert process.returncode == 1
    named = [line for line in err.splitlines() if line.startswith("parallel-yolo: error:")]
    assert named and "rank 1 (last seen at" in named[0] and "stopped answering" in named[0], err[-3000:]
    assert took < timeout + 30


def ended(pid: int) -> bool:
    """Exited, reaped or not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True
