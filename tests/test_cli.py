"""The bad-input catalogue: every mistake gives one line naming the problem and the fix, exit code 2, no traceback,
no run folder. Most run in-process through `main` (the CLI's entry point; a few seconds each instead of a
process start); the last tests run the real command, with several processes, as a user would."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from parallel_yolo.cli import main
from parallel_yolo.data.demo import demo_dataset


def dataset(root: Path, *, label: str = "0 0.5 0.5 0.2 0.2", only_first: bool = False, val: bool = True) -> str:
    """A small data yaml of 4 demo images a split, labelled with `label` (only the first: the others valid)."""
    demo = Path(demo_dataset()).parent / "images" / "train"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i, source in enumerate(sorted(demo.iterdir())[:4]):
            shutil.copy(source, root / "images" / split / source.name)
            text = label if i == 0 or not only_first else "0 0.5 0.5 0.2 0.2"
            (root / "labels" / split / f"{source.stem}.txt").write_text(text + "\n")
    spec = {"path": str(root), "train": "images/train", "names": {0: "square", 1: "circle", 2: "triangle"},
            **({"val": "images/val"} if val else {})}
    (root / "data.yaml").write_text(yaml.safe_dump(spec))
    return str(root / "data.yaml")


def empty_images(root: Path) -> str:
    spec = dataset(root)
    for image in (root / "images" / "val").iterdir():
        image.unlink()
    return spec


def no_manifest(root: Path) -> str:
    (root / "ckpt").mkdir()
    return str(root / "ckpt")


LAUNCHED = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}

# name: (tokens, a needle the one line must contain, environment); {root} is the test's folder, and a callable in
# the tokens builds its input there
BAD = {
    "unknown key": (["epoch=3"], "did you mean epochs", {}),
    "wrong type": (["epochs=abc"], "expected an integer", {}),
    "negative epochs": (["epochs=-1"], "epochs=-1", {}),
    "unknown strategy": (["strategy=zero9"], "unknown", {}),
    "unknown precision": (["precision=fp8"], "precision=fp8", {}),
    "unknown optimizer": (["optimizer=Adagrad"], "optimizer=Adagrad: unknown", {}),
    "not key=value": (["epochs"], "key=value", {}),
    "batch not divisible": (["nproc=3", "batch=16"], "batch=15 or batch=18", {}),
    "single on two processes": (["nproc=2", "strategy=single"], "strategy=single", {}),
    "fp16 where DeepSpeed would cast BatchNorm": (["nproc=2", "strategy=zero2", "precision=fp16-mixed"],
                                                  "precision=bf16-mixed", {}),
    "sync_bn on cpu": (["nproc=2", "sync_bn=true", "device=cpu"], "sync_bn", {}),
    "cuda without gpu": (["device=0"], "device=0", {}),
    "missing data yaml": (["data=nowhere.yaml"], "data=nowhere.yaml", {}),
    "malformed data yaml": ([lambda root: (root / "bad.yaml").write_text("train: [unclosed\n") and
                             f"data={root / 'bad.yaml'}"], "bad.yaml", {}),
    "data yaml without val": ([lambda root: f"data={dataset(root, val=False)}"], "'val:'", {}),
    "empty image folder": ([lambda root: f"data={empty_images(root)}"], "no images in", {}),
    "class index >= nc": ([lambda root: f"data={dataset(root, label='7 0.5 0.5 0.2 0.2')}"],
                          "every label file is corrupt, e.g. ", {}),
    "coordinates outside [0, 1]": ([lambda root: f"data={dataset(root, label='0 1.5 0.5 0.2 0.2', only_first=True)}"],
                                   "1 of 4 label files are corrupt", {}),
    "imgsz not a multiple of the stride": (["imgsz=100"], "imgsz=96 or imgsz=128", {}),
    "missing model yaml": (["model=yolov8q.yaml"], "model=yolov8q.yaml", {}),
    "a head of no task": (["model=rtdetr-l.yaml"], "its last layer is RTDETRDecoder", {}),
    "missing local weights": (["model=missing.pt"], "nothing is downloaded", {}),
    "unused ultralytics key": (["patience=5"], "does not use", {}),
    "fraction out of range": (["fraction=1.5"], "fraction=1.5", {}),
    "micro batch not a divisor": (["batch=8", "micro_batch=3"], "micro_batch=3", {}),
    "missing recipe": (["cfg=nowhere.yaml"], "recipe file not found", {}),
    "timeout too short": (["timeout=1"], "timeout=1", {}),
    "negative max_restarts": (["max_restarts=-1"], "max_restarts=-1", {}),
    "missing checkpoint": (["resume=nowhere"], "resume=nowhere: not found", {}),
    "checkpoint folder without a manifest": ([lambda root: f"resume={no_manifest(root)}"], "manifest.json", {}),
    "nothing to resume under the project": (["resume=true"], "no checkpoint under project=", {}),
    "strategy= against the accelerate config": (["strategy=zero2"], "conflicts with the accelerate config",
                                                {**LAUNCHED, "ACCELERATE_USE_FSDP": "true"}),
    "nproc= against the launcher": (["nproc=2"], "the launcher started 1 processes", LAUNCHED),
}


@pytest.mark.parametrize("tokens,needle,environ", BAD.values(), ids=BAD.keys())
def test_bad_train_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, tokens, needle, environ):
    monkeypatch.chdir(tmp_path)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    tokens = [token(tmp_path) if callable(token) else token for token in tokens]
    assert main(["train", "epochs=1", "imgsz=64", "workers=0", *tokens, "project=runs"]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("parallel-yolo: error:") and needle in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_catalogue_size():
    assert len(BAD) + 3 >= 25  # and the three commands below


def test_unknown_command_and_val_without_checkpoint(workdir):
    assert run_cli("fly", cwd=workdir).returncode == 2
    result = run_cli("val", "checkpoint=nowhere", cwd=workdir)
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_mistake_found_by_rank_0_stops_every_rank_with_one_line(tmp_path):
    """Corrupt labels are found while rank 0 alone builds the label cache, the other rank waiting: both stop."""
    result = run_cli("train", f"data={dataset(tmp_path, label='7 0.5 0.5 0.2 0.2')}", "nproc=2", "epochs=1",
                     "imgsz=64", "batch=4", "workers=0", "project=runs", cwd=tmp_path, timeout=180)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Label class 7 exceeds" in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


def test_help_lists_keys(workdir):
    result = run_cli("help", cwd=workdir)
    assert result.returncode == 0 and "micro_batch" in result.stdout and "strategy" in result.stdout
