"""How a parallel-yolo process ends once its work is done, and what happens when it does not.

A rank's exit (`finish`): Python's interpreter teardown (clearing the torch, DeepSpeed and Ultralytics modules) costs
about a second per process and every launch waits for it (benchmarks/exit.py measures it), so `finish` does what
that teardown guarantees and skips the rest, in the order Python's own shutdown (Py_FinalizeEx) keeps:
threading's exit hooks, then a join of every non-daemon thread (both in `threading._shutdown`, the very function
the interpreter calls: `concurrent.futures` wakes its idle workers in such a hook, so a join before it waits forever
on any live ThreadPoolExecutor, torch.compile's included), then the atexit handlers, then the standard streams;
then os._exit with the command's code. A Python without `threading._shutdown` gets its plain exit.

A rank that still does not exit (a library thread that never ends, a C call that holds the interpreter) is a failure
the user must hear about, and it must not hold a finished run forever:
- the rank itself: `GRACE_S` after its work ended, a daemon thread names the threads still running, prints every
  thread's stack and ends the process with exit code 1 (under any launcher: torchrun, accelerate, srun ...);
- the `nproc=N` launcher (`ExitWatch`, restarts included): each rank notes in a folder the launcher named that it
  finished; a rank still running `LAUNCHER_GRACE_S` after its note is named and killed, for a rank that cannot run
  even its own watchdog. The launch then exits 1, with the run's results as the rank wrote them before it finished.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn

__all__ = ["finish", "ExitWatch", "DONE_DIR", "GRACE_S", "LAUNCHER_GRACE_S"]

DONE_DIR = "PARALLEL_YOLO_DONE_DIR"
"""The folder in which the ranks of an `nproc=N` launch note that they finished (set by ExitWatch, inherited)."""

GRACE_S = float(os.environ.get("PARALLEL_YOLO_EXIT_GRACE_S", "15"))
"""How long a rank's exit may take after its work ended (threads, atexit handlers) before the rank ends itself;
PARALLEL_YOLO_EXIT_GRACE_S sets it (a logger that uploads at exit may need longer)."""

LAUNCHER_GRACE_S = GRACE_S + 10
"""How long after a rank noted that it finished the launcher waits for it to exit before it kills it: the rank's
own grace first, so that it can print its threads' stacks."""


def finish(code: int) -> NoReturn:
    """End this process with `code` after its work returned: Python's shutdown order, without the module teardown."""
    _note("done", threads=_running_threads())
    threading.Thread(target=_overdue, args=(GRACE_S,), name="parallel-yolo-exit-watchdog", daemon=True).start()
    python_shutdown = getattr(threading, "_shutdown", None)
    if python_shutdown is None:
        sys.exit(code)
    python_shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away (`| head`), a closed stream
            stream.flush()
    os._exit(code)


def _running_threads() -> list[str]:
    """The non-daemon threads other than the main one: what an exit waits for."""
    return [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]


def _who() -> str:
    return f"rank {os.environ['RANK']}" if "RANK" in os.environ else "the process"


def _overdue(grace: float) -> None:
    time.sleep(grace)
    threads = _running_threads()
    still = f"non-daemon threads still running: {', '.join(threads)}" if threads else "no thread of its own is left"
    message = (f"{_who()} finished its work {grace:g} s ago but has not exited ({still}; its threads' stacks are "
               "in its output): ended with exit code 1. What it wrote before it finished is kept")
    told = _note("overdue", message=message)
    with contextlib.suppress(Exception):
        # under `nproc=N` the launcher prints the message once for the run; the stacks are the rank's own to print
        print(f"parallel-yolo: {_who()}'s threads, {grace:g} s after it finished (it did not exit):" if told else
              f"parallel-yolo: error: {message}", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    os._exit(1)


def _note(kind: str, **data) -> bool:
    """Tell the launcher, if it asked (DONE_DIR), what this rank did: `done` or `overdue`. True if it was told."""
    folder = os.environ.get(DONE_DIR)
    if not folder or "RANK" not in os.environ:
        return False
    name = f"{kind}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}-{os.environ['RANK']}.json"
    try:
        partial = Path(folder) / f".{name}.{os.getpid()}"
        partial.write_text(json.dumps({"rank": int(os.environ["RANK"]), "pid": os.getpid(), **data}))
        partial.replace(Path(folder) / name)  # whole or not at all for the launcher's reader
    except OSError:  # the launcher is gone: nobody to tell
        return False
    return True


class ExitWatch:
    """The launcher's side: the ranks' folder for their notes, and a thread that ends a rank still running
    `grace` seconds after it noted that it finished. `problems` lists, after the launch, every rank that did not
    exit on its own, in one line each."""

    def __init__(self, grace: float = LAUNCHER_GRACE_S, poll_s: float = 0.5):
        self.grace, self.poll_s, self.problems = grace, poll_s, []
        self._stop, self._seen = threading.Event(), set()

    def __enter__(self) -> ExitWatch:
        self.folder = Path(tempfile.mkdtemp(prefix="parallel-yolo-exit-"))
        os.environ[DONE_DIR] = str(self.folder)  # the ranks the launcher starts inherit it
        self._thread = threading.Thread(target=self._watch, name="parallel-yolo-exit-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        os.environ.pop(DONE_DIR, None)
        for note in sorted(self.folder.glob("overdue-*.json")):
            with contextlib.suppress(OSError, ValueError):
                self.problems.append(json.loads(note.read_text())["message"])
        shutil.rmtree(self.folder, ignore_errors=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            for note in self.folder.glob("done-*.json"):
                if note.name in self._seen:
                    continue
                with contextlib.suppress(OSError, ValueError):
                    if time.time() - note.stat().st_mtime >= self.grace:
                        self._seen.add(note.name)
                        self._end(json.loads(note.read_text()))

    def _end(self, done: dict) -> None:
        if not _alive(done["pid"]):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(done["pid"], signal.SIGKILL)
        threads = ", ".join(done.get("threads") or []) or "none"
        self.problems.append(f"rank {done['rank']} finished its work but had not exited {self.grace:g} s later: "
                             f"the launcher ended it (SIGKILL). Non-daemon threads it ran when it finished: {threads}. "
                             "What it wrote before it finished is kept")


def _alive(pid: int) -> bool:
    """Running, and not a zombie that its parent has yet to reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
