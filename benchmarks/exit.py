"""What the quick exit (parallel_yolo/launch/shutdown.py `finish`) saves against Python's plain exit, side by side.

    python benchmarks/exit.py [pairs=2] [KEY=VALUE ...]

Runs the same command (a one-process training of the demo, 2 steps; extra KEY=VALUE pairs go to it) through
`cli.main` in a fresh process, which then ends either with `shutdown.finish` (what `parallel-yolo` does) or with
`sys.exit` (Python's plain exit: the same thread joins and atexit handlers, plus the teardown of every module),
alternately (A B B A per pair, so drift of the machine falls on both). Each exit is timed from main's return to the
process's end as the parent sees it, and the means and their difference are printed. Every worker of an `nproc=N`
launch and the launcher itself end the same way, and the launcher waits for its workers: a launch saves about this
difference once for the workers (they end in parallel) and once more for the launcher.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

EXIT = {"quick": "from parallel_yolo.launch.shutdown import finish; finish(code)", "plain": "sys.exit(code)"}


def exit_time(how: str, tokens: list[str], cwd: str) -> float:
    code = ("import sys, time; from parallel_yolo.cli import main; code = main(sys.argv[1:]); "
            "print(f'RETURNED {time.time()!r}', file=sys.stderr, flush=True); " + EXIT[how])
    result = subprocess.run([sys.executable, "-c", code, "train", *tokens], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "YOLO_OFFLINE": "1"})
    ended = time.time()
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    returned = next(float(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("RETURNED "))
    return ended - returned


def main(argv: list[str]) -> None:
    pairs = int(next((a.split("=", 1)[1] for a in argv if a.startswith("pairs=")), "2"))
    extra = [a for a in argv if not a.startswith("pairs=")]
    tokens = ["model=yolov8n.yaml", "data=demo", "imgsz=64", "batch=8", "max_steps=2", "workers=0", "val=false",
              "plots=false", "exist_ok=true", *extra]
    times: dict[str, list[float]] = {"quick": [], "plain": []}
    with tempfile.TemporaryDirectory() as cwd:
        exit_time("quick", tokens, cwd)  # warm-up: the demo data and Ultralytics' label cache are written once
        for _ in range(pairs):
            for how in ("quick", "plain", "plain", "quick"):
                times[how].append(exit_time(how, tokens, cwd))
                print(f"{how:5s} exit {times[how][-1]:.2f} s", flush=True)
    quick, plain = statistics.mean(times["quick"]), statistics.mean(times["plain"])
    print(f"mean exit: quick {quick:.2f} s, plain {plain:.2f} s: the quick exit saves {plain - quick:.2f} s per "
          f"process (plain / quick = {plain / quick:.1f}x)")


if __name__ == "__main__":
    main(sys.argv[1:])
