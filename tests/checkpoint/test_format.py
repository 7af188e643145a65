"""The checkpoint folder: what is in it, corruption detected and skipped, a checkpoint of another model refused,
and a process killed while saving never damaging what was saved before."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import CKPT_RUN, check, run_cli, start_cli, wait_until, worker_pid

from parallel_yolo import checkpoint


@pytest.fixture
def run(uninterrupted):
    return uninterrupted("zero2", 2)


@pytest.mark.slow
def test_every_rank_writes_its_part_and_the_manifest_lists_everything(run):
    folder = run / "weights" / "last"
    manifest = checkpoint.load_manifest(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "rank00000.safetensors",
                                                        "rank00001.safetensors"]
    sizes = [info["bytes"] for info in manifest["files"].values()]
    assert min(sizes) > 0.4 * max(sizes)  # replicated weights are split too, not written by rank 0 alone
    for key in ("strategy", "precision", "world_size", "step", "epoch", "batch", "model_yaml", "nc", "names",
                "train_args", "ranks", "ema_updates", "best_fitness", "scaler"):
        assert key in manifest, key
    assert manifest["step"] == 6 and manifest["world_size"] == 2 and len(manifest["ranks"]) == 2
    kinds = {key.split("/")[0] for key in manifest["tensors"]}
    assert kinds == {"model", "ema", "optim", "rank0", "rank1"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6"]


@pytest.mark.slow
def test_corrupted_shard_is_named_and_resume_falls_back(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in ("weights/last", "weights/best", "checkpoints/step_6"):
        shard = copy / name / "rank00001.safetensors"
        shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    result = run_cli("val", f"checkpoint={copy / 'weights' / 'last'}", cwd=tmp_path)
    assert result.returncode == 2 and "rank00001.safetensors" in result.stderr and "Traceback" not in result.stderr
    result = check(run_cli("train", f"resume={copy}", "max_steps=5", cwd=tmp_path))
    assert "rank00001.safetensors" in result.stderr and f"resuming from {copy / 'checkpoints' / 'step_4'}" in \
        result.stderr
    assert "at step 4" in result.stdout and checkpoint.load_manifest(copy / "weights" / "last")["step"] == 5


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(run, tmp_path):
    last = run / "weights" / "last"
    result = run_cli("train", f"resume={last}", "model=yolov8s.yaml", "max_steps=6", cwd=tmp_path)
    assert result.returncode == 2 and "trained with model=yolov8n.yaml" in result.stderr
    result = run_cli("train", f"resume={last}", "max_steps=4", cwd=tmp_path)
    assert result.returncode == 2 and "max_steps=4" in result.stderr  # nothing left to do: said, not re-run
    result = run_cli("val", f"checkpoint={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "manifest.json" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_killed_during_a_save_leaves_the_previous_checkpoints_intact(tmp_path):
    # yolov8s makes every save take long enough to be caught in the middle of it
    command = [sys.executable, "-m", "parallel_yolo", "train", *CKPT_RUN, "model=yolov8s.yaml", "epochs=4",
               "ckpt_every=1", "keep_last=20", "strategy=ddp", "nproc=2", f"project={tmp_path}", "name=run"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    checkpoints, deadline = tmp_path / "run" / "checkpoints", time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None:
            partial = [p for p in checkpoints.glob(".step_*") if any(p.glob("rank*"))]
            if partial and any(checkpoints.glob("step_*")):
                break
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert partial, "the run ended before a save could be interrupted"
    saved = sorted(checkpoints.glob("step_*"))
    for folder in saved:
        checkpoint.load_manifest(folder)  # complete and uncorrupted
    assert not (partial[0] / "manifest.json").exists()
    newest = max(int(p.name[5:]) for p in saved)
    # resume=true: the newest run under the project
    result = check(run_cli("train", "resume=true", f"project={tmp_path}", f"max_steps={newest + 1}", cwd=tmp_path))
    assert f"at step {newest}" in result.stdout
    assert not list(checkpoints.glob(".step_*")), "the half-written folder is cleaned up by the next save"
    assert json.loads((checkpoints / f"step_{newest + 1}" / "manifest.json").read_text())["step"] == newest + 1


@pytest.mark.slow
def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """Files may not grow past 64 KiB once step_2 is saved (RLIMIT_FSIZE: the write fails as on a full disk, with
    EFBIG instead of ENOSPC; a full file system cannot be made here without mount rights)."""
    import resource

    process = start_cli("train", *CKPT_RUN, "strategy=ddp", "nproc=2", f"project={tmp_path}", "name=run",
                        cwd=tmp_path)
    checkpoints = tmp_path / "run" / "checkpoints"
    try:
        wait_until(lambda: (checkpoints / "step_2" / "manifest.json").exists(), process)
        for rank in (0, 1):
            resource.prlimit(worker_pid(process.pid, rank), resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
        out, err = process.communicate(timeout=300)
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    lines = [line for line in err.splitlines() if line.strip()]
    assert process.returncode == 2 and len(lines) == 1, err[-3000:]
    # the next save (weights/last at the end of epoch 1, step 3) failed; nothing half-written is left
    assert "File too large" in lines[0] and "weights/last" in lines[0] and "intact" in lines[0], lines
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2"]
    assert not list((tmp_path / "run" / "weights").iterdir())
    checkpoint.load_manifest(checkpoints / "step_2")  # and it verifies


class _Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_a_crafted_manifest_runs_no_code(run, tmp_path):
    """Anyone who can write a checkpoint folder must not be able to run code on the ranks that load it. The
    random-generator states are numbers, and the model description is checked before Ultralytics builds it (its
    parse_model evaluates `act` and calls any name in its tasks module): a manifest carrying a pickle, an `act` to
    evaluate or a layer naming a function is refused in one line, before anything starts."""
    import base64
    import pickle
    import shutil

    marker = tmp_path / "executed"
    payload = base64.b64encode(pickle.dumps(_Payload(marker))).decode()
    pickle.loads(base64.b64decode(payload))  # the payload works: unpickling it does leave the marker
    assert marker.exists()
    marker.unlink()
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Payload(marker)))

    def layer(m):
        m["model_yaml"]["head"][-1] = [-1, 1, "torch_safe_load", [str(evil)]]

    # (edit, what the one line names, commands that load it: resume, val, consolidate share the checks)
    cases = {"rng": (lambda m: m["ranks"][1].update(rng={"rng": payload}), "random-generator states",
                     ["train", "val"]),
             "rng-torch": (lambda m: m["ranks"][0]["rng"].update(torch=payload), "random-generator states", []),
             "format-2": (lambda m: m.update(format_version=2, ranks=[{"rng": payload}] * 2), "format 2", []),
             "act": (lambda m: m["model_yaml"].update(act=f"__import__('os').system('touch {marker}')"), "act=",
                     ["train", "consolidate"]),
             "layer": (layer, "torch_safe_load", ["val"])}
    for name, (edit, said, commands) in cases.items():
        folder = tmp_path / name / "weights" / "last"
        shutil.copytree(run / "weights" / "last", folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        edit(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        if name.startswith(("rng", "format")):  # refused as the manifest is read, by every command alike
            with pytest.raises(checkpoint.CheckpointError, match=said):
                checkpoint.load_manifest(folder)
        arguments = {"train": ("train", f"resume={folder}", "epochs=3"), "val": ("val", f"checkpoint={folder}"),
                     "consolidate": ("consolidate", f"checkpoint={folder}", f"out={tmp_path / 'x.pt'}")}
        for command in (arguments[c] for c in commands):
            result = run_cli(*command, cwd=tmp_path)
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert result.returncode == 2 and len(lines) == 1, (name, command, result.stderr[-2000:])
            assert said in lines[0], (name, lines[0])
            assert not marker.exists(), f"{name} {command}: the crafted manifest ran code"
    assert not (tmp_path / "x.pt").exists()
