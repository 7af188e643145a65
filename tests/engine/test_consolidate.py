"""`parallel-yolo consolidate`: one .pt / .safetensors from shards, bit for bit, usable by Ultralytics itself."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import check, load_weights, read_csv, run_cli


@pytest.mark.slow
def test_consolidated_pt_is_an_ultralytics_checkpoint_with_the_same_map(trained_run, tmp_path):
    from safetensors.torch import load_file
    from ultralytics import YOLO

    last = trained_run / "weights" / "last"
    trained = read_csv(trained_run / "results.csv")[-1]
    assert float(trained["metrics/mAP50(B)"]) > 0.05, "the fixture run should detect something"
    check(run_cli("consolidate", f"checkpoint={last}", f"out={tmp_path / 'best.pt'}", cwd=tmp_path))
    check(run_cli("consolidate", f"checkpoint={last}", f"out={tmp_path / 'best.safetensors'}", cwd=tmp_path))
    shards = load_weights(last, "ema")
    flat = load_file(str(tmp_path / "best.safetensors"))
    model = YOLO(str(tmp_path / "best.pt"))
    state = model.model.state_dict()
    assert shards.keys() == flat.keys() == state.keys()
    assert all(torch.equal(shards[k], flat[k]) and torch.equal(shards[k], state[k]) for k in shards)

    check(run_cli("val", f"checkpoint={last}", "batch=32", f"project={tmp_path}", "name=shards", cwd=tmp_path))
    from_shards = json.loads((tmp_path / "shards" / "val.json").read_text())
    assert from_shards["metrics/mAP50-95(B)"] == pytest.approx(float(trained["metrics/mAP50-95(B)"]), abs=1e-5)
    metrics = model.val(imgsz=128, batch=32, plots=False, verbose=False, project=str(tmp_path), name="yolo")
    # Ultralytics fuses Conv+BN before validating: the same weights, summed in another order
    assert metrics.box.map == pytest.approx(from_shards["metrics/mAP50-95(B)"], abs=2e-3)
    assert metrics.box.map50 == pytest.approx(from_shards["metrics/mAP50(B)"], abs=2e-3)
    assert len(model.predict(torch.rand(1, 3, 128, 128), verbose=False)) == 1


@pytest.mark.slow
def test_consolidated_pt_exports_to_onnx(trained_run, tmp_path):
    pytest.importorskip("onnx")
    from ultralytics import YOLO

    check(run_cli("consolidate", f"checkpoint={trained_run / 'weights' / 'last'}", f"out={tmp_path / 'm.pt'}",
                  cwd=tmp_path))
    exported = YOLO(str(tmp_path / "m.pt")).export(format="onnx", imgsz=128, simplify=False)
    assert exported.endswith(".onnx") and (tmp_path / "m.onnx").stat().st_size > 1e6


def test_consolidate_refuses_bad_requests(tmp_path):
    result = run_cli("consolidate", f"checkpoint={tmp_path}", "out=x.txt", cwd=tmp_path)
    assert result.returncode == 2 and "out=x.txt" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("consolidate", f"checkpoint={tmp_path / 'none'}", "out=x.pt", cwd=tmp_path)
    assert result.returncode == 2 and "not a checkpoint folder" in result.stderr
    result = run_cli("consolidate", f"checkpoint={tmp_path}", "out=x.pt", cwd=tmp_path)
    assert result.returncode == 2 and "manifest.json" in result.stderr
