"""`python -m build` makes a wheel and an sdist of the tree; the wheel installs in a fresh virtual environment and
its `parallel-yolo` runs the demo (2 processes, fsdp) outside the repository; the sdist builds the same wheel."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile

import pytest
from conftest import ROOT


def _run(*command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
@pytest.mark.extended  # a fresh environment installs torch, DeepSpeed and Ultralytics: minutes
def test_the_wheel_installs_in_a_fresh_venv_and_runs_the_demo(tmp_path):
    pytest.importorskip("build", reason="the test extra: pip install -e '.[test]'")
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--outdir", dist, ROOT, timeout=900)
    wheel, sdist = next(dist.glob("*.whl")), next(dist.glob("*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("parallel_yolo/engine/trainer.py", "parallel_yolo/presets/fsdp.yaml", "parallel_yolo/config/train.py"):
        assert needed in names, needed
    # the sdist holds what the wheel is built from: the same files again
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "again", sdist,
         timeout=900)
    again = next((tmp_path / "again").glob("*.whl"))
    assert sorted(n for n in zipfile.ZipFile(again).namelist() if not n.endswith("RECORD")) == \
        sorted(n for n in names if not n.endswith("RECORD"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", wheel, timeout=1800)
    work = tmp_path / "work"
    work.mkdir()
    out = _run(env_dir / "bin" / "parallel-yolo", "train", "data=demo", "epochs=1", "imgsz=64", "nproc=2",
               "strategy=fsdp", "workers=0", "plots=false", cwd=work, timeout=900).stdout
    assert "done in" in out and (work / "runs" / "detect" / "train" / "weights" / "last" / "manifest.json").is_file()
