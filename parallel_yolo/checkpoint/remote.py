"""Checkpoints mirrored to S3-compatible storage (AWS S3, MinIO, Ceph ...) while training goes on, and read back.

`upload=s3://bucket/prefix` mirrors the run folder there: `prefix/weights/last/manifest.json`,
`prefix/checkpoints/step_N/rank00000.safetensors` ... Rank 0 mirrors (the checkpoint folders are on a file system
every rank writes to). Endpoint, region and credentials come the standard AWS way through boto3: AWS_ENDPOINT_URL
(or AWS_ENDPOINT_URL_S3, or `endpoint_url` in ~/.aws/config) for MinIO and other stores, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials, instance roles.

Mirroring: right after a checkpoint is committed, `Mirror.add` hard-links its files into `{run}/.upload/` (a later
save replaces weights/last and rotation deletes step_N; the links keep this version's bytes) and an uploader
process (this module run with -m) uploads them: first it deletes the remote manifest (from then on the remote copy
does not count as a checkpoint), then uploads every data file with a SHA-256 of its bytes that the store verifies
and keeps, and checks the store's size and SHA-256 against the manifest's, then the manifest, last; then deletes
remote files the new manifest does not list, and applies keep_last to the remote step_N folders. A file the store
already holds with the same SHA-256 (weights/best is weights/last of an improving epoch) is copied on the store
instead of sent again. A failure prints a warning and is retried with growing pauses while training goes on; a
newer version of a folder replaces a pending one.

Reading (`resume=`, `val checkpoint=`, `consolidate checkpoint=` with an s3:// URL): `fetch` downloads one complete
checkpoint (a checkpoint prefix, or of a run prefix the newest one whose manifest is there and whose files match
it) into the cache (PARALLEL_YOLO_CACHE/s3/bucket/prefix/...), verified against its manifest, once per host.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError
from ..urls import is_url as is_remote
from ..urls import split_url
from . import MANIFEST, CheckpointError, load_manifest

__all__ = ["is_remote", "check_url", "Mirror", "mirror", "fetch", "localize", "is_fetched"]

_RETRY_S = (2, 4, 8, 15, 30, 60)  # pauses between attempts, the last repeated
_PART = 5 * 2**30
"""One PUT up to S3's single-request limit, so that the store's SHA-256 is the whole file's, as in the manifest; a
larger file goes in parts of this size, and the store keeps a checksum of the parts' checksums."""


def _transfer():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=_PART + 1, multipart_chunksize=_PART)


def _store_checksum(path: Path, sha256: str, size: int) -> str:
    """The ChecksumSHA256 the store reports for this file when it holds it whole: base64 of the file's SHA-256, or
    for a file uploaded in parts the SHA-256 of the parts' digests (what S3 computes, read from the file; S3 adds
    "-N", the number of parts, which _holds leaves aside)."""
    import base64
    import hashlib

    if size <= _PART:
        return base64.b64encode(bytes.fromhex(sha256)).decode()
    digests = []
    with open(path, "rb") as f:
        while part := f.read(_PART):
            digests.append(hashlib.sha256(part).digest())
    return base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()


def check_url(key: str, url: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket/prefix, or a one-line ConfigError; also checks that boto3 is installed and
    finds credentials (no request is sent). Called where the store is first used."""
    bucket, prefix = split_url(key, url)
    try:
        import boto3
    except ImportError:
        raise ConfigError(f"{key}={url}: needs boto3; pip install 'parallel_yolo[s3]' (or boto3)") from None
    if boto3.Session().get_credentials() is None:
        raise ConfigError(f"{key}={url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                          "(and AWS_ENDPOINT_URL for MinIO and other S3-compatible stores), or configure ~/.aws")
    return bucket, prefix


def _client():
    import boto3
    from botocore.config import Config

    # short connect timeouts and few retries inside boto3: the mirror's own retries (with a warning) take over
    return boto3.client("s3", config=Config(connect_timeout=5, read_timeout=60,
                                            retries={"max_attempts": 2, "mode": "standard"}))


def _key(prefix: str, *parts: str) -> str:
    return "/".join(p for p in (prefix, *parts) if p)


def _warn(message: str) -> None:
    print(f"parallel-yolo: warning: {message}", file=sys.stderr, flush=True)


# ---- mirroring ---------------------------------------------------------------------------------------------------
class Mirror:
    """Rank 0's side: stages each committed checkpoint folder of the run folder `run` and hands it to an uploader
    process (`python -m parallel_yolo.checkpoint.remote`, at a lower CPU priority). A process, not a thread: the
    uploads' Python work then never holds the interpreter lock that the training loop (its kernel launches, FSDP's
    hooks) needs."""

    def __init__(self, url: str, *, run: Path, keep_last: int):
        self.url = url.rstrip("/")
        check_url("upload", url)
        self.run, self.staging, self.count = Path(run), Path(run) / ".upload", 0
        shutil.rmtree(self.staging, ignore_errors=True)  # what a killed run left staged is in its checkpoints too
        self.process = subprocess.Popen([sys.executable, "-m", __name__, self.url, str(self.run), str(keep_last)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        # a run folder written before (a resumed run, exist_ok): what it holds is mirrored first; what the store
        # holds already (the same manifest, or files of the same size and the store's SHA-256) is not sent again
        committed = [self.run / "weights" / "best", self.run / "weights" / "last",
                     *sorted((self.run / "checkpoints").glob("step_*"), key=lambda p: _step(p.as_posix()) or 0)]
        for folder in committed:
            if (folder / MANIFEST).is_file():
                self.add(folder)

    def add(self, folder: Path) -> None:
        """Queue the committed checkpoint `folder` (inside the run folder) for upload; returns at once. Its files are
        hard-linked first: the next save replaces weights/last and rotation deletes step_N."""
        name = Path(folder).resolve().relative_to(self.run.resolve()).as_posix()
        self.count += 1
        stage = self.staging / f"{self.count:06d}"
        stage.mkdir(parents=True)
        for file in Path(folder).iterdir():
            try:
                os.link(file, stage / file.name)
            except OSError:  # no hard links on this file system: a copy, taken before the next save replaces it
                shutil.copy2(file, stage / file.name)
        self._send({"add": name, "stage": str(stage)})

    def close(self, wait: float) -> list[str]:
        """Wait up to `wait` seconds for what is queued; returns the folders not mirrored (with a warning)."""
        start, left = time.time(), None
        if self._send({"close": wait}):
            ready, _, _ = select.select([self.process.stdout], [], [], wait + 30)
            line = self.process.stdout.readline() if ready else ""
            left = json.loads(line) if line.strip() else None
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if time.time() - start > 1:
            print(f"parallel-yolo: upload: waited {time.time() - start:.1f}s at the end for the last checkpoints",
                  file=sys.stderr, flush=True)
        if left is None:
            left = sorted(p.name for p in self.staging.iterdir()) if self.staging.is_dir() else []
            left = left and ["(the uploader process stopped)"]
        if left:
            _warn(f"upload: {', '.join(left)} not mirrored to {self.url} within upload_wait={wait:g}s (the local "
                  f"checkpoints are complete; their staged copies stay in {self.staging})")
        else:
            shutil.rmtree(self.staging, ignore_errors=True)
        return left

    def _send(self, message: dict) -> bool:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False


class _Uploader:
    """The uploader process's work: a thread uploads the queued folders in arrival order, newest version of each."""

    def __init__(self, url: str, *, keep_last: int):
        self.url, (self.bucket, self.prefix) = url, check_url("upload", url)
        self.keep_last = keep_last
        self.client = _client()
        self.known: dict[str, str] = {}  # sha256 -> a key that held those bytes when last seen
        self.pending: dict[str, Path] = {}  # remote folder (weights/last ...) -> staged files, in arrival order
        self.failing = 0  # attempts failed in a row, whatever the folder: the pause grows while the store is away
        self.closing, self.busy = False, None
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._work, name="parallel_yolo-upload", daemon=True)
        self.thread.start()

    def add(self, name: str, stage: Path) -> None:
        with self.lock:
            replaced = self.pending.pop(name, None)
            self.pending[name] = stage
            steps = sorted((n for n in self.pending if _step(n) is not None), key=_step)
            dropped = steps[:-self.keep_last] if self.keep_last else []
            for old in dropped:  # rotated away before it was sent: keep_last would delete it on the store anyway
                shutil.rmtree(self.pending.pop(old), ignore_errors=True)
            self.lock.notify_all()
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)

    def close(self, wait: float) -> list[str]:
        """Wait up to `wait` seconds for what is queued; returns the folders not mirrored."""
        deadline = time.time() + wait
        with self.lock:
            while (self.pending or self.busy) and time.time() < deadline:
                self.lock.wait(timeout=min(1.0, max(deadline - time.time(), 0.01)))
            self.closing = True
            self.lock.notify_all()
            left = sorted({*self.pending, *([self.busy] if self.busy else [])})
        self.thread.join(timeout=5)  # an attempt under way ends (or fails) first
        return left

    def _work(self) -> None:
        ready = False
        while True:
            with self.lock:
                while not self.pending and not self.closing:
                    self.lock.wait()
                if self.closing:
                    return
                name, stage = next(iter(self.pending.items()))
                self.busy = name
                del self.pending[name]
            try:
                if not ready:
                    self._ensure_bucket()
                    ready = True
                self._upload(name, stage)
                if _step(name) is not None:
                    self._rotate()
                shutil.rmtree(stage, ignore_errors=True)
                if self.failing:
                    print(f"parallel-yolo: upload: the store answers again; {name} mirrored to {self.url} after "
                          f"{self.failing} failed attempts", file=sys.stderr, flush=True)
                self.failing = 0
            except Exception as error:  # noqa: BLE001 - any failure of the store: warn, retry, never stop training
                pause = _RETRY_S[min(self.failing, len(_RETRY_S) - 1)]
                _warn(f"upload of {name} to {self.url} failed ({type(error).__name__}: {error}); retrying in "
                      f"{pause}s, training goes on")
                self.failing += 1
                with self.lock:
                    if name in self.pending:  # a newer version came meanwhile: it goes instead
                        shutil.rmtree(stage, ignore_errors=True)
                    else:
                        self.pending = {name: stage, **self.pending}
                    self.busy = None
                    self.lock.wait(timeout=pause)
                continue
            with self.lock:
                self.busy = None
                self.lock.notify_all()

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if not _missing(error):
                raise
            self.client.create_bucket(Bucket=self.bucket)
            print(f"parallel-yolo: created bucket {self.bucket} for upload={self.url}", file=sys.stderr, flush=True)

    def _upload(self, name: str, stage: Path) -> None:
        body = (stage / MANIFEST).read_bytes()
        manifest, folder = json.loads(body), _key(self.prefix, name)
        if self._manifest_on_store(folder) == body:  # this very checkpoint is there, complete (a run mirrored again)
            return
        self.client.delete_object(Bucket=self.bucket, Key=_key(folder, MANIFEST))  # incomplete from here on
        for file, info in manifest["files"].items():
            self._put(stage / file, _key(folder, file), info["sha256"], info["bytes"])
        self.client.put_object(Bucket=self.bucket, Key=_key(folder, MANIFEST), Body=body)  # complete from here on
        listed = {*manifest["files"], MANIFEST}
        stale = [k for k in self._keys(folder + "/") if k[len(folder) + 1:] not in listed]
        self._delete(stale)

    def _put(self, path: Path, key: str, sha256: str, size: int) -> None:
        """The file at `key`, its bytes verified by the store: boto3 sends the SHA-256 of what it reads, the store
        refuses bytes that do not match it and keeps it; the object counts only where the store's SHA-256 is the
        manifest's (a file changed since the manifest was written is refused too)."""
        from botocore.exceptions import ClientError

        expected = _store_checksum(path, sha256, size)
        source = self.known.get(sha256)
        if source is not None and source != key:
            try:  # the same bytes are on the store already: copied there (the store computes the copy's checksum)
                self.client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": source},
                                        ChecksumAlgorithm="SHA256")
            except ClientError:
                pass
        if not self._holds(key, expected, size):
            self.client.upload_file(str(path), self.bucket, key, ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                                    Config=_transfer())
            if not self._holds(key, expected, size):
                raise CheckpointError(f"s3://{self.bucket}/{key}: the store's size or SHA-256 differs from the "
                                      "manifest's (the file changed after it was written?)")
        self.known[sha256] = key

    def _manifest_on_store(self, folder: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=_key(folder, MANIFEST))["Body"].read()
        except ClientError as error:
            if _missing(error):
                return None
            raise

    def _holds(self, key: str, checksum: str, size: int) -> bool:
        """The store holds these bytes at `key`, by its own SHA-256 of them (nothing we wrote beside them)."""
        head = _head(self.client, self.bucket, key, ChecksumMode="ENABLED") or {}
        return head.get("ContentLength") == size and head.get("ChecksumSHA256", "").split("-")[0] == checksum

    def _rotate(self) -> None:
        """keep_last on the store: delete all but the newest step_N folders (the manifest of each first)."""
        parent = _key(self.prefix, "checkpoints") + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=parent,
                                                                       Delimiter="/")
        folders = [p["Prefix"] for page in pages for p in page.get("CommonPrefixes", [])]
        steps = sorted((f for f in folders if _step(f.rstrip("/")) is not None), key=lambda f: _step(f.rstrip("/")))
        for old in steps[:-self.keep_last] if self.keep_last else []:
            self._delete([old + MANIFEST])
            self._delete(list(self._keys(old)))

    def _keys(self, prefix: str) -> Iterator[str]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            yield from (item["Key"] for item in page.get("Contents", []))

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = keys[start:start + 1000]
            if chunk:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk]})


def _serve(argv: list[str]) -> None:
    """The uploader process: JSON lines on stdin ({"add": folder, "stage": path}, then {"close": seconds}); the
    folders not mirrored go back as one JSON line on stdout. It ends with its parent's stdin (a killed trainer: what
    it had queued is in the checkpoints it committed, which a resumed run mirrors again)."""
    url, run, keep_last = argv
    try:
        os.nice(10)  # the cores go to training (and its data loaders) whenever they want them
    except OSError:
        pass
    uploader = _Uploader(url, keep_last=int(keep_last))
    for line in sys.stdin:
        message = json.loads(line)
        if "add" in message:
            uploader.add(message["add"], Path(message["stage"]))
        elif "close" in message:
            print(json.dumps(uploader.close(float(message["close"]))), flush=True)
            return


class _NoMirror:
    """What ranks other than 0, and runs without upload=, get: nothing to do."""

    def add(self, folder: Path) -> None:
        pass

    def close(self, wait: float) -> list[str]:
        return []


def mirror(url: str | None, *, run: Path, keep_last: int, active: bool) -> Mirror | _NoMirror:
    return Mirror(url, run=run, keep_last=keep_last) if url and active else _NoMirror()


def _missing(error) -> bool:
    """Whether a botocore ClientError says the object or bucket is not there."""
    return error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NoSuchBucket", "NotFound")


def _step(name: str) -> int | None:
    """N of a checkpoints/step_N folder, else None."""
    head, _, last = name.rpartition("/")
    return int(last[5:]) if head.endswith("checkpoints") and last.startswith("step_") and last[5:].isdigit() else None


# ---- reading -----------------------------------------------------------------------------------------------------
def localize(path: str, *, key: str) -> str:
    """`path` itself, or for an s3:// URL the local folder of the checkpoint fetched from it."""
    return str(fetch(path, key=key)) if is_remote(path) else path


def fetch(url: str, *, key: str = "resume") -> Path:
    """A complete, verified local copy of the checkpoint at `url` (a checkpoint prefix, or a run prefix: then its
    newest checkpoint whose manifest is there and whose files match it). Downloaded once per host and version."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = check_url(key, url)
    client = _client()
    try:
        manifests = [k for k in (_key(prefix, MANIFEST), *_run_manifests(client, bucket, prefix))
                     if _head(client, bucket, k) is not None]
        if not manifests:
            raise ConfigError(f"{key}={url}: no checkpoint there (no {MANIFEST} under it, nor under weights/last, "
                              "weights/best or checkpoints/step_N)")
        found = []
        for manifest_key in manifests:
            body = client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()
            try:
                found.append((json.loads(body).get("step", -1), manifest_key, body))
            except (json.JSONDecodeError, AttributeError):
                continue
        problems = []
        for _, manifest_key, body in sorted(found, key=lambda f: f[0], reverse=True):
            folder = manifest_key[:-len(MANIFEST)].rstrip("/")
            try:
                return _download(client, bucket, folder, body)
            except CheckpointError as e:
                problems.append(str(e))
    except (BotoCoreError, ClientError) as error:
        raise ConfigError(f"{key}={url}: the store did not answer ({type(error).__name__}: {error})") from None
    raise ConfigError(f"{key}={url}: no intact checkpoint: " + "; ".join(problems or ["unreadable manifests"]))


def is_fetched(folder: Path) -> bool:
    """Whether `folder` is a local copy `fetch` made (a resumed run then writes a new run folder of its own)."""
    try:
        Path(folder).resolve().relative_to(_cache_root().resolve())
        return True
    except ValueError:
        return False


def _cache_root() -> Path:
    from ..data.demo import cache_dir

    return cache_dir() / "s3"


def _run_manifests(client, bucket: str, prefix: str) -> list[str]:
    keys = [_key(prefix, "weights", "last", MANIFEST), _key(prefix, "weights", "best", MANIFEST)]
    parent = _key(prefix, "checkpoints") + "/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=parent, Delimiter="/"):
        keys += [p["Prefix"] + MANIFEST for p in page.get("CommonPrefixes", [])]
    return keys


def _head(client, bucket: str, key: str, **options) -> dict | None:
    """The object's metadata, or None where there is none."""
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key, **options)
    except ClientError as error:
        if _missing(error):
            return None
        raise


def _download(client, bucket: str, folder: str, manifest_body: bytes) -> Path:
    """The checkpoint at s3://bucket/folder with this manifest, downloaded (or found already) and verified."""
    from botocore.exceptions import ClientError

    target = _cache_root() / bucket / folder
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):
        if (target / MANIFEST).is_file() and (target / MANIFEST).read_bytes() == manifest_body:
            load_manifest(target)  # the same version, fetched before: still intact?
            return target
        tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for file in json.loads(manifest_body).get("files", {}):
                if "/" in file or file.startswith("."):
                    raise CheckpointError(f"s3://{bucket}/{folder}: its manifest names a file outside the folder "
                                          f"({file})")
                try:
                    client.download_file(bucket, _key(folder, file), str(tmp / file))
                except ClientError as error:
                    raise CheckpointError(f"s3://{bucket}/{folder}/{file}: listed in the manifest, not on the store "
                                          f"({error})") from None
            (tmp / MANIFEST).write_bytes(manifest_body)
            load_manifest(tmp)  # sizes and sha256 of every file
        except CheckpointError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(str(e).replace(str(tmp), f"s3://{bucket}/{folder}")) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process of this host at a time (all ranks fetch; one downloads, the others then find it there)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


if __name__ == "__main__":
    _serve(sys.argv[1:])
