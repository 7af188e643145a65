"""Every shell command in the README's ```bash blocks runs, in order, as a new user would type it.

The install prefix (`pip install ... &&`) is dropped (the package is already installed here) and the test
command itself is skipped; ```text blocks hold commands for GPU nodes and are not run here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time

import pytest

from conftest import ROOT, read_csv


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"^pip install [^&]*&&\s*", "", line.strip())
            if line and not line.startswith("#") and "pytest" not in line:
                commands.append(line)
    return commands


def test_readme_opens_with_install_and_test_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert blocks[0].strip().startswith("pip install -e . && parallel-yolo train")
    assert blocks[1].strip() == 'pip install -e ".[test]" && python -m pytest'
    assert 'pip install -e ".[test]" && python -m pytest' in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_every_readme_command_runs(workdir):
    (workdir / "configs").symlink_to(ROOT / "configs")
    for command in readme_commands():
        start = time.time()
        result = subprocess.run(shlex.split(command), cwd=workdir, capture_output=True, text=True, timeout=900,
                                env={**os.environ})
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        print(f"{time.time() - start:6.1f}s  {command}")
    demo = read_csv(workdir / "runs" / "detect" / "train" / "results.csv")[-1]
    assert float(demo["metrics/mAP50(B)"]) > 0.5, demo
