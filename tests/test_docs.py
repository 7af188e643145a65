"""The docs: the README is a front page of at most 10 KB, the site builds with mkdocs in strict mode (and that build
fails on a broken link), and the configuration reference is what the code generates. The commands of the README
and of every page run in tests/test_readme.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, documented_pages

from parallel_yolo.config import reference


def test_readme_is_a_front_page_of_at_most_10_kb():
    assert (ROOT / "README.md").stat().st_size <= 10 * 1024


def test_every_page_the_readme_links_is_in_the_site():
    assert {p.name for p in documented_pages()} == {"README.md", *(p.name for p in (ROOT / "docs").glob("*.md"))}


def _build(root, site) -> subprocess.CompletedProcess:
    # not --quiet: strict mode counts the warnings it logs, and --quiet stops them (a broken link then passes)
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_the_site_builds_in_strict_mode_and_a_broken_link_fails_it(tmp_path):
    built = _build(ROOT, tmp_path / "site")
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "changelog" / "index.html").is_file()
    copy = tmp_path / "copy"
    for name in ("mkdocs.yml", "README.md", "CHANGELOG.md"):
        shutil.copy(ROOT / name, copy / name if copy.exists() else (copy.mkdir() or copy / name))
    shutil.copytree(ROOT / "docs", copy / "docs")
    page = copy / "docs" / "gpu.md"
    page.write_text(page.read_text() + "\nSee [the missing page](missing.md).\n")
    broken = _build(copy, tmp_path / "broken")
    assert broken.returncode != 0 and "missing.md" in broken.stderr, broken.stderr[-2000:]


def test_the_configuration_reference_is_generated_from_the_code():
    page = (ROOT / "docs" / "configuration.md").read_text()
    start, end = page.index(reference.MARKERS[0]) + len(reference.MARKERS[0]), page.index(reference.MARKERS[1])
    assert page[start:end].strip() == reference.markdown().strip(), \
        "docs/configuration.md is stale: python -m parallel_yolo.config.reference --write"
    assert "| `activation_checkpointing` | str | `none` |" in page  # a field's docstring, type and default
