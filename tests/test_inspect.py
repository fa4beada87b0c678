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
