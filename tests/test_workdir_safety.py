"""Workdir-safety gaps closed after issue 15 (see README "Workdir and safety"): eval's locks, the cache
keys in eval's JSON, a β·ℓ that overflows in training, plot's workdir marker check, and data files
hashed once by precompute-ref. Each test fails on the code before the change."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from cachefixture import STORIES, STORY_GROUPS, build_cache, text_groups
from conftest import REPO, write_jsonl

TRAIN = ["--beta", "0.1", "--device", "cpu", "--groups-per-step", "2", "--lr", "1e-3"]
EVAL = ["--device", "cpu", "--bootstrap", "0"]


@pytest.fixture(scope="module")
def split_cache(tmp_path_factory) -> Path:
    """STORY_GROUPS scored by stories260K: groups 0-1 train, 2-3 eval; manifest key "cache-a"."""
    work = tmp_path_factory.mktemp("split") / "run"
    groups = text_groups(STORIES, STORY_GROUPS)
    for g in groups[2:]:
        g.split = "eval"
    build_cache(work, STORIES, groups)
    manifest = json.loads((work / "manifest.json").read_text())
    (work / "manifest.json").write_text(json.dumps({**manifest, "key": "cache-a"}))
    return work


@pytest.fixture
def cache(split_cache, tmp_path) -> Path:
    shutil.copytree(split_cache, tmp_path / "run")
    return tmp_path / "run"


def one_line(res) -> str:
    """The error line of a run that failed with exit code 2 (after train's own notes), never a traceback."""
    lines = res.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert res.code == 2 and errors == lines[-1:] and "Traceback" not in res.err, (res.code, res.err)
    return lines[-1]


# ---- 1. eval holds the workdir's locks ------------------------------------------------------------------


def test_eval_stops_while_precompute_or_train_rewrites_what_it_reads(cache, run_cli, tmp_path):
    from gvpo_offline.runtime.workdir import lock

    shutil.copytree(STORIES, cache / "model")  # as if trained
    with lock(cache, "ref"):  # a precompute-ref rewriting the cache
        err = one_line(run_cli("eval", "--workdir", cache, "--model", STORIES, "--beta", "0.1", *EVAL))
    assert f"pid {os.getpid()}, precompute-ref" in err
    with lock(cache, "train"):  # a train that will replace WORKDIR/model
        err = one_line(run_cli("eval", "--workdir", cache, "--beta", "0.1", *EVAL))
        assert f"pid {os.getpid()}, train" in err
        other = tmp_path / "other"  # the model's own workdir is locked, whichever --workdir eval scores on
        shutil.copytree(cache, other)
        err = one_line(run_cli("eval", "--workdir", other, "--model", cache / "model", "--beta", "0.1", *EVAL))
        assert str(cache) in err and f"pid {os.getpid()}, train" in err
        # a model outside the training workdir (here the reference) is read by nobody's train: allowed
        res = run_cli("eval", "--workdir", cache, "--model", STORIES, "--beta", "0.1", *EVAL)
        assert res.code == 0, res.err


def test_evals_run_side_by_side_and_block_train_and_precompute(cache, run_cli, tmp_path):
    from gvpo_offline.runtime.workdir import stage_locks

    shutil.copytree(STORIES, cache / "model")  # a model in the workdir: eval locks its train
    with stage_locks(cache, "eval", cache / "model"):  # another eval is reading the workdir
        res = run_cli("eval", "--workdir", cache, "--beta", "0.1", *EVAL)
        assert res.code == 0, res.err
        err = one_line(run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--overwrite"))
        assert "another gvpo-offline process (an eval) is using this workdir" in err
        data = tmp_path / "data.jsonl"
        data.write_text("".join((REPO / "sample_data" / "groups.jsonl").read_text().splitlines(True)[:4]))
        err = one_line(run_cli("precompute-ref", data, "--model", STORIES, "--workdir", cache, "--device", "cpu"))
        assert "(an eval)" in err
    assert json.loads((cache / "manifest.json").read_text())["key"] == "cache-a"  # untouched
    assert not (cache / "metrics.jsonl").exists()


def test_eval_needs_the_workdir_marker(cache, run_cli):
    (cache / ".gvpo-offline").unlink()
    err = one_line(run_cli("eval", "--workdir", cache, "--model", STORIES, "--beta", "0.1", *EVAL))
    assert "not a gvpo-offline workdir (no .gvpo-offline marker" in err
    assert "older version" in err  # it holds a reference cache: an older version made it


def test_a_folder_that_is_no_workdir_says_so(tmp_path, run_cli):
    """Issue 22.8: a wrong --workdir (a folder of the user's) is "no workdir here", not an older version's."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    for args in (("train", "--workdir", mine, "--beta", "1"), ("eval", "--workdir", mine, "--beta", "1")):
        err = one_line(run_cli(*args))
        assert f"{mine}: no workdir here" in err and "older version" not in err, err


# ---- 2. the eval JSON says which caches produced it -----------------------------------------------------


def test_eval_json_records_the_cache_keys(cache, run_cli, tmp_path):
    assert run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--save-every", "0").code == 0
    trained_on = json.loads((cache / "model" / "train_config.json").read_text())["cache_key"]
    assert trained_on == "cache-a"
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "key": "cache-b"}))  # re-made since training

    res = run_cli("eval", "--workdir", cache, "--json", tmp_path / "eval.json", *EVAL)
    assert res.code == 0, res.err
    meta = json.loads((tmp_path / "eval.json").read_text())["meta"]
    assert (meta["cache_key"], meta["data_cache_key"], meta["model_cache_key"]) == ("cache-b", "cache-b", "cache-a")

    data = tmp_path / "more.jsonl"  # --data: the rows come from the WORKDIR/extra/ cache, with its own key
    write_jsonl(data, [{"prompt": p, "responses": r, "rewards": w} for p, r, w in STORY_GROUPS[:2]])
    res = run_cli("eval", "--workdir", cache, "--model", STORIES, "--beta", "0.1", "--data", data,
                  "--json", tmp_path / "data.json", *EVAL)
    assert res.code == 0, res.err
    meta = json.loads((tmp_path / "data.json").read_text())["meta"]
    (extra,) = (cache / "extra").iterdir()
    extra_key = json.loads((extra / "manifest.json").read_text())["key"]
    assert len(extra_key) == 64 and extra_key != "cache-b"
    assert (meta["cache_key"], meta["data_cache_key"], meta["model_cache_key"]) == ("cache-b", extra_key, None)


# ---- 3. an implicit reward β·ℓ that overflows stops training, naming β ----------------------------------


def test_an_overflowing_implicit_reward_stops_training_naming_beta(cache, run_cli, tmp_path):
    from safetensors.torch import load_file, save_file

    sft = tmp_path / "sft"  # an --init-model other than the reference: ℓ ≠ 0 from step 1 on
    shutil.copytree(STORIES, sft)
    weights = load_file(sft / "model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, sft / "model.safetensors", metadata={"format": "pt"})
    args = ["train", "--workdir", cache, "--init-model", sft, "--beta", "1e200", "--device", "cpu",
            "--groups-per-step", "2", "--max-steps", "2", "--save-every", "1"]
    err = one_line(run_cli(*args))  # before: "the loss is not finite (inf) ... Check the cached rewards/ref_logp"
    assert "step 1 (epoch 0): the implicit reward β·ℓ overflows float64 in the loss (β = 1e+200" in err
    assert err.endswith("Lower --beta")
    assert not (cache / "model").exists() and not (cache / "metrics.jsonl").exists()
    assert not list((cache / "checkpoints").glob("step-*"))
    res = run_cli(*args[:6], "1e-3", *args[7:])  # the same run at a sane β trains
    assert res.code == 0, res.err


def test_the_implicit_reward_check_matches_the_loss():
    import torch

    from gvpo_offline.math.loss import gvpo_loss
    from gvpo_offline.stages.train.step import NonFiniteError, _check_implicit_reward

    ref = torch.tensor([-10.0, -12.0, -5.0, -5.0], dtype=torch.float64)
    policy = torch.tensor([-10.0, -10.0, -5.0, -5.0])  # ℓ = 0, 2 (group 0) and 0, 0 (group 1)
    gid, rewards = torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.float64)
    # group 0: β·ℓ = 0, 2β, mean β, squared deviations 2β²: finite up to β ≈ 9.5e153 (float64 max 1.8e308)
    for beta, overflows in ((1e153, False), (9e153, False), (1e154, True), (1e300, True), (float("1e308"), True)):
        assert bool(torch.isfinite(gvpo_loss(policy, ref, rewards, gid, beta))) != overflows
        if overflows:
            with pytest.raises(NonFiniteError, match=re.escape(f"β = {beta:g}, max |ℓ| = 2 nats")) as info:
                _check_implicit_reward(policy, ref, gid, beta)
            assert info.value.hint == "Lower --beta"
        else:
            _check_implicit_reward(policy, ref, gid, beta)
    with pytest.raises(NonFiniteError, match=r"policy's log-probs are not finite \(1 of 4 responses: ℓ = nan\)"):
        _check_implicit_reward(torch.tensor([-10.0, float("nan"), -5.0, -5.0]), ref, gid, 0.1)


# ---- 4. plot writes WORKDIR/plots only into a workdir ---------------------------------------------------


def test_plot_writes_into_a_workdir_only(tmp_path, run_cli):
    pytest.importorskip("matplotlib")
    from gvpo_offline.runtime.workdir import claim

    mine = tmp_path / "mine"  # the user's folder with a copied metrics.jsonl: no marker
    mine.mkdir()
    write_jsonl(mine / "metrics.jsonl", [{"step": s, "loss": 1.0 / s, "log_ratio_per_token": 0.0} for s in (1, 2)])
    before = sorted(p.name for p in mine.iterdir())
    err = one_line(run_cli("plot", mine))
    assert f"{mine}: not a gvpo-offline workdir (no .gvpo-offline marker)" in err and "--output-dir" in err
    assert sorted(p.name for p in mine.iterdir()) == before
    res = run_cli("plot", mine, "--out-dir", tmp_path / "figs")  # a folder the user names: fine
    assert res.code == 0, res.err
    assert (tmp_path / "figs" / "loss.png").is_file()
    work = claim(tmp_path / "work")
    shutil.copy(mine / "metrics.jsonl", work / "metrics.jsonl")
    res = run_cli("plot", work)
    assert res.code == 0, res.err
    assert (work / "plots" / "loss.png").is_file()


# ---- 5. precompute-ref hashes each data file once -------------------------------------------------------


def test_precompute_hashes_each_data_file_once(run_cli, tmp_path, monkeypatch):
    from gvpo_offline.data import sources

    lines = (REPO / "sample_data" / "groups.jsonl").read_text().splitlines(keepends=True)
    train, held = tmp_path / "data" / "train.jsonl", tmp_path / "data" / "held.jsonl"
    train.parent.mkdir()
    train.write_text("".join(lines[:6]))
    held.write_text("".join(lines[6:9]))
    hashed: list[str] = []
    real = sources.sha256_file

    def counting(path, *args, **kwargs):
        hashed.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sources, "sha256_file", counting)
    work = tmp_path / "run"
    res = run_cli("precompute-ref", train, "--eval-data", held, "--model", STORIES, "--workdir", work,
                  "--device", "cpu", "--shard-groups", "4")
    assert res.code == 0, res.err
    assert sorted(hashed) == ["held.jsonl", "train.jsonl"]  # a cache miss: once each (was twice)
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["train"]["groups"] == 6
    assert [f["sha256"] for f in manifest["data_files"] + manifest["eval_data_files"]] == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in (train, held)]
    assert manifest["inputs"]["data_files"] == [manifest["data_files"][0]["sha256"]]


# ---- issue 20: planted links and foreign output folders ---------------------------------------------------


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo"])
def test_a_lock_path_that_is_not_our_own_file_is_refused_and_its_target_untouched(cache, run_cli, tmp_path, plant):
    victim = tmp_path / "notes.txt"
    victim.write_text("the user's notes\n")
    for name in ("ref", "train"):
        lock_path = cache / f".gvpo-lock-{name}"
        lock_path.unlink(missing_ok=True)
        if plant == "symlink":
            lock_path.symlink_to(victim)
        elif plant == "hardlink":
            os.link(victim, lock_path)
        else:
            os.mkfifo(lock_path)
    err = one_line(run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--save-every", "0"))
    assert ".gvpo-lock-train" in err and "remove it" in err
    assert victim.read_text() == "the user's notes\n"
    assert not (cache / "model").exists()


def test_a_lock_file_is_never_truncated_and_names_its_holder(cache):
    from gvpo_offline.runtime.workdir import _holder, lock

    path = cache / ".gvpo-lock-ref"
    path.write_bytes(b"")
    with lock(cache, "ref"):
        assert f"pid {os.getpid()}" in _holder(cache, "ref")
        size = path.stat().st_size
    assert path.stat().st_size == size  # released by overwriting the pid, not by truncating
    assert "an eval" in _holder(cache, "ref")  # no pid left


@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoints", "model-merged", "tb", "hard:metrics.jsonl"])
def test_train_refuses_a_link_planted_where_it_writes(cache, run_cli, tmp_path, name):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    hard, name = name.startswith("hard:"), name.removeprefix("hard:")
    if hard:
        os.link(target / "keep.txt", cache / name)
    else:
        (cache / name).symlink_to(target if name != "metrics.jsonl" else target / "keep.txt")
    err = one_line(run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--save-every", "1",
                           "--report-to", "tensorboard", *(["--overwrite"] if name == "metrics.jsonl" else [])))
    assert f"{name}: is a {'hard' if hard else 'symbolic'} link" in err
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"


def test_plot_and_precompute_refuse_links_where_they_write(cache, run_cli, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (cache / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "log_ratio": 0.0}) + "\n")
    (cache / "plots").symlink_to(target)
    assert "plots: is a symbolic link" in one_line(run_cli("plot", cache))
    shutil.rmtree(cache / "ref")
    (cache / "ref").symlink_to(target)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "responses": ["b", "c"], "rewards": [0, 1]}])
    err = one_line(run_cli("precompute-ref", data, "--model", STORIES, "--workdir", cache, "--device", "cpu"))
    assert "ref: is a symbolic link" in err
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("name", ["model", "model-merged"])
def test_a_foreign_output_folder_is_refused_even_with_overwrite(cache, run_cli, name):
    (cache / name).mkdir()
    (cache / name / "config.json").write_text('{"mine": true}')
    before = {p.name: p.read_bytes() for p in (cache / name).iterdir()}
    args = ["train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--save-every", "0", "--lora-r", "2", "--merge"]
    for extra in ([], ["--overwrite"]):
        err = one_line(run_cli(*args, *extra))
        assert f"{name}: not a model folder written by gvpo-offline train" in err
    assert {p.name: p.read_bytes() for p in (cache / name).iterdir()} == before


def test_an_earlier_merged_model_goes_with_its_run(cache, run_cli):
    args = ["train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--save-every", "0", "--lora-r", "2"]
    assert run_cli(*args, "--merge").code == 0
    assert (cache / "model-merged" / "train_config.json").is_file()
    shutil.rmtree(cache / "model")
    (cache / "metrics.jsonl").unlink()
    assert "--overwrite" in one_line(run_cli(*args))  # model-merged/ alone is an earlier run too
    assert run_cli(*args, "--overwrite").code == 0
    assert (cache / "model" / "adapter_config.json").is_file() and not (cache / "model-merged").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".gvpo-old-")]


# ---- issue 20: resource blow-ups ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")
@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
def test_the_adapter_size_is_known_before_it_is_allocated(targets):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from gvpo_offline.model.adapters import LoraSettings, add_lora, lora_param_count

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32))
    for base, names in ((AutoModelForCausalLM.from_pretrained(STORIES), targets), (gpt2, "c_attn,c_fc")):
        settings = LoraSettings(r=3, target_modules=names)
        expected = lora_param_count(base, settings)
        peft_model = add_lora(base, settings)
        assert expected > 0 and expected == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def test_an_adapter_too_large_for_cpu_ram_is_refused_before_allocating(cache, run_cli, monkeypatch):
    from gvpo_offline.model import adapters, memory_plan

    monkeypatch.setattr(memory_plan, "available_ram_bytes", lambda: 1 << 30)
    monkeypatch.setattr(adapters, "add_lora", lambda *a, **k: pytest.fail("allocated the adapter"))
    err = one_line(run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--lora-r", "100000"))
    assert "does not fit: the LoRA adapter has" in err and "1.00 GiB free" in err and "--lora-r" in err
