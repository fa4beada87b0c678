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


def _files_naming(folder: Path, text: str) -> list[str]:
    """Files under ``folder`` whose bytes contain ``text``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and text.encode() in p.read_bytes())


def test_model_folders_of_a_hub_base_name_it_by_id_with_its_license_and_no_local_path(tmp_path, hf_home):
    """Whether the base came as a hub id or as its snapshot folder in the HF cache: adapter_config.json,
    config.json, the card (base_model, the base card's license) and train_config.json of model/,
    model-merged/ and every checkpoint name the hub id, and no file holds a local absolute path."""
    from cachefixture import build_cache, text_groups
    from huggingface_hub import ModelCard

    from gvpo_offline.model.adapters import LoraSettings
    from gvpo_offline.stages.train.config import TrainConfig
    from gvpo_offline.stages.train.recipe import train

    snapshot = hf_home / "hub" / "models--tiny-org--stories260K" / "snapshots" / COMMIT
    (snapshot / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\n"
                                        "license_link: https://example.org/LICENSE\n---\n# stories260K\n")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "responses": r, "rewards": w}) + "\n" for p, r, w in STORY_GROUPS))
    work = tmp_path / "run"
    build_cache(work, snapshot, text_groups(snapshot, STORY_GROUPS))  # --model given as the snapshot folder
    common = dict(workdir=work, beta=1.0, lr=1e-3, groups_per_step=2, max_steps=2, save_every=1, progress=False,
                  device="cpu")
    folders = {}
    for label, kw in (("lora", dict(lora=LoraSettings(r=2), merge=True)),
                      ("dpo", dict(loss="dpo", init_model="tiny-org/stories260K"))):
        train(TrainConfig(**common, **kw), log=lambda _: None)
        folders[label] = work.rename(tmp_path / f"run-{label}")
        shutil.copytree(folders[label], work, ignore=shutil.ignore_patterns("model*", "checkpoints", "metrics.jsonl"))

    lora, dpo = folders["lora"], folders["dpo"]
    uploads = [lora / "model", lora / "model-merged", *(lora / "checkpoints").iterdir(), dpo / "model"]
    for folder in uploads:
        assert _files_naming(folder, str(tmp_path)) == [], folder  # no local path anywhere (hf_home is in tmp_path)
    adapter_config = json.loads((lora / "model" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "tiny-org/stories260K" and adapter_config["revision"] == COMMIT
    for step in (lora / "checkpoints").iterdir():
        assert json.loads((step / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-org/stories260K"
    for folder, title in ((lora / "model", "# GVPO policy (LoRA adapter)"), (lora / "model-merged", "# GVPO policy"),
                          (dpo / "model", "# DPO policy")):
        card = ModelCard.load(folder / "README.md")
        assert card.data.base_model == "tiny-org/stories260K"
        assert (card.data.license, card.data.license_name) == ("other", "tiny-license")
        assert card.data.license_link == "https://example.org/LICENSE"
        assert title + "\n" in card.text and ("GVPO" not in card.text) == (folder.parent == dpo)
    assert "`--loss dpo`" in (dpo / "model" / "README.md").read_text()
    assert "dpo" in ModelCard.load(dpo / "model" / "README.md").data.tags


def test_a_base_without_a_card_gives_no_license(tmp_path):
    from gvpo_offline.model.modelcard import base_license

    assert base_license(STORIES) == {}
    (tmp_path / "README.md").write_text("# no YAML header\n")
    assert base_license(tmp_path) == {}
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\ntext\n")
    assert base_license(tmp_path) == {"license": "apache-2.0"}
