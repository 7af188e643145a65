"""Shared helpers: run the real CLI in fresh processes, on the demo dataset, in a throw-away folder."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Augmentations off: with them, every process draws its own random crops, so runs could not be compared.
NO_AUGMENT = ["mosaic=0", "fliplr=0", "hsv_h=0", "hsv_s=0", "hsv_v=0", "translate=0", "scale=0"]
TINY = ["model=yolov8n.yaml", "data=demo", "imgsz=64", "epochs=1", "workers=0", "seed=0"]


def pytest_configure(config):
    # One demo dataset for the whole session, shared by every subprocess; runs never touch the user's cache.
    cache = Path(os.environ.get("PARALLEL_YOLO_TEST_CACHE", ROOT / ".pytest_cache" / "parallel_yolo"))
    os.environ["PARALLEL_YOLO_CACHE"] = str(cache)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("YOLO_VERBOSE", "False")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)


def run_cli(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None, module: bool = True
            ) -> subprocess.CompletedProcess:
    """`python -m parallel_yolo ARGS` in `cwd`; output captured as text."""
    command = [sys.executable, "-m", "parallel_yolo", *args] if module else list(args)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    """`python -m parallel_yolo ARGS` in the background, in a session of its own (os.killpg ends everything)."""
    return subprocess.Popen([sys.executable, "-m", "parallel_yolo", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the training process of `rank` started (directly or not) by process `launcher`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            pid, parents = int(proc.name), []
            while pid > 1 and len(parents) < 10:
                pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.append(pid)
        except (OSError, ValueError, IndexError):
            continue
        if launcher in parents and f"RANK={rank}".encode() in environ and b"parallel_yolo" in \
                (proc / "cmdline").read_bytes():
            return int(proc.name)
    return None


def wait_until(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until `condition()` holds; fails if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError(f"not reached in {timeout}s")


def free_port() -> int:
    """A TCP port nobody listens on now, for a rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(csv_path: Path) -> int:
    return max(len(csv_path.read_text().splitlines()) - 1, 0) if csv_path.exists() else 0


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def load_weights(folder: Path, stem: str = "model") -> dict:
    """Full tensors of a checkpoint folder: `model` or `ema` weights and buffers, or `optim` state."""
    from parallel_yolo import checkpoint

    return checkpoint.Reader(folder, checkpoint.load_manifest(folder)).state_dict(f"{stem}/")


# Uninterrupted reference runs for tests/checkpoint, one per (strategy, processes): 6 optimizer steps (2 epochs of
# 3 batches, mosaic on in the first and closed in the second), a checkpoint every 2 steps (step_2, step_4, step_6).
CKPT_RUN = [*TINY, "epochs=2", "close_mosaic=1", "batch=8", "nbs=8", "fraction=0.09", "val=false", "ckpt_every=2",
            "optimizer=AdamW", "lr0=0.002"]


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    runs = {}

    def get(strategy: str, nproc: int):
        if (strategy, nproc) not in runs:
            project = tmp_path_factory.mktemp(f"{strategy}{nproc}")
            extra = ["micro_batch=4"] if nproc == 1 else []  # the per-forward batch of the 2-process runs
            check(run_cli("train", *CKPT_RUN, *extra, f"strategy={strategy}", f"nproc={nproc}",
                          f"project={project}", "name=run", cwd=project))
            runs[strategy, nproc] = project / "run"
        return runs[strategy, nproc]

    return get


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A short demo training (2 processes, ddp) that detects something: mAP50 well above 0."""
    project = tmp_path_factory.mktemp("trained")
    check(run_cli("train", "model=yolov8n.yaml", "data=demo", "imgsz=128", "epochs=6", "batch=16", "nbs=16",
                  "close_mosaic=2", "val=false", "workers=0", "nproc=2", "strategy=ddp", f"project={project}",
                  "name=run", cwd=project))
    return project / "run"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
