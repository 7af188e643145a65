"""Shared helpers: run the real CLI in fresh processes, on the demo dataset, in a throw-away folder."""

from __future__ import annotations

import csv
import datetime
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

# before the package is imported: its import sets Ultralytics' verbosity default (on) for a user's run
os.environ.setdefault("YOLO_VERBOSE", "False")
from parallel_yolo.tasks.task import TASKS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DETECT = TASKS["detect"]
THREE = {"nc": 3, "names": {0: "a", 1: "b", 2: "c"}}
"""A three-class dataset's description, for models built without data."""

# Augmentations off: with them, every process draws its own random crops, so runs could not be compared.
NO_AUGMENT = ["mosaic=0", "fliplr=0", "hsv_h=0", "hsv_s=0", "hsv_v=0", "translate=0", "scale=0"]
TINY = ["model=yolov8n.yaml", "data=demo", "imgsz=64", "epochs=1", "workers=0", "seed=0", "plots=false"]


# The suite's time budget. Tests marked `extended` (further members of a slow family whose representative runs in
# the default order) run after all others, and each starts only while the suite has used less than the budget;
# past it each is skipped with the reason, and the summary names them and the command that runs them. Their order
# turns by one place every day (UTC), so that where the budget cuts them short, a different one leads each day and
# none is left out for good. Measured on the 2-core machine the README names: the default tests take ~22 min,
# the extended ones ~12 more. A 22-minute budget keeps a run there near 23 minutes, and one on a machine twice as
# slow (~45 minutes, no extended test) well inside CI's 90. PARALLEL_YOLO_SUITE_BUDGET_MIN=inf runs them all;
# `python -m pytest -m extended` runs only them, with no budget.
BUDGET_MINUTES = float(os.environ.get("PARALLEL_YOLO_SUITE_BUDGET_MIN", "22"))
_START = time.monotonic()
_OVER_BUDGET: list[str] = []


def _extended(item) -> bool:
    return item.get_closest_marker("extended") is not None


def pytest_collection_modifyitems(config, items):
    if config.getoption("markexpr"):
        return  # an explicit marker selection runs what it names, in file order, with no budget
    extended = [item for item in items if _extended(item)]
    turn = datetime.date.today().toordinal() % max(len(extended), 1)
    items[:] = [item for item in items if not _extended(item)] + extended[turn:] + extended[:turn]


def pytest_runtest_setup(item):
    spent = (time.monotonic() - _START) / 60
    if _extended(item) and not item.config.getoption("markexpr") and spent > BUDGET_MINUTES:
        _OVER_BUDGET.append(item.nodeid)
        pytest.skip(f"extended, not started: the suite's budget of {BUDGET_MINUTES:g} min is spent ({spent:.1f} "
                    "min); `python -m pytest -m extended` runs it")


def pytest_terminal_summary(terminalreporter, config):
    if config.option.collectonly:
        return
    spent = (time.monotonic() - _START) / 60
    terminalreporter.write_line(f"parallel_yolo suite: {spent:.1f} min wall time (extended tests start within "
                                f"{BUDGET_MINUTES:g} min)")
    if _OVER_BUDGET:
        terminalreporter.write_line(f"NOT RUN, over the time budget: {len(_OVER_BUDGET)} extended tests "
                                    "(`python -m pytest -m extended` runs them):", red=True, bold=True)
        for nodeid in _OVER_BUDGET:
            terminalreporter.write_line(f"  {nodeid}", red=True)


def pytest_configure(config):
    # One demo dataset for the whole session, shared by every subprocess; runs never touch the user's cache.
    cache = Path(os.environ.get("PARALLEL_YOLO_TEST_CACHE", ROOT / ".pytest_cache" / "parallel_yolo"))
    os.environ["PARALLEL_YOLO_CACHE"] = str(cache)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("YOLO_VERBOSE", "False")
    # every process group the suite starts refuses host tensors in collectives, as NCCL would (comm.StrictDevice)
    os.environ["PARALLEL_YOLO_STRICT_DEVICE"] = "1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    # Ultralytics settings of the suite's own, its logger integrations off: the default (mlflow=True) would import
    # MLflow into every training of the suite (~2 s each); tests/engine/test_callbacks.py switches them on in its own folder
    os.environ["YOLO_CONFIG_DIR"] = str(cache / "ultralytics-settings")
    from ultralytics.utils import SETTINGS

    SETTINGS.update({key: False for key in ("mlflow", "tensorboard", "wandb", "clearml", "comet", "dvc", "raytune")})


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


def rank_environment(rank: int, world: int, port: int) -> None:
    """What a launcher would set for rank `rank` of `world` local processes (for workers started by mp.spawn)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def demo_train_set():
    """The demo dataset's training split at 64 px, as Ultralytics builds it (mosaic pipeline)."""
    from ultralytics.data.build import build_yolo_dataset

    from parallel_yolo.config import TrainConfig
    from parallel_yolo.data import loader as data
    from parallel_yolo.tasks import yolo

    hyp = yolo.hyp_namespace(TrainConfig(imgsz=64, batch=4), DETECT)
    hyp.imgsz = 64
    spec = data.resolve_dataset("demo")
    return build_yolo_dataset(hyp, spec["train"], 4, spec, mode="train", stride=32)


def tiny_batch() -> dict:
    """Two 64-px noise images with one box each, in the layout Ultralytics' loss takes."""
    import torch

    return {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]),
            "cls": torch.tensor([[0.0], [2.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.6, 0.2, 0.4]])}


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


def documented_pages() -> list[Path]:
    """The README, then the docs pages in the order of mkdocs.yml's nav (the site's own front page is the README)."""
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = [ROOT / "docs" / page for entry in nav for page in entry.values()]
    return [ROOT / "README.md", *(page for page in pages if page.is_file())]


def readme_commands() -> list[str]:
    """Every shell command of the ```bash blocks of the README and the docs pages, in order, as a new user types them:
    the install prefix (`pip install ... &&`) dropped (the package is installed) and the test command left out."""
    commands = []
    for page in documented_pages():
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.splitlines():
                line = re.sub(r"^pip install [^&]*&&\s*", "", line.strip())
                if line and not line.startswith("#") and "pytest" not in line:
                    commands.append(line)
    return commands


def run_readme_command(command: str, cwd: Path) -> float:
    """Run one README command as typed in a shell; returns its wall time."""
    start = time.time()
    result = subprocess.run(shlex.split(command), cwd=cwd, capture_output=True, text=True, timeout=900,
                            env={**os.environ})
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return time.time() - start


@pytest.fixture(scope="session")
def readme_demo(tmp_path_factory) -> Path:
    """The folder in which the README's first command (the demo: yolov8n, 2 processes, fsdp, 15 epochs) has run,
    once per session: test_readme goes on there with the README's other commands, and the tests that need a
    trained run use the demo's."""
    workdir = tmp_path_factory.mktemp("readme")
    (workdir / "configs").symlink_to(ROOT / "configs")
    run_readme_command(readme_commands()[0], workdir)
    return workdir


@pytest.fixture(scope="session")
def trained_run(readme_demo) -> Path:
    """The README demo's run folder: a training that detects something (mAP50 ~0.99), validated at its end."""
    return readme_demo / "runs" / "detect" / "train"


@pytest.fixture()
def one_rank_group(tmp_path):
    """A process group of this process alone (gloo): what strategies and collectives need, in-process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(str(tmp_path / "store"), 1))
    yield
    dist.destroy_process_group()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
