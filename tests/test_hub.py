"""Hub ids (org/name[@revision]) resolved through a real Hugging Face cache layout, offline; weight
hashes read off the hub's blob names or computed once and remembered on disk."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cachefixture import STORIES, STORY_GROUPS

from gvpo_offline.model import hub
from gvpo_offline.model.loading import model_fingerprint
from gvpo_offline.runtime.errors import GvpoError

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_hub_cache(hf_home: Path, repo: str = "tiny-org/stories260K", commit: str = COMMIT) -> Path:
    """HF_HOME/hub/models--ORG--NAME/{refs/main, blobs/<hash>, snapshots/<commit>/<file -> blob>}: the
    layout huggingface_hub writes (file_download.py: blobs named by the sha256 of LFS files, snapshot
    entries relative symlinks to them, refs/<branch> holding the commit hash)."""
    storage = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    (storage / "blobs").mkdir()
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in sorted(STORIES.iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()  # LFS-style name (git-sha1 for small files does not matter)
        (storage / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """A private HF cache for in-process calls (huggingface_hub reads its env once, at import)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    build_hub_cache(home)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def test_hub_id_resolves_offline_and_its_fingerprint_needs_no_hashing(hf_home, monkeypatch):
    snapshot = hf_home / "hub" / "models--tiny-org--stories260K" / "snapshots" / COMMIT
    for spec in ("tiny-org/stories260K", f"tiny-org/stories260K@{COMMIT}", "tiny-org/stories260K@main"):
        source = hub.resolve_model(spec)
        assert source.path == snapshot and source.hub_id == "tiny-org/stories260K" and source.revision == COMMIT
    assert hub.resolve_model(str(STORIES)) == hub.ModelSource(STORIES)  # folders stay folders

    expected = model_fingerprint(STORIES)  # content hash of the plain folder (hashed, then remembered)

    def no_hashing(path, *a, **k):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(hub, "sha256_file", no_hashing)
    assert model_fingerprint("tiny-org/stories260K") == expected  # read off the blob names, same value


def test_unknown_id_offline_is_one_clear_error(hf_home):
    with pytest.raises(GvpoError, match=r"other-org/missing: not a local folder, and not in the Hugging Face "
                                        r"cache .*HF_HUB_OFFLINE"):
        hub.resolve_model("other-org/missing")
    with pytest.raises(GvpoError, match="not in the Hugging Face cache"):
        hub.resolve_model("tiny-org/stories260K@v9")  # a revision the cache does not know


def test_local_weights_are_hashed_once_and_again_after_a_change(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(STORIES, folder)
    calls = []
    real = hub.sha256_file
    monkeypatch.setattr(hub, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    first = model_fingerprint(folder)
    assert calls == ["model.safetensors"]
    stored = json.loads(hub.hash_cache_path().read_text())
    assert stored[str((folder / "model.safetensors").resolve())]["sha256"] == real(folder / "model.safetensors")

    hub._memo.clear()  # as in a new process: the on-disk cache answers
    assert model_fingerprint(folder) == first and calls == ["model.safetensors"]

    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))  # same size, new content
    hub._memo.clear()
    assert model_fingerprint(folder) != first and calls == ["model.safetensors"] * 2


def test_pipeline_from_a_hub_id_with_hf_hub_offline(tmp_path, hf_home, run_cli):
    """precompute-ref in a fresh process with HF_HOME + HF_HUB_OFFLINE=1 and the id; then train and eval."""
    from gvpo_offline.stages.evaluate.heldout import EvalConfig, evaluate
    from gvpo_offline.stages.train.config import TrainConfig
    from gvpo_offline.stages.train.recipe import train

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "responses": r, "rewards": w}) + "\n" for p, r, w in STORY_GROUPS))
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"),
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "gvpo_offline", "precompute-ref", str(data), "--model", "tiny-org/stories260K",
           "--workdir", str(work), "--eval-fraction", "0.3", "--device", "cpu", "--max-length", "96",
           "--max-prompt-length", "32"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["model_id"] == "tiny-org/stories260K" and manifest["model_revision"] == COMMIT
    assert manifest["model_fingerprint"] == model_fingerprint(STORIES)
    assert Path(manifest["model_path"]).name == COMMIT

    missing = run_cli("precompute-ref", data, "--model", "other-org/missing", "--workdir", tmp_path / "other")
    assert missing.code == 2 and "Traceback" not in missing.err
    assert len(missing.err.strip().splitlines()) == 1 and "other-org/missing: not a local folder" in missing.err

    train(TrainConfig(workdir=work, beta=1.0, lr=1e-3, groups_per_step=4, max_steps=2, save_every=0,
                      progress=False, device="cpu", init_model="tiny-org/stories260K"), log=lambda _: None)
    saved = json.loads((work / "model" / "train_config.json").read_text())
    assert saved["base_model_id"] == "tiny-org/stories260K" and saved["base_model_revision"] == COMMIT
    assert "base_model: tiny-org/stories260K" in (work / "model" / "README.md").read_text()

    report = evaluate(EvalConfig(workdir=str(work), model_path="tiny-org/stories260K", beta=1.0, bootstrap=0,
                                 device="cpu"))
    assert report.model_is_reference  # the id is the cached reference: same content fingerprint
