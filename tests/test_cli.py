"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, no run folder."""

from __future__ import annotations

import pytest

from conftest import run_cli

BAD = {
    "unknown key": (["epoch=3"], "did you mean epochs"),
    "wrong type": (["epochs=abc"], "expected an integer"),
    "negative epochs": (["epochs=-1"], "epochs=-1"),
    "unknown strategy": (["strategy=zero9"], "unknown"),
    "unknown precision": (["precision=fp8"], "precision=fp8"),
    "not key=value": (["epochs"], "key=value"),
    "batch not divisible": (["nproc=3", "batch=16"], "batch=15 or batch=18"),
    "single on two processes": (["nproc=2", "strategy=single"], "strategy=single"),
    "missing data yaml": (["data=nowhere.yaml"], "data=nowhere.yaml"),
    "missing model yaml": (["model=yolov8q.yaml"], "model=yolov8q.yaml"),
    "missing local weights": (["model=missing.pt"], "nothing is downloaded"),
    "unused ultralytics key": (["patience=5"], "does not use"),
    "fraction out of range": (["fraction=1.5"], "fraction=1.5"),
    "micro batch not a divisor": (["batch=8", "micro_batch=3"], "micro_batch=3"),
    "missing recipe": (["cfg=nowhere.yaml"], "recipe file not found"),
    "sync_bn on cpu": (["nproc=2", "sync_bn=true", "device=cpu"], "sync_bn"),
    "cuda without gpu": (["device=0"], "device=0"),
}


@pytest.mark.parametrize("tokens,needle", BAD.values(), ids=BAD.keys())
def test_bad_train_input_is_one_line_and_exit_2(workdir, tokens, needle):
    result = run_cli("train", *tokens, "project=runs", cwd=workdir, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (workdir / "runs").exists()


def test_unknown_command_and_val_without_checkpoint(workdir):
    assert run_cli("fly", cwd=workdir).returncode == 2
    result = run_cli("val", "checkpoint=nowhere", cwd=workdir)
    assert result.returncode == 2 and "not found" in result.stderr


def test_help_lists_keys(workdir):
    result = run_cli("help", cwd=workdir)
    assert result.returncode == 0 and "micro_batch" in result.stdout and "strategy" in result.stdout
