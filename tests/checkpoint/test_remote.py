"""upload=s3://...: checkpoints mirrored to a real S3-compatible server (moto's, on 127.0.0.1, started here), with the
store stopped mid-run, and read back by resume=, val and consolidate."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CKPT_RUN, check, free_port, read_csv, run_cli, wait_until

from parallel_yolo import checkpoint
from parallel_yolo.checkpoint import remote, rng
from parallel_yolo.config import ConfigError

BUCKET = "pyolo-test"


class Store:
    """moto's S3 server in this process, stoppable and restartable on the same port (its objects survive)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port, self.server_class = free_port(), ThreadedMotoServer
        self.server = None
        self.start()

    def start(self) -> None:
        self.server = self.server_class(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                            aws_secret_access_key="test", region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.fixture(scope="module")
def store():
    pytest.importorskip("moto.server")
    s = Store()
    saved = {k: os.environ.get(k) for k in s.env}
    os.environ.update(s.env)
    yield s
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s.stop()


def fake_checkpoint(folder: Path, step: int, numel: int = 1000) -> Path:
    """A complete one-rank checkpoint whose tensor holds `step` everywhere."""
    tmp = checkpoint.begin(folder)
    entry = checkpoint.write_shard(tmp, 0, [checkpoint.Slab("model/w", (numel,), 0, numel,
                                                            torch.full((numel,), float(step)))])
    return checkpoint.commit(tmp, folder, {"step": step, "world_size": 1, "ranks": [{"rng": rng.capture()}]}, [entry])


def test_mirror_keeps_the_last_few_and_fetch_takes_the_newest(store, tmp_path, monkeypatch):
    monkeypatch.setenv("PARALLEL_YOLO_CACHE", str(tmp_path / "cache"))
    run, url = tmp_path / "run", f"s3://{BUCKET}/unit/run"
    mirror = remote.Mirror(url, run=run, keep_last=2)
    for step in (1, 2, 3):
        mirror.add(fake_checkpoint(run / "checkpoints" / f"step_{step}", step))
    mirror.add(fake_checkpoint(run / "weights" / "last", 3))
    checkpoint.duplicate(run / "weights" / "last", run / "weights" / "best")
    mirror.add(run / "weights" / "best")
    assert mirror.close(wait=60) == []
    folders = {k.rsplit("/", 1)[0] for k in store.keys("unit/run/")}
    assert folders == {f"unit/run/{f}" for f in ("checkpoints/step_2", "checkpoints/step_3", "weights/last",
                                                 "weights/best")}, folders
    assert not (run / ".upload").exists()
    # the store's own SHA-256 of the bytes it holds (best copied on the store from last) is the manifest's
    head = store.client().head_object(Bucket=BUCKET, Key="unit/run/weights/best/rank00000.safetensors",
                                      ChecksumMode="ENABLED")
    sha256 = checkpoint.load_manifest(run / "weights" / "best")["files"]["rank00000.safetensors"]["sha256"]
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == sha256
    local = remote.fetch(url)  # a run prefix: the newest complete checkpoint
    assert checkpoint.load_manifest(local)["step"] == 3 and remote.is_fetched(local)
    assert remote.fetch(f"{url}/checkpoints/step_2") == Path(tmp_path / "cache" / "s3" / BUCKET / "unit/run/"
                                                             "checkpoints/step_2")
    # a run folder mirrored afresh (a resumed run, another prefix): what it holds goes first, without being asked
    assert remote.Mirror(f"s3://{BUCKET}/unit/again", run=run, keep_last=2).close(wait=60) == []
    assert {k.rsplit("/", 1)[0] for k in store.keys("unit/again/")} == {f.replace("/run/", "/again/") for f in folders}


def test_a_half_uploaded_checkpoint_never_counts(store, tmp_path, monkeypatch, capfd):
    """An upload that dies after the data files and before the manifest: the store shows no complete weights/last
    (not the previous version's manifest beside the new files either), and fetch falls back to what is complete."""
    monkeypatch.setenv("PARALLEL_YOLO_CACHE", str(tmp_path / "cache"))
    run, url = tmp_path / "run", f"s3://{BUCKET}/half/run"
    mirror = remote.Mirror(url, run=run, keep_last=3)
    mirror.add(fake_checkpoint(run / "checkpoints" / "step_1", 1))
    mirror.add(fake_checkpoint(run / "weights" / "last", 1))
    assert mirror.close(wait=60) == []

    put = remote._Uploader._put

    def dies_after_the_data(self, path, key, sha256, size):
        put(self, path, key, sha256, size)
        raise ConnectionError("the store went away")

    # the uploader process's work, here in this process to make its connection die
    monkeypatch.setattr(remote._Uploader, "_put", dies_after_the_data)
    uploader = remote._Uploader(url, keep_last=3)
    uploader.add("weights/last", shutil.copytree(fake_checkpoint(run / "weights" / "last", 2, numel=2000),
                                                 tmp_path / "stage"))
    assert uploader.close(wait=3) == ["weights/last"]
    keys = store.keys("half/run/weights/last/")
    assert keys == ["half/run/weights/last/rank00000.safetensors"], keys  # the data, and no manifest
    assert "upload of weights/last" in capfd.readouterr().err
    assert checkpoint.load_manifest(remote.fetch(url))["step"] == 1  # step_1: the only complete one
    mirror = remote.Mirror(url, run=run, keep_last=3)  # and a later run mirrors it completely, unasked
    assert mirror.close(wait=60) == []
    assert checkpoint.load_manifest(remote.fetch(url))["step"] == 2


def test_the_store_verifies_the_bytes_not_metadata_we_wrote(store, tmp_path, monkeypatch):
    """An object that claims the manifest's sha256 in metadata but holds other bytes is sent again; a file whose
    bytes changed after its manifest was written is refused (no manifest on the store); a file sent in parts is
    checked by the store's checksum of the parts."""
    monkeypatch.setenv("PARALLEL_YOLO_CACHE", str(tmp_path / "cache"))
    client, url = store.client(), f"s3://{BUCKET}/verify/run"
    last = fake_checkpoint(tmp_path / "run" / "weights" / "last", 1)
    info = checkpoint.load_manifest(last)["files"]["rank00000.safetensors"]
    client.create_bucket(Bucket=BUCKET) if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]] else None
    client.put_object(Bucket=BUCKET, Key="verify/run/weights/last/rank00000.safetensors", Body=b"x" * info["bytes"],
                      Metadata={"sha256": info["sha256"]})  # the old shortcut's evidence, with wrong bytes
    uploader = remote._Uploader(url, keep_last=3)
    uploader.add("weights/last", shutil.copytree(last, tmp_path / "stage1"))
    assert uploader.close(wait=60) == []
    assert checkpoint.load_manifest(remote.fetch(url))["step"] == 1  # fetch checks every byte against the manifest

    changed = shutil.copytree(fake_checkpoint(tmp_path / "run2" / "weights" / "last", 2), tmp_path / "stage2")
    data = (changed / "rank00000.safetensors").read_bytes()
    (changed / "rank00000.safetensors").write_bytes(data[:-4] + b"\0\0\0\1")  # same size, other bytes
    uploader = remote._Uploader(f"s3://{BUCKET}/verify/changed", keep_last=3)
    uploader.add("weights/last", changed)
    assert uploader.close(wait=3) == ["weights/last"]
    assert remote._head(client, BUCKET, "verify/changed/weights/last/manifest.json") is None

    monkeypatch.setattr(remote, "_PART", 5 * 2**20)  # S3's smallest part: an 11 MiB file goes in 3 parts
    big = fake_checkpoint(tmp_path / "run3" / "weights" / "last", 3, numel=11 * 2**18)
    uploader = remote._Uploader(f"s3://{BUCKET}/verify/big", keep_last=3)
    uploader.add("weights/last", shutil.copytree(big, tmp_path / "stage3"))
    assert uploader.close(wait=120) == []
    head = client.head_object(Bucket=BUCKET, Key="verify/big/weights/last/rank00000.safetensors",
                              ChecksumMode="ENABLED")
    file = big / "rank00000.safetensors"
    parts = [hashlib.sha256(part).digest() for part in _parts(file.read_bytes(), remote._PART)]
    assert len(parts) == 3
    assert head["ChecksumSHA256"].split("-")[0] == base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()


def _parts(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_urls_are_checked_up_front(store, monkeypatch, tmp_path, capsys):
    for bad in ("s3://", "s3://ab/x", "s3://bad_bucket/x"):
        with pytest.raises(ConfigError, match="expected s3://BUCKET/PREFIX"):
            remote.check_url("upload", bad)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match="no AWS credentials"):
        remote.check_url("upload", f"s3://{BUCKET}/x")
    # the config checks only the URL's form (no credentials, nothing sent); the launcher's preflight checks the
    # credentials before any process starts, in one line
    from parallel_yolo.cli import main
    from parallel_yolo.config import TrainConfig

    assert TrainConfig(upload=f"s3://{BUCKET}/x").upload == f"s3://{BUCKET}/x"
    with pytest.raises(ConfigError, match="expected s3://BUCKET/PREFIX"):
        TrainConfig(upload="s3://ab/x")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "imgsz=64", "nproc=2", f"upload=s3://{BUCKET}/x", "project=runs"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "no AWS credentials" in err[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_training_mirrors_through_a_stopped_store_and_resumes_from_it(store, tmp_path):
    """2 processes, fsdp, a checkpoint every step; the store is stopped after the first save and started again once
    an upload has failed: training goes on, the upload is retried with a warning, the store ends with keep_last
    complete step folders and weights/last, and resume=s3://... continues exactly as resume= from the local copy."""
    url = f"s3://{BUCKET}/runs/a"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "parallel_yolo", "train", *CKPT_RUN, "strategy=fsdp",
                                    "nproc=2", "ckpt_every=1", "keep_last=2", f"upload={url}",
                                    f"project={tmp_path}", "name=a"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                   stderr=stderr, text=True)
    run = tmp_path / "a"
    try:
        wait_until(lambda: (run / "checkpoints" / "step_1" / "manifest.json").exists(), process)
        store.stop()
        stopped = time.time()  # stopped until an upload has met it (or the run ended), at least 3 s
        while process.poll() is None and time.time() - stopped < 120 and (
                time.time() - stopped < 3 or "failed" not in log.read_text()):
            time.sleep(0.1)
    finally:
        store.start()
    process.wait(timeout=600)
    errors = log.read_text()
    assert process.returncode == 0, errors[-4000:]
    assert "upload of" in errors and "failed" in errors and "retrying" in errors, errors[-3000:]
    assert "the store answers again" in errors, errors[-3000:]
    assert len(read_csv(run / "steps.csv")) == 6  # training went on: every step ran
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_5", "step_6"]  # keep_last here too
    keys = store.keys("runs/a/")
    steps = sorted({k.split("/")[3] for k in keys if k.startswith("runs/a/checkpoints/")})
    assert steps == ["step_5", "step_6"], keys
    for folder in ("checkpoints/step_5", "checkpoints/step_6", "weights/last"):
        manifest = json.loads(store.client().get_object(Bucket=BUCKET, Key=f"runs/a/{folder}/manifest.json")
                              ["Body"].read())
        assert manifest == checkpoint.load_manifest(run / folder), folder
    assert not (run / ".upload").exists()

    # step 6 again, resumed from the store's step_5: the loss of step 6 itself (a local resume is exact,
    # tests/checkpoint/test_resume.py), in a new run folder that mirrors to a prefix of its own
    check(run_cli("train", f"resume={url}/checkpoints/step_5", "max_steps=6", f"project={tmp_path}", "name=s3",
                  f"upload=s3://{BUCKET}/runs/s3", cwd=tmp_path))
    fetched = read_csv(tmp_path / "s3" / "steps.csv")
    assert [(r["step"], r["loss"]) for r in fetched] == [("6", read_csv(run / "steps.csv")[-1]["loss"])]
    assert "runs/s3/weights/last/manifest.json" in store.keys("runs/s3/")
    # val and consolidate read the store too
    check(run_cli("val", f"checkpoint={url}/weights/last", "imgsz=64", "batch=8", "workers=0",
                  f"project={tmp_path}", "name=val", cwd=tmp_path))
    check(run_cli("consolidate", f"checkpoint={url}/weights/last", f"out={tmp_path / 'last.pt'}", cwd=tmp_path))
    assert (tmp_path / "last.pt").stat().st_size > 0
