"""parallel_yolo/launch/shutdown.py through the real entry points: a command exits in Python's own shutdown order whatever
threads a library left (a live ThreadPoolExecutor, as torch.compile's inductor leaves one), and a rank whose exit
hangs after its work is named and ended, by itself or by the `nproc=N` launcher, with the run's results kept.

The "library" is a sitecustomize module on PYTHONPATH, which Python imports at start in every process of the
command: the code under test is not touched."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import TINY, read_csv, run_cli

from parallel_yolo.launch import shutdown

GRACE_S = 2.0  # the rank's exit grace in these tests (PARALLEL_YOLO_EXIT_GRACE_S); the launcher's is 10 s more


def library(folder: Path, code: str) -> dict:
    """The environment of a command whose processes import `code` at start, as a library imported by them would."""
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(code))
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
            "PARALLEL_YOLO_EXIT_GRACE_S": str(GRACE_S)}


ORDER = """
    import atexit, concurrent.futures, os, threading, time

    def note(word):
        with open(os.environ["ORDER_FILE"], "a") as f:
            f.write(word + "\\n")

    pool = concurrent.futures.ThreadPoolExecutor(2)  # idle workers, woken only by Python's thread-exit hook
    pool.submit(time.sleep, 0.1).result()
    threading.Thread(target=lambda: (time.sleep(1), note("thread"))).start()  # non-daemon: the exit joins it
    atexit.register(note, "atexit")
"""


@pytest.mark.parametrize("entry", ["console script", "python -m"])
def test_a_live_thread_pool_does_not_hold_the_exit_and_python_order_is_kept(entry, tmp_path):
    env = {**library(tmp_path / "lib", ORDER), "ORDER_FILE": str(tmp_path / "order")}
    command = [str(Path(sys.executable).with_name("parallel-yolo")), "help"] if entry == "console script" else \
        [sys.executable, "-m", "parallel_yolo", "help"]
    start = time.time()
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=20,
                            env={**os.environ, **env})  # the exit before the fix waits forever on the pool
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: parallel-yolo" in result.stdout
    assert time.time() - start < 10
    # Python's own order: non-daemon threads joined (after the pool's hook woke its workers), then atexit
    assert (tmp_path / "order").read_text().split() == ["thread", "atexit"]


STUCK_THREAD = """
    import threading

    threading.Thread(target=threading.Event().wait, name="stuck-library-thread").start()  # never ends
"""


def test_a_process_whose_exit_hangs_ends_itself_and_tells_the_launcher(tmp_path):
    """Under any launcher the rank's own watchdog ends it; under `nproc=N` the launcher hears of it (ExitWatch)."""
    env = {**library(tmp_path / "lib", STUCK_THREAD), "RANK": "1"}
    start = time.time()
    with shutdown.ExitWatch(grace=GRACE_S + 10) as watch:
        result = run_cli("help", cwd=tmp_path, env=env, timeout=GRACE_S + 30)
    took = time.time() - start
    assert result.returncode == 1, result.stderr[-2000:]
    assert GRACE_S <= took < GRACE_S + 8, took
    assert "rank 1's threads" in result.stderr and 'File "' in result.stderr  # every thread's stack
    assert len(watch.problems) == 1 and "rank 1 finished its work" in watch.problems[0]
    assert "stuck-library-thread" in watch.problems[0], watch.problems
    # without a launcher the process says it in its own words
    result = run_cli("help", cwd=tmp_path, env=library(tmp_path / "lib", STUCK_THREAD), timeout=GRACE_S + 30)
    errors = [line for line in result.stderr.splitlines() if line.startswith("parallel-yolo: error:")]
    assert result.returncode == 1 and len(errors) == 1 and "stuck-library-thread" in errors[0], result.stderr


# a C call that holds the interpreter at exit: the rank cannot run its own watchdog, only the launcher can end it
HOLDS_THE_INTERPRETER = """
    import atexit, ctypes, os

    if os.environ.get("RANK") == "0":
        atexit.register(lambda: ctypes.PyDLL(None).sleep(3600))
"""


@pytest.mark.slow
def test_a_rank_whose_exit_hangs_is_named_and_killed_by_the_launcher_with_the_results_kept(tmp_path):
    start = time.time()
    result = run_cli("train", *TINY, "batch=8", "max_steps=2", "val=false", "strategy=ddp", "nproc=2",
                     f"project={tmp_path}", "name=run", cwd=tmp_path, timeout=300,
                     env=library(tmp_path / "lib", HOLDS_THE_INTERPRETER))
    took = time.time() - start
    errors = [line for line in result.stderr.splitlines() if line.startswith("parallel-yolo: error:")]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "done in" in result.stdout
    assert len(errors) == 1 and "rank 0 finished its work" in errors[0] and "SIGKILL" in errors[0], errors
    assert took < 240, took
    # the results written before the ranks finished are all there
    assert len(read_csv(tmp_path / "run" / "steps.csv")) == 2
    assert (tmp_path / "run" / "weights" / "last" / "manifest.json").is_file()


@pytest.mark.slow
@pytest.mark.extended
def test_a_compiled_sharded_run_exits_soon_after_its_last_step(tmp_path):
    """The issue's command: compile=true, fsdp, 2 processes, a cold inductor cache (inductor leaves an executor)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    process = subprocess.Popen([sys.executable, "-m", "parallel_yolo", "train", *TINY, "batch=8", "max_steps=2",
                                "val=false", "strategy=fsdp", "nproc=2", "compile=true", f"project={tmp_path}",
                                "name=run"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, start_new_session=True)
    done_at = None
    try:
        for line in process.stdout:
            if "done in" in line:
                done_at = time.time()
                break
        assert done_at, "the run ended without printing done"
        process.wait(timeout=shutdown.LAUNCHER_GRACE_S + 30)  # the default graces: nothing set here
        exited_in = time.time() - done_at
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    print(f"exited {exited_in:.1f}s after done")
    assert process.returncode == 0
    assert exited_in < shutdown.GRACE_S  # exited by itself, not by a watchdog
