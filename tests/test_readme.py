"""Every shell command in the ```bash blocks of the README and the docs pages runs, in order, as a new user would type it.

The install prefix (`pip install ... &&`) is dropped (the package is already installed here) and the test
command itself is skipped; ```text blocks hold commands for GPU nodes and are not run here. The first command (the
demo) runs once per session in conftest's `readme_demo`, whose run other tests use too.
"""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, read_csv, readme_commands, run_readme_command


def test_readme_opens_with_install_and_test_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert blocks[0].strip().startswith("pip install -e . && parallel-yolo train")
    assert blocks[1].strip() == 'pip install -e ".[test]" && python -m pytest'
    assert 'pip install -e ".[test]" && python -m pytest' in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_every_readme_command_runs(readme_demo):
    demo = read_csv(readme_demo / "runs" / "detect" / "train" / "results.csv")[-1]
    assert float(demo["metrics/mAP50(B)"]) > 0.5, demo
    for plot in ("results.png", "labels.jpg", "train_batch0.jpg", "BoxPR_curve.png", "confusion_matrix.png",
                 "val_batch0_pred.jpg"):  # plots by default, drawn with no network
        assert (readme_demo / "runs" / "detect" / "train" / plot).stat().st_size > 1000, plot
    for command in readme_commands()[1:]:
        print(f"{run_readme_command(command, readme_demo):6.1f}s  {command}")
