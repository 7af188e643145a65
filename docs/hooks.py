"""mkdocs hook: the site's front page is README.md and its "Changes" page CHANGELOG.md, read from the repository's
root (each written once), their links to docs/PAGE.md made links between pages."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"index.md": "README.md", "changelog.md": "CHANGELOG.md"}


def on_files(files, config):
    for page, source in PAGES.items():
        text = (ROOT / source).read_text()
        text = re.sub(r"\]\(docs/([\w-]+\.md(#[\w-]*)?)\)", r"](\1)", text)
        text = text.replace("](CHANGELOG.md)", "](changelog.md)")
        files.append(File.generated(config, page, content=text))
    return files
