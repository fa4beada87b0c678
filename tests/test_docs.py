"""The guides under docs/ build with `mkdocs build --strict` (a broken link or anchor fails), and every
relative link of README.md points at a file of the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "scale-out" / "index.html").is_file()


def test_every_docs_page_is_in_the_nav_and_every_readme_link_resolves():
    import yaml

    nav = [next(iter(item.values())) for item in yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]]
    assert sorted(nav) == sorted(p.name for p in (REPO / "docs").glob("*.md"))
    readme = (REPO / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", readme) if not t.startswith(("http", "#"))]
    assert "docs/scale-out.md" in targets  # the README points into the guides
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, missing
    assert len(readme.splitlines()) < 200, "README keeps to what a newcomer needs; details go to docs/"
