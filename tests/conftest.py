"""Shared test helpers: write small data files, run the CLI in-process."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The suite's models are tiny: one intra-op thread per process does not oversubscribe a small machine
# (5x faster than two on a busy 2-core box, see test_reference.py). Tests and subprocesses alike; set
# before torch is imported; OMP_NUM_THREADS from the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread in the test process too, whatever OMP_NUM_THREADS says: faster on a busy
    2-core machine (5x measured) and the same float reductions on every run."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jsonl(path: Path, rows: list) -> Path:
    """One JSON value per line (rows may be dicts or anything else JSON can encode)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """run_cli("inspect", path, ...) -> CliResult(exit code, stdout, stderr) of gvpo_offline.cli.main."""
    from gvpo_offline.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


@pytest.fixture(autouse=True, scope="session")
def private_hash_cache(tmp_path_factory):
    """Weight hashes are remembered on disk (gvpo_offline.model.hub); tests keep theirs out of ~/.cache."""
    import os

    before = os.environ.get("GVPO_OFFLINE_CACHE")
    os.environ["GVPO_OFFLINE_CACHE"] = str(tmp_path_factory.mktemp("gvpo-hash-cache"))
    yield
    if before is None:
        os.environ.pop("GVPO_OFFLINE_CACHE", None)
    else:
        os.environ["GVPO_OFFLINE_CACHE"] = before


@pytest.fixture(scope="module")
def story_cache(tmp_path_factory) -> Path:
    """A complete reference cache of STORY_GROUPS (k = 3, 2, 5, 4) scored by stories260K, built once per
    test module (a module may define its own). Use ``workdir`` for a private copy."""
    import torch
    from cachefixture import STORIES, STORY_GROUPS, build_cache, text_groups

    workdir, before = tmp_path_factory.mktemp("cache") / "run", torch.get_num_threads()
    torch.set_num_threads(1)
    build_cache(workdir, STORIES, text_groups(STORIES, STORY_GROUPS))
    torch.set_num_threads(before)
    return workdir


@pytest.fixture
def workdir(story_cache, tmp_path) -> Path:
    """A private copy of the module's ``story_cache``."""
    shutil.copytree(story_cache, tmp_path / "run")
    return tmp_path / "run"
