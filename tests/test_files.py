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


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_model_folders_get_the_umask_mode_not_the_writers_temp_file_mode(tmp_path, umask):
    """transformers' save_pretrained writes model.safetensors through a 0600 temp file; the folder train
    hands back (save_final, through atomic_dir) has every file 0666 & ~umask and folders 0777 & ~umask."""
    import os

    from transformers import LlamaConfig, LlamaForCausalLM

    from gvpo_offline.stages.train.checkpoints import save_final

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    before = os.umask(umask)
    try:
        folder = save_final(tmp_path, model, None, {"loss": "gvpo", "beta": 1.0})
        with atomic_dir(tmp_path / "plain") as tmp:  # a writer's own 0600 file and 0700 folder
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "w.bin").write_bytes(b"x")
            os.chmod(tmp / "sub" / "w.bin", 0o600)
    finally:
        os.umask(before)
    files = [p for p in [*folder.rglob("*"), *(tmp_path / "plain").rglob("*")] if p.is_file()]
    assert "model.safetensors" in {p.name for p in files}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}
    for sub in (folder, tmp_path / "plain", tmp_path / "plain" / "sub"):
        assert sub.stat().st_mode & 0o777 == 0o777 & ~umask
