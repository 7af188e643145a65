"""Which failed rank the local launcher reports when a group fails, and how a rank reports its own error."""

from __future__ import annotations

import signal

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from parallel_yolo.cli import _report
from parallel_yolo.launch.dist import first_cause
from parallel_yolo.launch.heartbeat import LAUNCHER_REPORTS

TERM, KILL = -signal.SIGTERM, -signal.SIGKILL


def failure(tmp_path, monkeypatch, rank: int, exitcode: int, reported: tuple[str, int] | None = None):
    """Rank `rank`'s failure as torch's agent reads it, after the rank reported `reported` (message, exit code)."""
    path = tmp_path / f"error_{rank}.json"
    if reported:
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
        _report(reported[0], exitcode=reported[1], every_rank=True)
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))


FULL, LOST = ("rank 0 could not write its shard", 2), ("rank 1 stopped answering", 1)


@pytest.mark.parametrize("ranks, cause", [
    # an error every rank shares: rank 0 was stopped by the agent after it reported, or before it could
    ({0: (TERM, FULL), 1: (2, FULL)}, (0, 2, FULL[0])),
    ({0: (TERM, None), 1: (2, FULL)}, (1, 2, FULL[0])),
    # rank 1 froze: rank 0 named it, and the agent killed the frozen rank after
    ({0: (1, LOST), 1: (KILL, None)}, (0, 1, LOST[0])),
    # rank 1 killed from outside before anyone could say so; rank 0 stopped by the agent or failing for want of it
    ({0: (TERM, None), 1: (KILL, None)}, (1, KILL, None)),
    ({0: (1, None), 1: (KILL, None)}, (1, KILL, None)),
    ({0: (TERM, None), 1: (1, None)}, (1, 1, None)),  # a traceback of rank 1's own
    ({1: (TERM, None), 0: (TERM, None)}, (0, TERM, None)),  # a SIGTERM from outside reaches every rank
])
def test_the_cause_of_a_failed_group_is_the_rank_that_failed_on_its_own(ranks, cause, tmp_path, monkeypatch):
    failures = {rank: failure(tmp_path, monkeypatch, rank, code, reported) for rank, (code, reported) in ranks.items()}
    assert first_cause(failures) == cause


@pytest.mark.parametrize("launcher_reports, restarts, prints", [
    (False, (0, 0), True), (True, (0, 0), False), (True, (0, 1), True), (True, (1, 1), False)])
def test_a_rank_prints_its_error_unless_our_launcher_reports_the_group(launcher_reports, restarts, prints,
                                                                       monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    if launcher_reports:
        monkeypatch.setenv(LAUNCHER_REPORTS, "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restarts[0]))
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", str(restarts[1]))
    _report("disk full", exitcode=2, every_rank=True)
    assert capsys.readouterr().err == ("parallel-yolo: error: disk full\n" if prints else "")


def test_loader_workers_follow_the_cores_per_local_process_not_omp_threads(monkeypatch):
    """As Ultralytics' build_dataloader: torchrun's OMP_NUM_THREADS=1 is for compute threads, not data workers."""
    import os

    from parallel_yolo.launch.dist import DistEnv, cpu_threads_per_process, loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads_per_process(DistEnv(local_world_size=8)) == 1
    assert loader_workers(8, DistEnv(local_world_size=8)) == 2
    assert loader_workers(8, DistEnv(local_world_size=1)) == 8
    assert loader_workers(0, DistEnv(local_world_size=1)) == 0
    assert loader_workers(8, DistEnv(local_world_size=32)) == 1


def _objects_worker(rank: int, world: int, port: int, queue) -> None:
    import torch
    import torch.distributed as tdist
    from conftest import rank_environment

    from parallel_yolo.launch import dist as pdist

    rank_environment(rank, world, port)
    env = pdist.read_env()
    with pdist.process_group(env, torch.device("cpu")):
        side = pdist._objects
        queue.put((rank, side is not None and side != tdist.group.WORLD, tdist.get_backend(side),
                   pdist.gather_object(rank * 10), pdist.broadcast_object(f"from {rank}")))
    queue.put((rank, pdist._objects))


def test_objects_travel_through_a_gloo_group_of_their_own():
    """Beside NCCL, pickled objects move in host memory (a gloo group over the same ranks); made on CPU too, so CPU
    runs make the same calls."""
    import multiprocessing

    import torch.multiprocessing as mp
    from conftest import free_port

    queue = multiprocessing.get_context("spawn").SimpleQueue()
    mp.spawn(_objects_worker, args=(2, free_port(), queue), nprocs=2, join=True)
    results = sorted((queue.get() for _ in range(4)), key=lambda r: (r[0], len(r)))
    for rank in (0, 1):
        after, during = results[2 * rank], results[2 * rank + 1]
        assert during[1:] == (True, "gloo", [0, 10], "from 0") and after[1] is None
