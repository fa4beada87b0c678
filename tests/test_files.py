"""Atomic writes: a reader sees the old content or the complete new one, never a half-written file."""

import hashlib

import pytest

from gvpo_offline.runtime.files import (
    atomic_dir,
    atomic_write_json,
    atomic_write_jsonl,
    remove_stale,
    sha256_file,
)


def test_atomic_file_write_replaces_or_leaves_the_old_file(tmp_path):
    target = tmp_path / "out.jsonl"
    atomic_write_jsonl(target, [{"a": 1}, {"b": "é"}])
    assert target.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'

    def failing_rows():
        yield {"c": 3}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write_jsonl(target, failing_rows())
    assert target.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left
    atomic_write_json(tmp_path / "x.json", {"b": 1, "a": 2})
    assert (tmp_path / "x.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'


def test_atomic_dir_swaps_whole_folders(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed mid-save")
    assert (target / "weights").read_text() == "v1"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (tmp_path / ".gvpo-tmp-model-123").mkdir()  # what a kill -9 mid-save leaves
    remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_sha256_file_streams(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 1000)
    assert sha256_file(path, chunk_bytes=7) == hashlib.sha256(path.read_bytes()).hexdigest()
