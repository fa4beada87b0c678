"""precompute-ref: exact log-probs, stable splits, cache hits, invalidation, and resume after kill -9."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, write_jsonl
from rich.console import Console

from gvpo_offline.data import DataConfig
from gvpo_offline.data import tokenize
from gvpo_offline.data.tokenize import TokenizeConfig
from gvpo_offline.model import loading, scoring
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.stages import reference
from gvpo_offline.stages.reference.cache import load_split
from gvpo_offline.stages.reference.compute import PrecomputeConfig, precompute, precompute_extra

STORIES = REPO / "sample_data" / "stories260K"
WORDS = (
    "once upon a time there was a little girl named lily she loved to play outside in the park "
    "with her dog max and a big red ball one day the sun was warm and happy"
).split()
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def words(seed: int, n: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 13 + i * i) % len(WORDS)] for i in range(n))


def make_groups(n: int, start: int = 0) -> list[dict]:
    """n groups with distinct prompts, k = 2..4, responses of 1..24 words."""
    return [
        {
            "id": f"g{g}",
            "prompt": f"story {g}: " + words(g, 3 + g % 5),
            "responses": [words(g + 31 * i, 1 + (g * 5 + i * 7) % 24) for i in range(2 + g % 3)],
            "rewards": [float((g + i) % 3) for i in range(2 + g % 3)],
        }
        for g in range(start, start + n)
    ]


def run(workdir: Path, paths, **options) -> tuple[reference.Manifest, str]:
    """precompute() on grouped JSONL files; returns the manifest and what it printed."""
    out = io.StringIO()
    options.setdefault("tokenize", TokenizeConfig(max_length=64, max_prompt_length=24))
    config = PrecomputeConfig(
        data=DataConfig(tuple(str(p) for p in paths), "grouped"), model=str(options.pop("model", STORIES)),
        workdir=workdir, device="cpu", progress=False, **options,
    )
    manifest = precompute(config, Console(file=out, width=400))
    return manifest, out.getvalue()


def tables(workdir: Path) -> list:
    manifest = reference.read_manifest(workdir)
    return [pq.read_table(workdir / s) for s in manifest.shards]


@pytest.fixture(scope="module")
def stories():
    return loading.load_model(STORIES, torch.device("cpu")), loading.load_tokenizer(STORIES)


def plain_logp(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """Independent reference: one sequence, full logits, log_softmax over everything, sum response positions."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + response_ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(response_ids) - 1)
    return logp[positions, torch.tensor(response_ids)].sum().item()


def test_ref_logps_equal_plain_transformers_one_at_a_time(tmp_path, stories):
    model, tok = stories
    groups = make_groups(12)
    groups[0]["prompt"] = "story zero: " + words(0, 60)  # prompt truncated (> 24 tokens)
    groups[1]["responses"][0] = words(5, 80)  # response truncated (prompt + response > 64)
    groups[2]["prompt"] = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "tell me a story about max"},
    ]
    groups[3]["prompt"] = [{"role": "user", "content": words(3, 40)}]  # chat prompt truncated
    data = write_jsonl(tmp_path / "d.jsonl", groups)
    cfg = TokenizeConfig(max_length=64, max_prompt_length=24, prompt_template=TEMPLATE)
    # batch_tokens=300: several padded rows per forward, several forwards per shard
    manifest, _ = run(tmp_path / "w", [data], tokenize=cfg, eval_fraction=0.5, batch_tokens=300, shard_groups=5)

    rows = {(r["group_id"], r["response_index"]): r for s in ("train", "eval") for r in load_split(tmp_path / "w", s).to_pylist()}
    assert len(rows) == sum(len(g["responses"]) for g in groups)
    cut_prompts = cut_responses = 0
    for g in groups:
        if isinstance(g["prompt"], str):
            prompt_ids = tok(g["prompt"])["input_ids"]
        else:
            text = tok.apply_chat_template(g["prompt"], chat_template=TEMPLATE, add_generation_prompt=True, tokenize=False)
            prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
        cut_prompts += len(prompt_ids) > 24
        full_prompt_ids, prompt_ids = prompt_ids, prompt_ids[-24:]
        for i, response in enumerate(g["responses"]):
            if isinstance(g["prompt"], str):
                response_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            else:  # the assistant turn as the template renders it: "<assistant>" + response + "\n", no EOS
                whole = tok.apply_chat_template(g["prompt"] + [{"role": "assistant", "content": response}],
                                                chat_template=TEMPLATE, tokenize=False)
                assert whole == text + response + "\n"
                whole_ids = tok(whole, add_special_tokens=False)["input_ids"]
                assert whole_ids[: len(full_prompt_ids)] == full_prompt_ids
                response_ids = whole_ids[len(full_prompt_ids):]
                assert tok.eos_token_id not in response_ids
            cut_responses += len(prompt_ids) + len(response_ids) > 64
            response_ids = response_ids[: 64 - len(prompt_ids)]
            row = rows[(g["id"], i)]
            assert row["prompt_ids"] == prompt_ids and row["response_ids"] == response_ids
            assert row["n_tokens"] == len(response_ids) and row["reward"] == g["rewards"][i]
            assert abs(row["ref_logp"] - plain_logp(model, prompt_ids, response_ids)) < 1e-4
    assert (manifest.truncated_prompts, manifest.truncated_responses) == (cut_prompts, cut_responses)
    assert cut_prompts >= 2 and cut_responses >= 1
    assert manifest.complete and manifest.dtype == "float32" and len(manifest.shards) == 3
    assert manifest.inputs["response_rule"] == tokenize.RESPONSE_RULE  # in the key: a new rule recomputes


def test_split_is_stable_group_disjoint_and_independent_of_file_order(tmp_path):
    groups = make_groups(160)
    a = write_jsonl(tmp_path / "a.jsonl", groups[:90])
    b = write_jsonl(tmp_path / "b.jsonl", groups[90:])
    tok = TokenizeConfig(max_length=24, max_prompt_length=12)  # short: the split is what is tested

    def eval_prompts(workdir, paths):
        run(workdir, paths, tokenize=tok, eval_fraction=0.25, shard_groups=64)
        train, held = load_split(workdir, "train"), load_split(workdir, "eval")
        assert not set(train["group_id"].to_pylist()) & set(held["group_id"].to_pylist())  # group-disjoint
        return {tuple(p) for p in held["prompt_ids"].to_pylist()}, held

    first, held = eval_prompts(tmp_path / "w1", [a, b])
    again, _ = eval_prompts(tmp_path / "w2", [b, a])
    assert first == again
    assert 0.15 < len(first) / len(groups) < 0.35
    expected = {g["id"] for g in groups if reference.split_value(json.dumps(g["prompt"])) < 0.25}
    assert set(held["group_id"].to_pylist()) == expected


def test_eval_data_gives_the_held_out_groups(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_groups(6))
    b = write_jsonl(tmp_path / "b.jsonl", make_groups(3, start=100))
    manifest, _ = run(tmp_path / "w", [a], eval_data=(str(b),))
    assert manifest.counts["train"].groups == 6 and manifest.counts["eval"].groups == 3
    assert manifest.eval_fraction == 0.0 and len(manifest.eval_data_files) == 1
    assert set(load_split(tmp_path / "w", "eval")["group_id"].to_pylist()) == {"g100", "g101", "g102"}


def test_cache_hit_does_no_forward(tmp_path, monkeypatch, run_cli):
    data = write_jsonl(tmp_path / "d.jsonl", make_groups(5))
    workdir = tmp_path / "w"
    argv = ["precompute-ref", data, "--model", STORIES, "--workdir", workdir,
            "--device", "cpu", "--max-length", "64", "--max-prompt-length", "24", "--layout", "grouped"]
    assert run_cli(*argv).code == 0
    first = tables(workdir)

    def boom(*args, **kwargs):
        raise AssertionError("the model was used on a cache hit")

    monkeypatch.setattr(loading, "load_model", boom)
    monkeypatch.setattr(scoring, "sequence_logps", boom)
    result = run_cli(*argv, "--no-overwrite")
    assert result.code == 0 and "cache hit" in result.err and "no model loaded" in result.err
    assert all(x.equals(y) for x, y in zip(first, tables(workdir)))


def _copy_model(tmp_path: Path) -> Path:
    return Path(shutil.copytree(STORIES, tmp_path / "model"))


def _change_model(model_dir: Path) -> None:
    model = loading.load_model(model_dir, torch.device("cpu"))
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(model_dir)


def _change_tokenizer(model_dir: Path) -> None:
    path = model_dir / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": TEMPLATE}))


CHANGES = {
    "data file content": lambda t, kw: write_jsonl(t / "d.jsonl", make_groups(6)[::-1]),
    "model fingerprint": lambda t, kw: _change_model(t / "model"),
    "tokenizer fingerprint": lambda t, kw: _change_tokenizer(t / "model"),
    "tokenize setting max_length": lambda t, kw: kw.update(tokenize=TokenizeConfig(max_length=48, max_prompt_length=24)),
    "eval fraction": lambda t, kw: kw.update(eval_fraction=0.5),
}


@pytest.mark.parametrize("what", list(CHANGES))
def test_a_changed_input_recomputes_or_refuses(tmp_path, what):
    data = write_jsonl(tmp_path / "d.jsonl", make_groups(6))
    options = {"model": _copy_model(tmp_path)}
    before, _ = run(tmp_path / "w", [data], **options)
    CHANGES[what](tmp_path, options)

    with pytest.raises(GvpoError, match=f"{what} changed.*--no-overwrite"):
        run(tmp_path / "w", [data], overwrite=False, **options)
    after, out = run(tmp_path / "w", [data], **options)
    assert f"recomputing the reference cache: {what} changed" in out
    assert after.key != before.key and after.complete
    assert "cache hit" in run(tmp_path / "w", [data], overwrite=False, **options)[1]


def test_kill_9_then_rerun_gives_the_uninterrupted_cache(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_groups(80))
    options = {"shard_groups": 2, "tokenize": TokenizeConfig(max_length=64, max_prompt_length=24)}
    cmd = [sys.executable, "-m", "gvpo_offline.cli", "precompute-ref", str(data), "--model", str(STORIES),
           "--workdir", str(tmp_path / "killed"), "--device", "cpu", "--layout", "grouped", "--shard-groups", "2",
           "--max-length", "64", "--max-prompt-length", "24"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same intra-op threads as this process: same floats
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    ref = tmp_path / "killed" / "ref"
    deadline = time.monotonic() + 120
    while not (ref.is_dir() and any(ref.glob("shard-*.parquet"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"precompute-ref ended before any shard: {proc.communicate()[1].decode()}")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert not manifest["complete"], "the run finished before it was killed: use more data"

    resumed, out = run(tmp_path / "killed", [data], **options)
    assert "resuming" in out
    clean, _ = run(tmp_path / "clean", [data], **options)
    assert resumed.to_json() == clean.to_json()
    killed_tables, clean_tables = tables(tmp_path / "killed"), tables(tmp_path / "clean")
    assert len(killed_tables) == 40
    for x, y in zip(killed_tables, clean_tables):
        assert x.equals(y, check_metadata=True)
    assert not list(ref.glob(".*"))  # no temp files left


def test_ctrl_c_keeps_finished_shards_and_the_rerun_resumes(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", make_groups(12))
    clean, _ = run(tmp_path / "clean", [data], shard_groups=3)
    calls, real = [], scoring.batched_logps

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "batched_logps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "w", [data], shard_groups=3)
    assert not json.loads((tmp_path / "w" / "manifest.json").read_text())["complete"]
    assert sorted(p.name for p in (tmp_path / "w" / "ref").iterdir()) == ["shard-00000.parquet", "shard-00001.parquet"]
    monkeypatch.setattr(scoring, "batched_logps", real)
    resumed, out = run(tmp_path / "w", [data], shard_groups=3)
    assert "resuming: 2 of 4 shards" in out
    assert resumed.to_json() == clean.to_json()
    assert all(x.equals(y) for x, y in zip(tables(tmp_path / "w"), tables(tmp_path / "clean")))


def test_moved_model_and_data_are_a_hit_and_the_manifest_records_the_new_paths(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_groups(4))
    run(tmp_path / "w", [data], model=_copy_model(tmp_path))
    moved_model = (tmp_path / "model").rename(tmp_path / "moved-model")
    moved_data = data.rename(tmp_path / "moved.jsonl")
    manifest, out = run(tmp_path / "w", [moved_data], model=moved_model, overwrite=False)
    assert "cache hit" in out
    assert manifest.model_path == str(moved_model) and manifest.data_files[0]["path"] == str(moved_data)
    assert reference.read_manifest(tmp_path / "w") == manifest


def test_cli_clamps_to_the_model_context_and_reads_a_template_file(tmp_path, run_cli):
    groups = make_groups(4)
    groups[0]["prompt"] = [{"role": "user", "content": "hi"}]
    data = write_jsonl(tmp_path / "d.jsonl", groups)
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    result = run_cli("precompute-ref", data, "--model", STORIES, "--workdir", tmp_path / "w", "--device", "cpu",
                     "--max-length", "4096", "--prompt-template", tmp_path / "t.jinja", "--no-eos")
    err = result.err
    assert result.code == 0 and "clamped" in err and "512" in err and "truncated 0 prompts" in err
    manifest = reference.read_manifest(tmp_path / "w")
    assert manifest.tokenize == {"max_length": 512, "max_prompt_length": 511, "add_eos": False, "prompt_template": TEMPLATE}
    assert manifest.layout == "grouped" and manifest.model_path == str(STORIES)
    assert manifest.data_files[0]["sha256"] == hashlib.sha256(Path(data).read_bytes()).hexdigest()
    assert manifest.model_fingerprint == loading.model_fingerprint(STORIES)


def test_precompute_extra_uses_the_manifest_reference(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_groups(8))
    other = write_jsonl(tmp_path / "o.jsonl", make_groups(8))  # same groups, another file
    run(tmp_path / "w", [data], eval_fraction=0.0)
    sub = precompute_extra(tmp_path / "w", DataConfig((str(other),), "grouped"), device="cpu", progress=False,
                           console=Console(file=io.StringIO()))
    assert sub.parent == tmp_path / "w" / "extra"
    extra, train = load_split(sub, "eval"), load_split(tmp_path / "w", "train")
    assert extra.drop(["split"]).equals(train.drop(["split"]))
    assert load_split(sub, "train").num_rows == 0
    out = io.StringIO()
    assert precompute_extra(tmp_path / "w", DataConfig((str(other),), "grouped"), device="cpu", console=Console(file=out)) == sub
    assert "cache hit" in out.getvalue()


def test_bad_options_are_user_errors():
    with pytest.raises(GvpoError, match="eval-fraction"):
        PrecomputeConfig(data=DataConfig(("x",)), model="m", eval_fraction=1.5)
    with pytest.raises(GvpoError, match="shard-groups"):
        replace(PrecomputeConfig(data=DataConfig(("x",)), model="m"), shard_groups=0)


def test_no_recomputing_message_when_nothing_was_computed(tmp_path, monkeypatch):
    """A first run stopped before its first shard (Ctrl-C in the first batch) leaves a manifest but no
    cache: a rerun with other settings computes it without claiming to recompute (and --no-overwrite has
    nothing to protect)."""
    data = write_jsonl(tmp_path / "d.jsonl", make_groups(6))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring, "batched_logps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "w", [data])
    assert (tmp_path / "w" / reference.MANIFEST).is_file() and not list((tmp_path / "w").glob("ref/shard-*"))
    monkeypatch.undo()
    tokenize = TokenizeConfig(max_length=48, max_prompt_length=24)
    manifest, out = run(tmp_path / "w", [data], tokenize=tokenize, overwrite=False)
    assert manifest.complete and "recomputing the reference cache" not in out


def test_a_changed_response_rule_recomputes_the_cache(tmp_path, monkeypatch):
    from gvpo_offline.stages.reference import compute

    data = write_jsonl(tmp_path / "d.jsonl", make_groups(3))
    first, _ = run(tmp_path / "w", [data])
    monkeypatch.setattr(compute, "RESPONSE_RULE", "another rule")
    second, out = run(tmp_path / "w", [data])
    assert second.key != first.key and second.inputs["response_rule"] == "another rule"
    assert "recomputing the reference cache: rule that tokenizes responses changed" in out
