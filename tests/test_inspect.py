"""`gvpo-offline inspect`: the summary (text and --json), token lengths with --model, and its errors."""

from __future__ import annotations

import json
import math

import pytest
from conftest import REPO, write_jsonl

STORIES = REPO / "sample_data" / "stories260K"

ROWS = [
    {"prompt": "Once upon a time", "responses": ["there was a dog.", "there was a dog.", "a cat sat."], "rewards": [1, 1, 0]},
    {"prompt": "Lily went to the park and saw a big red ball", "responses": ["She played.", "She ran home to tell her mom about it."], "rewards": [2, 2]},
    {"prompt": "The sun", "responses": ["was hot."], "rewards": [0.5]},
]


def test_inspect_json_summary(tmp_path, run_cli):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    result = run_cli("inspect", path, "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)  # stdout holds the JSON object and nothing else
    assert set(summary) == {"layout", "files", "stats", "tokens"}
    assert summary["layout"] == "grouped" and summary["tokens"] is None
    assert [f["path"] for f in summary["files"]] == [str(path)]
    stats = summary["stats"]
    assert {k: stats[k] for k in ("n_rows", "n_groups", "n_responses", "k_hist", "dropped_k1_groups")} == {
        "n_rows": 3, "n_groups": 2, "n_responses": 5, "k_hist": {"2": 1, "3": 1}, "dropped_k1_groups": 1,
    }
    assert (stats["groups_with_duplicates"], stats["duplicate_responses"], stats["all_equal_reward_groups"]) == (1, 1, 1)
    assert stats["reward_mean"] == pytest.approx(6 / 5) and (stats["reward_min"], stats["reward_max"]) == (0, 2)
    assert stats["mean_group_reward_spread"] == pytest.approx(0.5)


def test_inspect_text_summary(tmp_path, run_cli):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    result = run_cli("inspect", path)
    assert result.code == 0, result.err
    for text in ("grouped layout", "k distribution", "2: 1, 3: 1", "dropped groups with k = 1", "rewards", "d.jsonl"):
        assert text in result.out
    assert "tokens" not in result.out


def test_inspect_flat_with_column_flags(tmp_path, run_cli):
    rows = [{"q": "A", "a": "x", "s": 1, "g": "one"}, {"q": "A", "a": "y", "s": 0, "g": "one"}]
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    args = ["--prompt-col", "q", "--response-col", "a", "--reward-col", "s", "--group-col", "g", "--json"]
    result = run_cli("inspect", path, "--layout", "flat", *args)
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["layout"] == "flat" and summary["stats"]["k_hist"] == {"2": 1}


def _nearest_rank(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def test_inspect_token_lengths_with_model(tmp_path, run_cli):
    from transformers import AutoTokenizer

    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    result = run_cli("inspect", path, "--model", STORIES, "--max-length", "16", "--max-prompt-length", "8", "--json")
    assert result.code == 0, result.err
    tokens = json.loads(result.out)["tokens"]

    tok = AutoTokenizer.from_pretrained(STORIES)
    kept = [r for r in ROWS if len(r["responses"]) > 1]
    prompts = [len(tok(r["prompt"])["input_ids"]) for r in kept]  # with BOS
    responses = [(len(tok(x, add_special_tokens=False)["input_ids"]) + 1, p) for r, p in zip(kept, prompts) for x in r["responses"]]
    assert tokens["max_length"] == 16 and tokens["max_prompt_length"] == 8
    assert tokens["prompts"] == {
        "n": 2, "p50": _nearest_rank(prompts, 50), "p90": _nearest_rank(prompts, 90),
        "p99": _nearest_rank(prompts, 99), "max": max(prompts), "truncated": sum(p > 8 for p in prompts),
    }
    lengths = [n for n, _ in responses]
    assert tokens["responses"]["n"] == 5 and tokens["responses"]["max"] == max(lengths)
    assert tokens["responses"]["p50"] == _nearest_rank(lengths, 50)
    assert tokens["responses"]["truncated"] == sum(n > 16 - min(p, 8) for n, p in responses)
    assert tokens["prompts"]["truncated"] >= 1 and tokens["responses"]["truncated"] >= 1  # the limits bite


def test_inspect_text_with_model_and_chat_prompts(tmp_path, run_cli):
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "responses": ["Hello.", "Hey."], "rewards": [1, 0]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = run_cli("inspect", path, "--model", STORIES)
    assert result.code == 2 and "chat template" in result.err and result.out == ""
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    result = run_cli("inspect", path, "--model", STORIES, "--prompt-template", template)
    assert result.code == 0, result.err
    assert "tokens (before truncation)" in result.out and "prompts" in result.out


def test_inspect_model_errors(tmp_path, run_cli):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    result = run_cli("inspect", path, "--model", tmp_path / "missing")
    assert result.code == 2 and "missing: not a folder" in result.err
    result = run_cli("inspect", path, "--model", tmp_path)
    assert result.code == 2 and "not a model folder" in result.err
    result = run_cli("inspect", path, "--model", STORIES, "--max-length", "8", "--max-prompt-length", "8")
    assert result.code == 2 and "--max-prompt-length (8) must be smaller" in result.err


def test_inspect_help(run_cli):
    result = run_cli("inspect", "--help")
    assert result.code == 0
    for option in ("--layout", "--prompt-col", "--response-col", "--reward-col", "--group-col", "--model",
                   "--max-length", "--max-prompt-length", "--json"):
        assert option in result.out


# ---- truncation: one clamping rule with precompute-ref, a visible warning ------------------------


def _long_rows(n_groups: int) -> list[dict]:
    """Groups whose second response is ~700 tokens (stories260K's context is 512), the first short."""
    long_text = " ".join(["Lily saw a big red ball in the park and she was very happy."] * 40)
    return [{"prompt": f"Story {g}: once upon a time", "responses": [f"A dog {g} ran.", long_text],
             "rewards": [0.0, 1.0]} for g in range(n_groups)]


def test_inspect_clamps_like_precompute_ref_and_warns(tmp_path, run_cli):
    """Default --max-length 1024 > the model's 512: inspect counts the truncation precompute-ref does."""
    import logging

    path = write_jsonl(tmp_path / "long.jsonl", _long_rows(6))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        inspected = run_cli("inspect", path, "--model", STORIES, "--json")
        computed = run_cli("precompute-ref", path, "--model", STORIES, "--workdir", tmp_path / "w",
                           "--eval-fraction", "0", "--device", "cpu")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert inspected.code == 0 and computed.code == 0, inspected.err + computed.err
    tokens = json.loads(inspected.out)["tokens"]
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert tokens["max_length"] == manifest["tokenize"]["max_length"] == 512
    assert tokens["responses"]["truncated"] == manifest["truncated_responses"] == 6  # half of the 12
    for result in (inspected, computed):
        warning = [line for line in result.err.splitlines() if line.startswith("warning: 50.0% of the responses")]
        assert len(warning) == 1 and "(6 of 12)" in warning[0]
    assert "clamped to the model's context (512 tokens" in inspected.err
    assert not [r for r in records if "sequence length is longer" in r.getMessage()]  # expected here: silenced


def test_no_truncation_warning_below_five_percent(tmp_path, run_cli):
    rows = _long_rows(1) + [{"prompt": f"Tale {g}", "responses": ["A cat.", "A dog."], "rewards": [0, 1]}
                            for g in range(10)]  # 1 of 22 responses cut: 4.5%
    result = run_cli("inspect", write_jsonl(tmp_path / "d.jsonl", rows), "--model", STORIES, "--json")
    assert result.code == 0 and json.loads(result.out)["tokens"]["responses"]["truncated"] == 1
    assert "warning" not in result.err
