"""Reward callables: the row's other fields as keyword arguments, and the shipped GSM8K reward."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from gvpo_offline.data.rewards import final_number, gsm8k_correct, reward_kwargs, score
from gvpo_offline.stages.convert import GSM8K_MODELS

GSM8K = REPO / "sample_data" / "gsm8k" / "example_model_solutions.jsonl"


def test_fields_go_to_rewards_that_accept_them():
    fields = {"ground_truth": "A: 4", "source": "x", "id": "7", "responses": ["a"], "rewards": [1]}

    def plain(prompt, response):
        return 1.0

    def named(prompt, response, ground_truth):
        return float(ground_truth == "A: 4")

    def keyword_only(prompt, response, *, source="?"):
        return float(source == "x")

    def anything(prompt, response, **extra):
        return float(len(extra))

    assert reward_kwargs(plain, fields) == {}
    assert reward_kwargs(named, fields) == {"ground_truth": "A: 4"}
    assert reward_kwargs(keyword_only, fields) == {"source": "x"}
    assert reward_kwargs(anything, fields) == {"ground_truth": "A: 4", "source": "x"}  # no id, no layout columns
    assert [score(f, "p", "r", fields) for f in (plain, named, keyword_only, anything)] == [1.0, 1.0, 1.0, 2.0]
    assert score(plain, "p", "r") == 1.0


def test_final_number_formats():
    assert final_number("so 16 - 3 = <<16-3=13>>13\nA: 26") == 26
    assert final_number("Natalia sold 48/2 = 24 clips.\n#### 1,072") == 1072
    assert final_number("She makes $18.50 a day. The answer is $18.50.") == 18.5
    assert final_number("It costs -3 dollars, then 7") == 7  # no marker: the last number
    assert final_number("no digits here") is None
    assert gsm8k_correct("q", "... A: 18", "... #### 18") == 1.0
    assert gsm8k_correct("q", "... A: 17", "... #### 18") == 0.0
    assert gsm8k_correct("q", "I don't know", "#### 18") == 0.0


def test_gsm8k_correct_agrees_with_the_dataset_labels():
    """All 4 x 1319 solutions of the bundled GSM8K file, scored against their question's ground_truth:
    the dataset's own is_correct comes from the final "A: N" line of both texts, which final_number reads,
    so agreement is exact (measured 5276 of 5276); a changed extraction rule shows up as a disagreement."""
    agree = total = correct = 0
    for line in GSM8K.read_text().splitlines():
        row = json.loads(line)
        for model in GSM8K_MODELS:
            reward = gsm8k_correct(row["question"], row[model]["solution"], ground_truth=row["ground_truth"])
            agree += (reward == 1.0) == row[model]["is_correct"]
            correct += reward == 1.0
            total += 1
    assert total == 5276
    assert agree == total
    assert 0.3 < correct / total < 0.6  # both outcomes are common: the agreement is not trivial


@pytest.mark.parametrize("missing", [True, False])
def test_gsm8k_correct_needs_a_ground_truth(missing):
    if missing:
        with pytest.raises(TypeError):
            gsm8k_correct("q", "A: 1")  # type: ignore[call-arg]
    else:
        assert gsm8k_correct("q", "A: 1", ground_truth="A: 1.0") == 1.0
