"""Issue 15: never lose a user's file, never show a traceback (workdir ownership, cache integrity,
checkpoints, faults and signals). Each test reproduces one reported failure."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from cachefixture import STORIES, STORY_GROUPS, build_cache, text_groups
from conftest import REPO, write_jsonl

DATA = REPO / "sample_data"


def tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below ``folder`` (hidden ones included)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def small_data(tmp_path: Path, n: int = 12) -> Path:
    lines = (DATA / "groups.jsonl").read_text().splitlines(keepends=True)[:n]
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


def precompute_args(data: Path, work: Path, *extra) -> list:
    return ["precompute-ref", data, "--model", STORIES, "--workdir", work, "--device", "cpu",
            "--eval-fraction", "0", "--shard-groups", "4", *extra]


TRAIN = ["--beta", "0.1", "--device", "cpu", "--groups-per-step", "2", "--lr", "1e-3"]


@pytest.fixture
def cache(tmp_path):
    """A complete stories260K cache built directly (4 groups, train split)."""
    work = tmp_path / "run"
    build_cache(work, STORIES, text_groups(STORIES, STORY_GROUPS))
    return work


# ---- 1. a folder of the user's is never written into ------------------------------------------------


def test_a_non_empty_folder_without_the_marker_is_refused_and_untouched(run_cli, tmp_path):
    data = small_data(tmp_path)
    mine = tmp_path / "mine"
    for name, text in {"model/config.json": "{}", "metrics.jsonl": "mine\n", "manifest.json": "{}",
                       "ref/shard-00000.parquet": "x", ".old-backup/a": "a", ".tmp-notes/b": "b"}.items():
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(text)
    before = tree(mine)
    res = run_cli(*precompute_args(data, mine))
    assert res.code == 2 and "not a gvpo-offline workdir" in res.err and "Traceback" not in res.err
    assert run_cli("train", "--workdir", mine, *TRAIN).code == 2
    assert tree(mine) == before


def test_cleanup_only_touches_the_tools_own_temp_names(cache, run_cli):
    for name in (".old-backup", ".tmp-notes"):
        (cache / name).mkdir()
        (cache / name / "keep.txt").write_text("mine")
    (cache / "checkpoints").mkdir()
    (cache / "checkpoints" / ".gvpo-tmp-step-3-99").mkdir()  # what a kill -9 mid-save leaves
    assert run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--save-every", "0").code == 0
    assert (cache / ".old-backup" / "keep.txt").is_file() and (cache / ".tmp-notes" / "keep.txt").is_file()
    assert not (cache / "checkpoints" / ".gvpo-tmp-step-3-99").exists()


def test_the_workdir_is_never_read_as_data(run_cli, tmp_path):
    data = small_data(tmp_path)
    work = data.parent / "gvpo-run"  # inside the data folder
    assert run_cli(*precompute_args(data.parent, work)).code == 0
    res = run_cli(*precompute_args(data.parent, work))
    assert res.code == 0 and "cache hit" in res.err  # its own manifest.json was not read as a data file
    res = run_cli(*precompute_args(work / "manifest.json", tmp_path / "other"))
    assert res.code == 2 and "never read as data" in res.err


# ---- 2. the reference of a second round is never overwritten ----------------------------------------


def test_train_refuses_to_overwrite_the_reference_model(run_cli, tmp_path):
    from gvpo_offline.workdir import claim

    work = claim(tmp_path / "run")
    shutil.copytree(STORIES, work / "model")  # round 1's model, now round 2's reference
    build_cache(work, work / "model", text_groups(STORIES, STORY_GROUPS))
    before = tree(work / "model")
    res = run_cli("train", "--workdir", work, *TRAIN, "--max-steps", "1", "--overwrite")
    assert res.code == 2 and "would overwrite" in res.err
    assert tree(work / "model") == before


# ---- 3. a failing precompute keeps the complete cache -------------------------------------------------


def test_a_precompute_that_fails_validation_leaves_the_old_cache_complete(run_cli, tmp_path):
    data = small_data(tmp_path)
    work = tmp_path / "run"
    assert run_cli(*precompute_args(data, work)).code == 0
    before = tree(work)
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": [{"role": "user", "content": f"story {i}"}], "responses": ["a", "b"], "rewards": [0, 1]}
        for i in range(3)
    ])
    res = run_cli(*precompute_args(chat, work))
    assert res.code == 2 and "chat template" in res.err
    assert tree(work) == before and json.loads((work / "manifest.json").read_text())["complete"]


# ---- 4. a second train does not silently replace the first ------------------------------------------


def test_a_second_train_needs_overwrite_and_eval_names_the_caches(cache, run_cli, tmp_path):
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "key": "first-run"}))
    args = ["train", "--workdir", cache, *TRAIN, "--max-steps", "2", "--save-every", "0"]
    assert run_cli(*args).code == 0
    metrics, model = (cache / "metrics.jsonl").read_text(), tree(cache / "model")
    res = run_cli(*args)
    assert res.code == 2 and "--overwrite" in res.err
    assert (cache / "metrics.jsonl").read_text() == metrics and tree(cache / "model") == model
    assert run_cli(*args, "--overwrite").code == 0

    other = tmp_path / "other"  # another precompute run (other groups) with the same reference model
    groups = text_groups(STORIES, STORY_GROUPS[:3])
    for g in groups:
        g.split = "eval"
    build_cache(other, STORIES, groups)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "key": "another-run"}))
    res = run_cli("eval", "--workdir", other, "--model", cache / "model", "--bootstrap", "0", "--device", "cpu")
    assert res.code == 0, res.err
    err = " ".join(res.err.split())
    assert "trained on the cache of another precompute-ref run (key first-run)" in err and "another-run" in err


# ---- 5. one writer per stage --------------------------------------------------------------------------


def test_a_second_writer_stops_naming_the_first(cache, run_cli, tmp_path):
    from gvpo_offline.workdir import lock

    with lock(cache, "train"):
        res = run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1")
    assert res.code == 2 and f"pid {os.getpid()}" in res.err
    data = small_data(tmp_path)
    with lock(cache, "train"), lock(cache, "ref", shared=True):  # a train holds ref shared
        res = run_cli(*precompute_args(data, cache))
    assert res.code == 2 and f"pid {os.getpid()}, train" in res.err
    assert not (cache / "metrics.jsonl").exists()


def test_the_manifest_is_complete_only_over_shards_of_its_own_key(run_cli, tmp_path):
    import pyarrow.parquet as pq

    data = small_data(tmp_path)
    work = tmp_path / "run"
    assert run_cli(*precompute_args(data, work)).code == 0
    shard = work / "ref" / "shard-00001.parquet"
    table = pq.read_table(shard)
    meta = {**table.schema.metadata, b"gvpo.key": b"another run's key"}
    pq.write_table(table.replace_schema_metadata(meta), shard)
    (work / "ref" / "shard-00002.parquet").unlink()
    manifest = json.loads((work / "manifest.json").read_text())
    (work / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    res = run_cli(*precompute_args(data, work))  # resumes: the foreign shard is recomputed, not trusted
    assert res.code == 0, res.err
    assert pq.read_schema(shard).metadata[b"gvpo.key"] == manifest["key"].encode()


# ---- 6. a non-finite model is never saved ---------------------------------------------------------------


def test_non_finite_weights_are_never_saved(cache, run_cli, monkeypatch):
    import torch

    step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):  # weights overflow in the update (finite loss and gradient)
        out = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    args = ["train", "--workdir", cache, *TRAIN, "--max-steps", "2", "--save-every", "1"]
    assert run_cli(*args[:-1], "0", "--max-steps", "1").code == 0  # a good model/ from an earlier run
    good = tree(cache / "model")
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    res = run_cli(*args, "--overwrite")
    assert res.code == 2 and "not finite" in res.err and "not saving" in res.err
    assert tree(cache / "model") == good and not list((cache / "checkpoints").glob("step-*"))


# ---- 7. - 10. cache and checkpoint integrity ------------------------------------------------------------


def test_shard_paths_must_stay_inside_ref(cache, run_cli, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(cache / "ref" / "shard-00000.parquet", outside / "x.parquet")
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "shards": ["../outside/x.parquet"]}))
    res = run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1")
    assert res.code == 2 and "ref/shard-NNNNN.parquet" in res.err and "Traceback" not in res.err


def test_a_damaged_shard_is_detected_and_repaired(run_cli, tmp_path):
    data = small_data(tmp_path)
    work = tmp_path / "run"
    assert run_cli(*precompute_args(data, work)).code == 0
    good = tree(work / "ref")
    shard = work / "ref" / "shard-00001.parquet"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, other content
    shard.write_bytes(bytes(blob))
    res = run_cli("train", "--workdir", work, *TRAIN, "--max-steps", "1")
    assert res.code == 2 and "corrupt" in res.err and "Traceback" not in res.err
    (work / "ref" / "shard-00002.parquet").unlink()
    res = run_cli("train", "--workdir", work, *TRAIN, "--max-steps", "1")
    assert res.code == 2 and "missing" in res.err
    res = run_cli(*precompute_args(data, work))
    assert res.code == 0 and "repairing" in res.err and "cache hit" not in res.err
    assert tree(work / "ref") == good
    assert "cache hit" in run_cli(*precompute_args(data, work)).err


def test_resume_falls_back_from_a_corrupt_checkpoint(cache, run_cli):
    args = ["train", "--workdir", cache, *TRAIN, "--max-steps", "3", "--save-every", "1"]
    assert run_cli(*args).code == 0
    weights = cache / "checkpoints" / "step-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    res = run_cli(*args, "--resume")
    assert res.code == 0, res.err
    err = "".join(res.err.split())  # rich wraps long paths
    assert "step-3isunusable" in err and "resumingfrom" in err and "step-2(step2/3)" in err
    for step in (2, 3):
        (cache / "checkpoints" / f"step-{step}" / "optimizer.pt").unlink()
    res = run_cli(*args, "--resume")
    assert res.code == 2 and "no usable checkpoint" in res.err


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"surprise": 1}'])
def test_a_malformed_manifest_is_one_line(cache, run_cli, content):
    (cache / "manifest.json").write_text(content)
    res = run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1")
    assert res.code == 2 and "not a valid gvpo-offline manifest" in res.err
    assert len(res.err.strip().splitlines()) == 1
