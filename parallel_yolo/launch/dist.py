"""Process-group plumbing: read whichever launcher started us, initialise the group, or start N local processes.

torchrun, `accelerate launch` and the `deepspeed` launcher all export RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT, so one reader serves them all; accelerate additionally tells us which strategy and
precision its config asked for (ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED, ACCELERATE_MIXED_PRECISION ...).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .._torch_internals import set_default_group_timeout
from ..config import ConfigError

__all__ = ["DistEnv", "read_env", "process_group", "init_process_group", "destroy", "launch_local",
           "cpu_threads_per_process", "loader_workers", "available_cores", "gather_object", "broadcast_object",
           "check_nproc"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launched: bool = False
    """True when a launcher started this process (the group must be initialised even for one process)."""
    accelerate: dict[str, str] | None = None
    """The ACCELERATE_* / FSDP_* variables accelerate exported, when it is the launcher."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env(environ: dict[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return DistEnv()
    world = int(env["WORLD_SIZE"])
    accelerate = {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    return DistEnv(
        rank=int(env["RANK"]),
        local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
        world_size=world,
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
        launched=True,
        accelerate=accelerate if any(k.startswith("ACCELERATE_") for k in accelerate) else None,
    )


def pick_device(env: DistEnv, requested: str | None) -> torch.device:
    """CUDA (one GPU per local rank) when present and not refused, else CPU."""
    if requested != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    if requested not in (None, "cpu"):
        raise ConfigError(f"device={requested}: no CUDA device is visible; use device=cpu or leave device out")
    return torch.device("cpu")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads_per_process(env: DistEnv) -> int:
    """Compute threads of a CPU process: the cores shared among the local processes (N processes with all cores
    each thrash a small machine). An explicit OMP_NUM_THREADS wins (torchrun sets it to 1 for multi-process runs)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, available_cores() // max(env.local_world_size, 1))


def loader_workers(requested: int, env: DistEnv) -> int:
    """Data workers per process, as Ultralytics' build_dataloader: the cores shared among the local processes, at
    most `requested`. Not OMP_NUM_THREADS, which launchers set to 1 for the compute threads, not the loaders."""
    return min(requested, max(1, available_cores() // max(env.local_world_size, 1)))


def init_process_group(env: DistEnv, device: torch.device, *, timeout_s: float = 1800.0) -> None:
    """nccl for CUDA, gloo for CPU; a no-op for a single process started without a launcher."""
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads_per_process(env))
    else:
        torch.cuda.set_device(device)
    if not env.launched or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # groups made later (DeepSpeed's copy of the world group, HSDP's mesh dimensions) take torch's module default,
    # not the world group's timeout: make it ours, so that `timeout=` bounds every collective
    set_default_group_timeout(timedelta(seconds=timeout_s))
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, store=_store(env),
                            timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    global _objects
    _objects = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


_objects = None
"""The group object collectives use: gloo over the same ranks, also beside NCCL, so that a pickled object
(metrics, a run folder, checkpoint reports) travels in host memory instead of being copied to a GPU and back with a
synchronisation. Made on CPU too, so that CPU runs make the calls GPU runs make."""


def _store(env: DistEnv):
    """The rendezvous store, with a namespace per restart under torch's elastic agent; None: torch's env:// default.

    The agent keeps one store across restarts and torch's env:// init adds no per-attempt prefix, so a restarted
    group would read the dead group's addresses and fail to connect ("Connection refused"). Elsewhere rank 0 hosts
    the store, unless the agent says it hosts it, as torch's own env:// init decides.
    """
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=env.world_size,
                          is_master=env.rank == 0 and not agent, multi_tenant=True)
    return dist.PrefixStore(f"parallel_yolo/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device, *, timeout_s: float = 1800.0):
    """The group for the body's duration. On success every rank meets in a barrier before the teardown: a rank
    that destroys gloo while a peer's last collective (say a gather it only sent to) is still in flight aborts
    ("terminate called without an active exception"). After an error there is no barrier, which could hang.
    A collective that fails because a peer died or froze is re-raised as PeerLost naming that rank."""
    from ..monitor.comm import STRICT_DEVICE, StrictDevice
    from .heartbeat import Heartbeat

    if env.launched:
        _die_with_launcher()
    init_process_group(env, device, timeout_s=timeout_s)
    beat = Heartbeat(rank=env.rank, world_size=env.world_size, timeout_s=timeout_s) \
        if dist.is_initialized() and env.world_size > 1 else None
    strict = StrictDevice() if os.environ.get(STRICT_DEVICE) == "1" else contextlib.nullcontext()
    try:
        with strict:
            yield
        if dist.is_initialized():
            dist.barrier()
    except RuntimeError as error:
        lost = beat.explain(error) if beat is not None else None
        if lost is None:
            raise
        raise lost from error
    finally:
        if beat is not None:
            beat.close()
        destroy()


def _die_with_launcher() -> None:
    """Ask Linux to kill this worker when its launcher dies. torch's launcher starts workers in sessions of their
    own, so a launcher killed with SIGKILL would otherwise leave them training, and saving, on their own."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # it died before the request was in place
        os._exit(1)


def gather_object(obj):
    """Every rank's value of a picklable object, in rank order, on every rank ([obj] without a group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_objects)
    return out


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank (obj itself without a group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_objects)
    return box[0]


def check_nproc(nproc: int | None, env: DistEnv) -> None:
    """`nproc=` under a launcher must agree with the processes it started."""
    if nproc and env.launched and nproc != env.world_size:
        raise ConfigError(f"nproc={nproc} but the launcher started {env.world_size} processes; drop nproc=")


def destroy() -> None:
    import gc

    global _objects
    if dist.is_initialized():
        gc.collect()  # drop wrapped models and pending work that reference the group before it goes
        dist.destroy_process_group()
    _objects = None


def launch_local(nproc: int, argv: list[str], *, max_restarts: int = 0) -> int:
    """Run `python -m parallel_yolo ARGV` in `nproc` local processes through torch's elastic launcher.

    The children see RANK / WORLD_SIZE like under torchrun, so they take the same code path as any launcher. When
    one fails, the others are stopped, and with `max_restarts` the whole group is started again (the restarted
    processes see TORCHELASTIC_RESTART_COUNT > 0 and resume). When the group fails for good, its cause is printed
    here in one line (see `first_cause`). A rank that finished its work but does not exit is ended and named
    (shutdown.ExitWatch). Returns 0, the failing rank's exit code, or 1 for a rank that did not exit.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .heartbeat import LAUNCHER_REPORTS
    from .shutdown import ExitWatch

    # the agent's log lines (closing signals, exit codes, restart notices) would bury the one line that matters
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=max_restarts, monitor_interval=0.1,
    )
    os.environ[LAUNCHER_REPORTS] = "1"  # the children inherit it
    failure = None
    with ExitWatch() as watch:
        try:
            elastic_launch(config, entrypoint=sys.executable)("-m", "parallel_yolo", *argv)
        except ChildFailedError as e:
            failure = first_cause(e.failures)
        finally:
            os.environ.pop(LAUNCHER_REPORTS, None)
    if watch.problems:  # ranks that finished but did not exit on their own: named as such, not as a crash
        for problem in watch.problems:
            print(f"parallel-yolo: error: {problem}", file=sys.stderr, flush=True)
        return 1
    if failure is None:
        return 0
    rank, exitcode, message = failure
    if message is not None:
        print(f"parallel-yolo: error: {message}", file=sys.stderr, flush=True)
    elif exitcode < 0:  # killed: it could not say so itself
        print(f"parallel-yolo: error: rank {rank} was killed by {signal.Signals(-exitcode).name}"
              f"{'' if max_restarts else '; add max_restarts=N to restart the group and resume'}",
              file=sys.stderr, flush=True)
    return exitcode if exitcode > 0 else 1


def first_cause(failures: dict) -> tuple[int, int, str | None]:
    """The rank whose failure explains a failed group, its exit code, and its error message if it reported one
    (torch's ProcessFailure per rank, read from the rank's TORCHELASTIC_ERROR_FILE).

    Once one rank fails the agent stops the others with SIGTERM (SIGKILL if one does not stop), so exit codes alone
    mislead: rank 0, printing an error every rank shares, may be stopped while it does. The cause is, in this order:
    the earliest error a rank reported (with the exit code it meant to return); a rank killed by a signal other
    than SIGTERM (it could not report itself; the others may then fail for want of it); a rank that failed with a
    traceback of its own; a SIGTERM, as from outside the group. Ties go to the lowest rank."""
    def cause(rank):
        failure = failures[rank]
        data, code = failure.error_file_data, failure.exitcode
        if "exitcode" in data:  # written by cli._report (torch's own record has no such key)
            return (0, failure.timestamp, rank), (rank, int(data["exitcode"]), data["message"])
        kind = 1 if code < 0 and code != -signal.SIGTERM else 2 if code > 0 else 3
        return (kind, 0, rank), (rank, code, None)

    return min(cause(rank) for rank in failures)[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
