"""Name the rank that stopped answering when a collective fails.

A collective that times out (or loses its connection) only tells a rank that *something* went wrong. So every
rank publishes a heartbeat — a counter a thread bumps every few seconds, and what the rank is doing — into the
launcher's rendezvous store (torch's elastic agent hosts it, so a stopped worker does not take it down). When a
collective fails, the rank reads everyone's heartbeat twice a few seconds apart: a counter that did not move is a
rank that died or froze; if every counter moves, the rank furthest behind in its work is named.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta

__all__ = ["Heartbeat", "PeerLost", "progress", "LAUNCHER_REPORTS"]

_current: Heartbeat | None = None

LAUNCHER_REPORTS = "PARALLEL_YOLO_LAUNCHER_REPORTS"
"""Set by `nproc=N`'s launcher (dist.launch_local) for its processes: it prints the failed group's error itself, so
a failing rank only writes it for the launcher (cli._report)."""


class PeerLost(RuntimeError):
    """Another rank died or stopped answering: reported as one line, exit code 1."""


def progress(label: str) -> None:
    """Say what this rank does now ("step 12", "validation", "saving ..."); a no-op without a heartbeat."""
    if _current is not None:  # published by the heartbeat's thread within interval_s: no store write per iteration
        _current.progress += 1
        _current.label = label


class Heartbeat:
    def __init__(self, *, rank: int, world_size: int, timeout_s: float, interval_s: float = 2.0):
        global _current
        self.rank, self.world_size, self.timeout_s, self.interval_s = rank, world_size, timeout_s, interval_s
        self.address = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '29500')}"
        # a restarted group may meet in the same store: its heartbeats must not be read as the old group's
        self.prefix = f"parallel_yolo/heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.progress, self.label, self.beats = 0, "setup", 0
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._store = self._client()
        self.publish()
        self._thread = threading.Thread(target=self._run, name="parallel-yolo-heartbeat", daemon=True)
        self._thread.start()
        _current = self

    def close(self) -> None:
        global _current
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
        _current = None

    def explain(self, error: BaseException) -> PeerLost | None:
        """Why a collective failed, naming the rank; None when it is not a collective's failure, or every other
        rank is alive and not behind (then the error is this rank's own, and stays as it is)."""
        if not _from_a_collective(error):
            return None
        waited = f"the collective this rank waited in failed ({_first_line(error)}; timeout={self.timeout_s:g}s)"
        try:
            before = self._read()
            time.sleep(2.5 * self.interval_s)
            after = self._read()
        except RuntimeError:
            return PeerLost(f"{waited}; the rendezvous store at {self.address} does not answer either, so rank 0 "
                            "(or the launcher that hosts the store) has died or stopped")
        silent = [r for r in range(self.world_size) if r != self.rank
                  and (r not in after or (r in before and before[r]["beats"] == after[r]["beats"]))]
        if silent:
            where = ", ".join(f"rank {r} ({_doing(after.get(r))})" for r in sorted(silent))
            return PeerLost(f"{where} stopped answering: {waited}. It died or froze; its own output says why, if it "
                            "printed anything. Resume with resume=true once it is fixed")
        furthest = max(beat["progress"] for beat in after.values())
        behind = [r for r, beat in after.items() if beat["progress"] < furthest and r != self.rank]
        if behind:
            where = ", ".join(f"rank {r} ({_doing(after[r])})" for r in sorted(behind))
            return PeerLost(f"{where} fell behind the others and did not join the collective: {waited}")
        return None

    # ---- the store --------------------------------------------------------------------------------------------
    def _client(self):
        import torch.distributed as dist

        host, port = self.address.rsplit(":", 1)
        return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=10),
                             wait_for_workers=False)

    def publish(self) -> None:
        with self._lock:
            self.beats += 1
            self._store.set(f"{self.prefix}{self.rank}",
                            json.dumps({"beats": self.beats, "progress": self.progress, "label": self.label}))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish()
            except RuntimeError:  # the store went away: the group is being torn down
                return

    def _read(self) -> dict[int, dict]:
        keys = {r: f"{self.prefix}{r}" for r in range(self.world_size)}
        with self._lock:
            return {r: json.loads(self._store.get(key)) for r, key in keys.items() if self._store.check([key])}


def _from_a_collective(error: BaseException) -> bool:
    import torch.distributed as dist

    words = ("gloo", "nccl", "timed out", "timeout", "connection", "closed by peer", "pair", "socket")
    return isinstance(error, dist.DistError) or any(w in str(error).lower() for w in words)


def _doing(beat: dict | None) -> str:
    return f"last seen at {beat['label']}" if beat else "never reported"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]
