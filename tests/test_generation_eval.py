"""Generation eval for a user's own data (issue 22.4): `eval --prompts eval` takes the held-out split's
prompts with their row fields, --prompt-col names the prompt field of --prompts, the reward's signature is
checked against the fields before any model work, and --samples-out keeps every generated text."""

from __future__ import annotations

import json

import pytest
from cachefixture import STORIES
from conftest import write_jsonl

ROWS = [
    {"prompt": "Tom had a toy car.", "responses": ["He played.", "It broke."], "rewards": [1.0, 0.0],
     "ground_truth": "abc"},
    {"prompt": "Lily went to the park.", "responses": ["She saw a bird.", "She cried."], "rewards": [0.5, 0.1],
     "ground_truth": "abcdefg"},
    {"prompt": "The sun was shining.", "responses": ["The birds sang.", "It was hot."], "rewards": [0.2, 0.4],
     "ground_truth": "ab"},
]


@pytest.fixture(scope="module")
def heldout_workdir(tmp_path_factory):
    """A cache whose groups are all held out (--eval-fraction 1), from rows with a ground_truth field."""
    from gvpo_offline.data import DataConfig
    from gvpo_offline.data.tokenize import TokenizeConfig
    from gvpo_offline.stages.reference.compute import PrecomputeConfig, precompute

    root = tmp_path_factory.mktemp("gen")
    data = write_jsonl(root / "data.jsonl", ROWS)
    precompute(PrecomputeConfig(DataConfig((str(data),)), str(STORIES), root / "run", TokenizeConfig(64, 32),
                                eval_fraction=1.0, device="cpu", progress=False))
    return root / "run"


def _eval(run_cli, workdir, *args):
    return run_cli("eval", "--workdir", workdir, "--model", STORIES, "--beta", 1, "--bootstrap", 0,
                   "--device", "cpu", "--samples-per-prompt", 2, "--max-new-tokens", 4, *args)


def test_prompts_eval_passes_row_fields_and_samples_out(heldout_workdir, tmp_path, run_cli):
    reward = tmp_path / "reward.py"
    reward.write_text("def gt_length(prompt, response, ground_truth):\n    return float(len(ground_truth))\n")
    samples, report = tmp_path / "samples.jsonl", tmp_path / "report.json"
    result = _eval(run_cli, heldout_workdir, "--prompts", "eval", "--reward", f"{reward}:gt_length",
                   "--samples-out", samples, "--json", report)
    assert result.code == 0, result.err
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    truth = {row["prompt"]: len(row["ground_truth"]) for row in ROWS}
    assert {line["prompt"] for line in lines} == set(truth)  # every held-out prompt
    assert len(lines) == 3 * 2  # the reference is the model here: its samples are written once
    for line in lines:
        assert line["reward"] == truth[line["prompt"]] and line["model"] == "trained"
        assert isinstance(line["sample"], str) and line["sample_index"] in (0, 1)
    generation = json.loads(report.read_text())["generation"]
    assert generation["model_mean_reward"] == pytest.approx(sum(truth.values()) / 3)


def test_reward_signature_is_checked_before_any_model_work(heldout_workdir, tmp_path, run_cli, monkeypatch):
    from gvpo_offline.model import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    reward = tmp_path / "reward.py"
    reward.write_text("def needs_answer(prompt, response, answer):\n    return 0.0\n"
                      "def one_arg(prompt):\n    return 0.0\n")
    result = _eval(run_cli, heldout_workdir, "--prompts", "eval", "--reward", f"{reward}:needs_answer")
    assert result.code == 2
    assert "parameter 'answer' is not a field of prompt 1 of --prompts eval" in result.err
    assert "row fields there: ground_truth" in result.err and "Traceback" not in result.err
    result = _eval(run_cli, heldout_workdir, "--prompts", "eval", "--reward", f"{reward}:one_arg")
    assert result.code == 2 and "a reward is called as fn(prompt, response, **row fields)" in result.err


def test_prompt_col_applies_to_prompts(heldout_workdir, tmp_path, run_cli):
    prompts = write_jsonl(tmp_path / "questions.jsonl", [{"question": "Tom had a toy car.", "level": 3},
                                                         {"question": "Once upon a time", "level": 5}])
    reward = tmp_path / "reward.py"
    reward.write_text("def level(prompt, response, **fields):\n    return float(fields['level'])\n")
    samples = tmp_path / "samples.jsonl"
    result = _eval(run_cli, heldout_workdir, "--prompts", prompts, "--prompt-col", "question",
                   "--reward", f"{reward}:level", "--samples-out", samples)
    assert result.code == 0, result.err
    got = {(line["prompt"], line["reward"]) for line in map(json.loads, samples.read_text().splitlines())}
    assert got == {("Tom had a toy car.", 3.0), ("Once upon a time", 5.0)}
    result = _eval(run_cli, heldout_workdir, "--prompts", prompts, "--reward", f"{reward}:level")
    assert result.code == 2 and 'expected an object with a "prompt" field' in result.err
