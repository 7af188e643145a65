"""Training wall time with `upload=s3://...` against without, side by side in one run, on the README demo.

    python benchmarks/upload.py [cfg=configs/train/demo.yaml] [pairs=1] [KEY=VALUE ...]

Starts an S3-compatible server (moto's) on 127.0.0.1 in a process of its own at the lowest CPU priority (a store is
another machine in real use; here it shares the cores, and must not take them from training), then runs the demo
alternately without and with upload= (A B B A per pair, so drift of the machine falls on both) and prints each wall
time (process start to exit: the end's wait for pending uploads included) and the ratio of the means. Afterwards it
checks that the store holds every checkpoint the last run committed, manifest included, identical to the local one.
Extra KEY=VALUE pairs go to every training run (e.g. ckpt_every=5 to upload more often).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_store(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-c", "import os, sys; os.nice(19); from moto.server import main; "
                               "main(sys.argv[1:])", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the moto server did not start")


def train(tokens: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "parallel_yolo", "train", *tokens], cwd=cwd, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return time.time() - start, result.stderr


def main(argv: list[str]) -> None:
    args = {"cfg": str(Path(__file__).resolve().parents[1] / "configs" / "train" / "demo.yaml"), "pairs": "1"}
    extra = [a for a in argv if a.split("=", 1)[0] not in args]
    args.update(a.split("=", 1) for a in argv if a.split("=", 1)[0] in args)
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    store = start_store(port)
    times: dict[str, list[float]] = {"without": [], "with": []}
    try:
        with tempfile.TemporaryDirectory(prefix="pyolo-upload-") as work:
            work, n = Path(work), 0
            for _ in range(int(args["pairs"])):
                for mode in ("without", "with", "with", "without"):
                    n += 1
                    tokens = [f"cfg={args['cfg']}", *extra, f"project={work}", f"name=run{n}"]
                    if mode == "with":
                        tokens.append(f"upload=s3://bench-bucket/run{n}")
                    seconds, errors = train(tokens, env, work)
                    times[mode].append(seconds)
                    warnings = [line for line in errors.splitlines() if "upload" in line and "warning" in line]
                    print(f"run {n}: {mode:7s} upload  {seconds:7.1f} s{'  ' + warnings[0] if warnings else ''}",
                          flush=True)
                    if mode == "with":
                        last = n
            verify(work / f"run{last}", f"run{last}", env)
    finally:
        store.terminate()
    without, with_upload = (sum(v) / len(v) for v in (times["without"], times["with"]))
    print(f"\nmean wall time: without {without:.1f} s, with upload= {with_upload:.1f} s: ratio "
          f"{with_upload / without:.3f} (target <= 1.05)")


def verify(run: Path, prefix: str, env: dict[str, str]) -> None:
    import boto3

    from parallel_yolo import checkpoint

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench",
                          aws_secret_access_key="bench", region_name="us-east-1")
    folders = [p.parent for p in run.glob("*/*/manifest.json") if p.parent.parent.name in ("weights", "checkpoints")]
    for folder in folders:
        name = folder.relative_to(run).as_posix()
        body = client.get_object(Bucket="bench-bucket", Key=f"{prefix}/{name}/manifest.json")["Body"].read()
        assert json.loads(body) == checkpoint.load_manifest(folder), name
    names = ", ".join(sorted(f.relative_to(run).as_posix() for f in folders))
    print(f"the store holds the last run's {len(folders)} checkpoints ({names}), manifests identical to the local ones")


if __name__ == "__main__":
    main(sys.argv[1:])
