"""The benchmark scripts parse, each runs end to end at a tiny size on CPU and prints its summary (a script that
breaks fails here, not in front of the person measuring), and the GPU check's pipeline writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize("script", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_python_benchmarks_compile(script):
    compile(script.read_text(), str(script), "exec")


TINY_RUNS = {  # each script at a tiny size, and a line its summary prints
    "exit.py": (["pairs=1"], "the quick exit saves"),
    "optimizer_step.py": (["model=yolov8n.yaml", "strategies=ddp,fsdp", "optimizers=SGD", "repeats=2"], "x ddp)"),
    "checkpoint.py": (["model=yolov8n.yaml", "imgsz=64", "strategies=ddp,fsdp"], "fsdp"),
    "compare.py": (["model=yolov8n.yaml", "nprocs=2", "imgsz=64", "steps=2"], "met"),
    "musgd.py": (["model=yolov8n.yaml", "imgsz=64", "steps=2", "strategies=ddp,fsdp"], "MuSGD model states"),
    "activation_checkpointing.py": (["model=yolov8n.yaml", "imgsz=64", "steps=2", "modes=all"], "+all: activations"),
    "vs_ultralytics.py": (["epochs=1", "rounds=1"], '"summary"'),
    "upload.py": (["epochs=1", "imgsz=64", "plots=false"], "mean wall time"),
    "tasks.py": (["tasks=segment,classify", "epochs=1", "images=16", "imgsz=64", "seeds=1"], '"summary"'),
}


def test_every_python_benchmark_has_a_tiny_run():
    """A new benchmark gets a tiny run below, or a reason here why it has none."""
    without = {"sharded_init.py": "its second part needs a model no process can hold whole (minutes, 4 processes)"}
    assert {p.name for p in (ROOT / "benchmarks").glob("*.py")} == set(TINY_RUNS) | set(without)


@pytest.mark.slow
@pytest.mark.extended  # a benchmark's smoke test: what it measures is tested on its own
@pytest.mark.parametrize("script", sorted(TINY_RUNS))
def test_a_benchmark_runs_at_a_tiny_size(script, tmp_path):
    args, summary = TINY_RUNS[script]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert summary in result.stdout, result.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.extended  # a benchmark script's smoke test: the training it runs is tested on its own above
def test_gpu_check_writes_its_json(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "MODEL": "yolov8n.yaml", "IMGSZ": "64", "BATCH": "4", "IMAGES": "24", "STEPS": "2",
           "STRATEGIES": "ddp fsdp", "OUT": str(tmp_path), "PEAK_TFLOPS": "1",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert (tmp_path / "gpu_check.json").exists(), result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    trained = report["train_torchrun_1gpu"]
    assert [row["strategy"] for row in trained] == ["ddp", "fsdp"], trained
    assert all(row["images_per_s"] > 0 and row["mfu"] > 0 and 0 <= row["data_wait_fraction"] <= 1
               and row["peak_MiB"] > 0 and row["precision"] == "fp32" for row in trained), trained
    assert [row["strategy"] for row in report["compare"]] == ["ddp", "fsdp"]
    assert report["ultralytics"]["images_per_s"] > 0
