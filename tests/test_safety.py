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
def cache(workdir):
    """A private copy of conftest's stories260K cache (built once per module)."""
    return workdir


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
    from gvpo_offline.runtime.workdir import claim

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
    from gvpo_offline.runtime.workdir import lock

    with lock(cache, "train"):
        res = run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1")
    assert res.code == 2 and f"pid {os.getpid()}" in res.err
    data = small_data(tmp_path)
    with lock(cache, "train"), lock(cache, "ref", shared=True):  # a train holds ref shared
        res = run_cli(*precompute_args(data, cache))
    assert res.code == 2 and f"pid {os.getpid()}, train" in res.err
    assert not (cache / "metrics.jsonl").exists()


def test_the_manifest_is_complete_only_over_shards_of_its_own_key(run_cli, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from gvpo_offline.stages.reference import compute as reference

    data = small_data(tmp_path)
    work = tmp_path / "run"
    compute = reference._compute_shards

    def raced(workdir, manifest, *args, **kwargs):  # another run writes shard 1 meanwhile (no lock then)
        compute(workdir, manifest, *args, **kwargs)
        shard = workdir / manifest.shards[1]
        table = pq.read_table(shard)
        pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"gvpo.key": b"other run"}), shard)

    monkeypatch.setattr(reference, "_compute_shards", raced)
    res = run_cli(*precompute_args(data, work))
    assert res.code == 2 and "shard-00001.parquet: this shard was not computed from these inputs" in res.err
    assert not json.loads((work / "manifest.json").read_text())["complete"]
    monkeypatch.setattr(reference, "_compute_shards", compute)
    res = run_cli(*precompute_args(data, work))  # a rerun recomputes the foreign shard
    assert res.code == 0 and "resuming: 2 of 3 shards" in res.err


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


# ---- 11. faults: one line, an exit code, nothing half-written ---------------------------------------------


def test_disk_full_during_precompute_is_one_line_and_leaves_no_partial_files(run_cli, tmp_path, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    data = small_data(tmp_path)
    work = tmp_path / "run"

    def full(table, where, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))

    monkeypatch.setattr(pq, "write_table", full)
    res = run_cli(*precompute_args(data, work))
    last = res.err.strip().splitlines()[-1]
    assert res.code == 1 and last == f"error: No space left on device: {work / 'ref' / 'shard-00000.parquet'}"
    assert "Traceback" not in res.err
    assert not [p for p in work.rglob(".gvpo-tmp-*")]
    assert not json.loads((work / "manifest.json").read_text())["complete"]


def test_disk_full_while_saving_the_model_keeps_the_old_one(cache, run_cli, monkeypatch):
    import errno

    import torch

    args = ["train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--save-every", "0"]
    assert run_cli(*args).code == 0
    good = tree(cache / "model")

    def full(self, folder, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(torch.nn.Module, "save_pretrained", full, raising=False)
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    res = run_cli(*args, "--overwrite")
    assert res.code == 1 and "No space left on device" in res.err and "Traceback" not in res.err
    assert tree(cache / "model") == good and not list(cache.glob(".gvpo-*-model-*"))


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "nan", "--lr must be a finite number"),
    ("--weight-decay", "nan", "--weight-decay must be a finite number"),
    ("--device", "tpu", "unknown --device 'tpu'"),
    ("--beta", "inf", "--beta must be a finite number"),
])
def test_bad_numbers_and_devices_are_one_line(cache, run_cli, option, value, message):
    res = run_cli("train", "--workdir", cache, "--beta", "0.1", "--max-steps", "1", option, value)
    assert res.code == 2 and message in res.err and "Traceback" not in res.err


def test_eval_beta_inf_is_refused(cache, run_cli):
    res = run_cli("eval", "--workdir", cache, "--model", STORIES, "--beta", "inf")
    assert res.code == 2 and "--beta must be a finite number" in res.err


def test_init_model_with_a_smaller_vocabulary_is_one_line(cache, run_cli, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    small = tmp_path / "small"
    shutil.copytree(STORIES, small)
    config = AutoConfig.from_pretrained(STORIES)
    config.vocab_size = 64
    AutoModelForCausalLM.from_config(config).save_pretrained(small)
    res = run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--init-model", small)
    assert res.code == 2 and "vocabulary of 64 tokens" in res.err and "Traceback" not in res.err


def test_non_utf8_prompts_file_is_one_line(run_cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("Once upon a time\n".encode() + b"caf\xe9\n")
    res = run_cli("sample", prompts, "--model", STORIES, "--k", "2", "--reward", f"{DATA / 'reward.py'}:kindness",
                  "-o", tmp_path / "out.jsonl", "--device", "cpu")
    assert res.code == 2 and "line 2" in res.err and "not UTF-8" in res.err


def test_paths_with_brackets_are_printed_verbatim(run_cli, tmp_path):
    out = tmp_path / "[x]" / "out.jsonl"
    out.parent.mkdir()
    res = run_cli("convert", "gsm8k", DATA / "gsm8k" / "example_model_solutions.jsonl", "-o", out)
    assert res.code == 0, res.err
    assert "[x]" in "".join(res.err.split())


# ---- 12. signals: 130 / 143 after saving what can be saved --------------------------------------------------


def test_sigterm_during_train_saves_a_checkpoint_and_exits_143(cache, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "gvpo_offline", "train", "--workdir", str(cache), *TRAIN, "--max-steps", "100000",
           "--save-every", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cache / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    err = " ".join(err.split())
    assert "interrupted after step" in err and "--resume" in err and "Traceback" not in err
    steps = sorted(int(p.name.split("-")[1]) for p in (cache / "checkpoints").glob("step-*"))
    assert steps and steps[-1] == metrics.read_text().count("\n") and not (cache / "model").exists()


def test_ctrl_c_exit_code_is_130_not_0(cache, run_cli, monkeypatch):
    from gvpo_offline.stages.train import recipe as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "load_train_groups", interrupted)
    res = run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1")
    assert res.code == 130 and "interrupted" in res.err


# ---- 13. prompt templates -------------------------------------------------------------------------------


def test_prompt_template_typos_and_errors_are_one_line_and_leave_nothing(run_cli, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": [{"role": "user", "content": f"story {i}"}], "responses": ["a", "b"], "rewards": [0, 1]}
        for i in range(3)
    ])
    work = tmp_path / "run"
    res = run_cli(*precompute_args(chat, work, "--prompt-template", "chat.jnja"))
    assert res.code == 2 and "no such file" in res.err
    syntax_error = "{% for m in messages %}{{ m.content }"
    sandbox = "{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}"
    for template in (syntax_error, sandbox):
        res = run_cli(*precompute_args(chat, work, "--prompt-template", template))
        assert res.code == 2 and "Traceback" not in res.err, res.err
        assert res.err.strip().splitlines()[-1].startswith("error: --prompt-template: ")
        assert not work.exists()  # no manifest, not even the folder it made


# ---- 14. rewards -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, message", [
    ("def r(p, s):\n    return 'oops'\n  bad indent", "cannot import"),
    ("raise RuntimeError('boom at import')\ndef r(p, s): return 1.0", "boom at import"),
    ("import sys\ndef r(p, s):\n    sys.exit(0)", "SystemExit"),
    ("def r(p, s):\n    return '1.5'", "not a number"),
    ("def r(p, s):\n    return True", "not a number"),
    ("import time\ndef r(p, s):\n    time.sleep(30)\n    return 1.0", "--reward-timeout"),
])
def test_bad_reward_functions_are_one_line(run_cli, tmp_path, body, message):
    reward = tmp_path / "reward.py"
    reward.write_text(body + "\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n")
    res = run_cli("sample", prompts, "--model", STORIES, "--k", "2", "--reward", f"{reward}:r", "--max-new-tokens", "4",
                  "-o", tmp_path / "out.jsonl", "--device", "cpu", "--reward-timeout", "1")
    assert res.code == 2 and message in res.err and "Traceback" not in res.err, res.err
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_text()


# ---- 15. eval refuses another tokenizer and a changed reference ------------------------------------------------


def test_eval_refuses_a_model_with_another_tokenizer(cache, run_cli, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(STORIES, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    res = run_cli("eval", "--workdir", cache, "--model", other, "--beta", "0.1", "--device", "cpu")
    assert res.code == 2 and "tokenizer differs" in res.err


def test_generation_eval_refuses_a_changed_reference(run_cli, tmp_path):
    from gvpo_offline.runtime.workdir import claim

    work = claim(tmp_path / "run")
    ref = tmp_path / "ref"
    shutil.copytree(STORIES, ref)
    groups = text_groups(STORIES, STORY_GROUPS)
    for g in groups:
        g.split = "eval"
    build_cache(work, ref, groups)
    shutil.copy(STORIES / "config.json", ref / "model.safetensors")  # the reference's weights replaced
    trained = tmp_path / "trained"  # a model saved by train (not the reference)
    shutil.copytree(STORIES, trained)
    (trained / "train_config.json").write_text(json.dumps({"beta": 0.1}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\n")
    res = run_cli("eval", "--workdir", work, "--model", trained, "--beta", "0.1", "--bootstrap", "0", "--device", "cpu",
                  "--prompts", prompts, "--reward", f"{DATA / 'reward.py'}:kindness", "--max-new-tokens", "4")
    assert res.code == 2 and "reference model is missing or changed" in res.err, res.err


# ---- 16. file modes follow the umask ------------------------------------------------------------------


def test_written_files_follow_the_umask(tmp_path):
    from gvpo_offline.runtime.files import FILE_MODE, atomic_write_json

    atomic_write_json(tmp_path / "x.json", {})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == FILE_MODE == 0o666 & ~mask


def test_a_failed_torch_save_is_one_line(cache, run_cli, monkeypatch):
    import torch

    def failing_save(obj, f, *args, **kwargs):  # what torch.save raises on a full disk: no errno
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1151552 vs 1151440")

    monkeypatch.setattr(torch, "save", failing_save)
    res = run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--save-every", "1")
    assert res.code == 1 and "could not write" in res.err and "Traceback" not in res.err
    assert not [p for p in (cache / "checkpoints").iterdir()]


# ---- rewards beyond float range after arithmetic ------------------------------------------------------------


def test_rewards_whose_differences_overflow_are_refused_at_load(run_cli, tmp_path):
    groups = text_groups(STORIES, STORY_GROUPS)
    groups[1].rewards = [1e200, -1e200]
    groups[2].rewards = [1e300, 0.0, 0.0, 0.0, -1e300]
    groups[2].split = "eval"
    work = tmp_path / "run"
    build_cache(work, STORIES, groups)
    res = run_cli("train", "--workdir", work, *TRAIN, "--max-steps", "1")
    assert res.code == 2 and "group 'g0001'" in res.err and "rescale the rewards" in res.err
    res = run_cli("eval", "--workdir", work, "--model", STORIES, "--beta", "0.1", "--device", "cpu")
    assert res.code == 2 and "group 'g0002'" in res.err and "rescale the rewards" in res.err


# ---- signals in precompute-ref and in the generation eval -----------------------------------------------------


def _interrupt_when(cmd: list, ready, signum) -> tuple[int, str]:
    """Run the CLI in a subprocess, send ``signum`` once ``ready()`` holds; (exit code, stderr)."""
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gvpo_offline", *map(str, cmd)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_ctrl_c_during_precompute_exits_130_and_resumes(run_cli, tmp_path):
    import signal

    data = small_data(tmp_path, 40)
    work = tmp_path / "run"
    args = precompute_args(data, work, "--shard-groups", "2")
    code, err = _interrupt_when(args, lambda: len(list((work / "ref").glob("shard-*.parquet"))) >= 1, signal.SIGINT)
    assert code == 130 and "rerun to resume" in err and "Traceback" not in err, err
    assert not json.loads((work / "manifest.json").read_text())["complete"]
    res = run_cli(*args)
    assert res.code == 0 and "resuming" in res.err


def test_ctrl_c_stops_the_generation_eval(tmp_path):
    import signal

    groups = text_groups(STORIES, STORY_GROUPS)
    for g in groups:
        g.split = "eval"
    cache = tmp_path / "run"
    build_cache(cache, STORIES, groups)

    slow = tmp_path / "slow_reward.py"
    started = tmp_path / "started"
    slow.write_text(f"import pathlib, time\ndef r(p, s):\n    pathlib.Path({str(started)!r}).touch()\n"
                    "    time.sleep(0.5)\n    return 1.0\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"Once upon a time {i}\n" for i in range(40)))
    cmd = ["eval", "--workdir", cache, "--model", STORIES, "--beta", "0.1", "--device", "cpu", "--bootstrap", "0",
           "--prompts", prompts, "--reward", f"{slow}:r", "--max-new-tokens", "4", "--json", tmp_path / "r.json"]
    code, err = _interrupt_when(cmd, started.exists, signal.SIGINT)
    assert code == 130 and "interrupted" in err and not (tmp_path / "r.json").exists(), err


# ---- issue 20: data lost or silently wrong -------------------------------------------------------------


@pytest.mark.parametrize("content", [
    "my notes, one line without a newline",  # does not parse: still not ours
    '{"id": "1", "prompt": "p", "responses": ["a", "b"], "rewards": [0, 1]}',  # a group, but not ours
])
def test_sample_never_cuts_an_unterminated_line_it_did_not_write(run_cli, tmp_path, content):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n")
    reward = tmp_path / "reward.py"
    reward.write_text("def length(prompt, response):\n    return float(len(response))\n")
    out = tmp_path / "notes.jsonl"
    out.write_text(content)
    res = run_cli("sample", prompts, "--model", STORIES, "--k", "2", "--reward", f"{reward}:length", "-o", out,
                  "--max-new-tokens", "4", "--device", "cpu")
    assert res.code == 2 and "line 1" in res.err and "no newline" in res.err and "Traceback" not in res.err
    assert out.read_text() == content


def _sample(run_cli, tmp_path, rows, reward_body, fn, *extra):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    reward = tmp_path / "reward.py"
    reward.write_text(reward_body)
    out = tmp_path / "groups.jsonl"
    res = run_cli("sample", prompts, "--model", STORIES, "--k", "2", "--reward", f"{reward}:{fn}", "-o", out,
                  "--max-new-tokens", "4", "--device", "cpu", "--prompt-template", "{{ messages[0]['content'] }}",
                  *extra)
    return res, out


def test_a_reward_that_mutates_its_inputs_changes_nothing_that_is_written(run_cli, tmp_path):
    rows = [{"id": "a", "prompt": [{"role": "user", "content": "Once upon a time"}], "tags": ["x"]}]
    body = ("def grab(prompt, response, tags):\n"
            "    prompt.append({'role': 'assistant', 'content': response})\n"
            "    tags.append('seen')\n"
            "    return float(len(prompt) + len(tags))\n")
    res, out = _sample(run_cli, tmp_path, rows, body, "grab")
    assert res.code == 0, res.err
    (group,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert group["prompt"] == rows[0]["prompt"] and group["tags"] == ["x"]
    assert group["rewards"] == [4.0, 4.0]  # every call saw the row as read, not the previous call's edits


def test_a_row_the_reward_cannot_score_is_skipped_and_counted_never_written(run_cli, tmp_path):
    rows = [{"id": "1", "prompt": "Once upon a time", "ground_truth": "#### 18"},
            {"id": "2", "prompt": "Once upon a time", "ground_truth": None},
            {"id": "3", "prompt": "Once upon a time", "ground_truth": "no number at all"}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "groups.jsonl"
    res = run_cli("sample", prompts, "--model", STORIES, "--k", "2", "--reward",
                  "gvpo_offline.rewards:gsm8k_correct", "-o", out, "--max-new-tokens", "4", "--device", "cpu")
    assert res.code == 0, res.err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["1"]
    assert "skipped 2 prompts the reward could not score" in " ".join(res.err.split())


def test_a_row_field_named_like_the_rewards_response_parameter_is_one_line(run_cli, tmp_path, monkeypatch):
    from gvpo_offline.model import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("checked before loading"))
    rows = [{"id": "a", "prompt": "Once upon a time", "text": "a field"}]
    res, out = _sample(run_cli, tmp_path, rows, "def r(prompt, text, **row):\n    return 1.0\n", "r")
    assert res.code == 2 and "Traceback" not in res.err and "multiple values" not in res.err
    assert "prompt id 'a': the field 'text'" in " ".join(res.err.split()) and not out.exists()


# ---- issue 20: hostile config and data files ------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: true\n", "key 'lr': expected a number, got True"),
    ("train:\n  groups_per_step: yes\n", "key 'groups_per_step': expected an integer, got True"),
    ("train:\n  groups_per_step: 2.5\n", "key 'groups_per_step': expected an integer, got 2.5"),
    ("train:\n  max_steps: many\n", "key 'max_steps': expected an integer, got 'many'"),
    ("train:\n  merge: 'no'\n", "key 'merge': expected true or false, got 'no'"),
    ("workdir: yes\n", "key 'workdir': expected a string, got True"),
    ("train:\n  report_to: [tensorboard, {a: 1}]\n", "key 'report_to': expected a string (or a list of them)"),
])
def test_a_config_value_of_the_wrong_type_is_refused_naming_file_and_key(run_cli, tmp_path, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("beta: 0.1\n" + text)
    res = run_cli("train", "--config", cfg, "--workdir", tmp_path / "nowhere")
    assert res.code == 2 and message in res.err and str(cfg) in res.err and "Traceback" not in res.err
    cfg.write_text("beta: 0.1\ntrain:\n  lr: '1e-3'\n  groups_per_step: 4\n  merge: false\n")  # still accepted
    assert "no such workdir" in run_cli("train", "--config", cfg, "--workdir", tmp_path / "nowhere").err


@pytest.mark.parametrize("text, message", [
    ("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
     + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
     + "beta: *i\n", "expands to more than"),  # a "billion laughs" file: 9^9 values from 400 bytes
    ("a: &a [*a]\n", "contains itself"),
    ("beta: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("beta: 0.1\n#" + "x" * (1 << 20) + "\n", "at most"),
])
def test_a_hostile_yaml_config_is_refused_in_one_line(run_cli, tmp_path, text, message):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(text)
    res = run_cli("train", "--config", cfg)
    assert res.code == 2 and message in res.err and str(cfg) in res.err
    assert len(res.err.strip().splitlines()) == 1 and "Traceback" not in res.err


def test_rewards_too_large_for_the_loss_are_refused_by_the_first_stage(run_cli, tmp_path):
    rows = [{"prompt": "a", "responses": ["b", "c"], "rewards": [0.5, 1.0]},
            {"prompt": "d", "id": "huge", "responses": ["e", "f", "g"], "rewards": [1e200, 0.0, -1e200]}]
    data = write_jsonl(tmp_path / "huge.jsonl", rows)
    for cmd in (precompute_args(data, tmp_path / "run"), ["inspect", data]):
        res = run_cli(*cmd)
        assert res.code == 2 and "group 'huge'" in res.err and "rescale the rewards" in res.err
        assert "Traceback" not in res.err
    assert not (tmp_path / "run").exists()


def test_convert_from_hub_refuses_names_that_escape_and_bounds_the_scan(run_cli, tmp_path, monkeypatch):
    from gvpo_offline.stages import convert

    inner = tmp_path / "a" / "b" / "c"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    for name, message in (("../../..", "contains the current folder"), ("/", "contains the current folder"),
                          ("org/../../etc", "neither a hub dataset id"), ("~nobody-here/x", "neither a hub")):
        res = run_cli("convert", "nectar", "--from-hub", name, "-o", tmp_path / "out.jsonl")
        assert res.code == 2 and message in res.err and "Traceback" not in res.err, (name, res.err)
    big = tmp_path / "big"
    big.mkdir()
    for i in range(8):
        (big / f"f{i}.jsonl").write_text("{}\n")
    monkeypatch.setattr(convert, "MAX_DATASET_FILES", 5)
    res = run_cli("convert", "nectar", "--from-hub", big, "-o", tmp_path / "out.jsonl")
    assert res.code == 2 and "more than 5 files" in res.err
    assert not (tmp_path / "out.jsonl").exists()


def test_deeply_nested_json_is_one_line_with_file_and_line(run_cli, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    good = json.dumps({"prompt": "a", "responses": ["b", "c"], "rewards": [0, 1]})
    data = tmp_path / "deep.jsonl"
    data.write_text(good + "\n" + '{"prompt": "a", "responses": ' + deep + ', "rewards": [0, 1]}\n')
    array = tmp_path / "deep.json"
    array.write_text("[" + good + ",\n" + deep + "]")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a"}) + "\n" + '{"prompt": "b", "x": ' + deep + "}\n")
    first = tmp_path / "first.jsonl"  # convert reads rows lazily: the deep one first
    first.write_text('{"question": ' + deep + "}\n")
    shallow = tmp_path / "shallow.jsonl"  # parses, but too deep to copy for a reward
    shallow.write_text('{"prompt": "b", "x": ' + "[" * 500 + "]" * 500 + "}\n")
    reward = tmp_path / "reward.py"
    reward.write_text("def one(prompt, response, **row):\n    return 1.0\n")
    for cmd, where in (
        (["inspect", data], f"{data}: line 2:"),
        (["inspect", array], f"{array}: line 2:"),
        (["convert", "gsm8k", first, "-o", tmp_path / "out.jsonl"], f"{first}: line 1:"),
        (["sample", prompts, "--model", STORIES, "--k", "2", "--reward", f"{reward}:one", "-o", tmp_path / "g.jsonl"],
         f"{prompts}: line 2:"),
        (["sample", shallow, "--model", STORIES, "--k", "2", "--reward", f"{reward}:one", "-o", tmp_path / "g.jsonl"],
         f"{shallow}: line 1:"),
    ):
        res = run_cli(*cmd)
        assert res.code == 2 and where in res.err and "nested" in res.err, (cmd[0], res.err[-300:])
        assert "Traceback" not in res.err and "RecursionError" not in res.err
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "g.jsonl").exists()
