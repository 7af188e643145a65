"""The benchmark scripts parse, and the GPU check's pipeline runs end to end at a tiny size on CPU."""

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


@pytest.mark.slow
@pytest.mark.extended  # a benchmark script's smoke test: the training it runs is tested on its own above
def test_gpu_check_writes_its_json(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "MODEL": "yolov8n.yaml", "IMGSZ": "64", "BATCH": "4", "IMAGES": "24", "STEPS": "2",
           "STRATEGIES": "ddp fsdp", "OUT": str(tmp_path), "PEAK_TFLOPS": "1",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    trained = report["train_torchrun_1gpu"]
    assert [row["strategy"] for row in trained] == ["ddp", "fsdp"], trained
    assert all(row["images_per_s"] > 0 and row["mfu"] > 0 and 0 <= row["data_wait_fraction"] <= 1
               and row["peak_MiB"] > 0 and row["precision"] == "fp32" for row in trained), trained
    assert [row["strategy"] for row in report["compare"]] == ["ddp", "fsdp"]
    assert report["ultralytics"]["images_per_s"] > 0
