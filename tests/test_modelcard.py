"""The model card's eval section (issue 22.5): only the model's own held-out data fills the eval table;
a report on other data (eval --data, another workdir) gets its own labelled section and never replaces it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cachefixture import STORIES, STORY_GROUPS, build_cache, text_groups
from conftest import write_jsonl

from gvpo_offline.model.modelcard import NOT_EVALUATED, card_text, is_own_data
from gvpo_offline.stages.evaluate.heldout import EvalConfig, evaluate
from gvpo_offline.stages.train.config import TrainConfig
from gvpo_offline.stages.train.recipe import train


def _loss_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| gvpo_loss |")]


def test_own_data_is_decided_by_the_cache_key():
    report = {"meta": {"data_cache_key": "a" * 64}}
    assert is_own_data({"cache_key": "a" * 64}, report)
    assert not is_own_data({"cache_key": "b" * 64}, report)
    assert not is_own_data({}, report)  # no record of the training cache: never claimed as own
    other = {"model": {"gvpo_loss": 0.25}, "reference": {"gvpo_loss": 0.5}, "delta": {"gvpo_loss": -0.25},
             "meta": {"data": ["flat.jsonl"], "data_cache_key": "c" * 64, "cache_key": "d" * 64}}
    text = card_text({"cache_key": "a" * 64}, None, [other])
    assert NOT_EVALUATED in text and "### On other data: `flat.jsonl` (cache cccccccccccc)" in text
    assert _loss_rows(text) == ["| gvpo_loss | 0.25 | 0.5 | -0.25 | — | — |"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A cache with 3 train groups and 1 eval group (stories260K), and 2 GVPO steps: WORKDIR/model."""
    groups = text_groups(STORIES, STORY_GROUPS)
    groups[3].split = "eval"
    workdir = tmp_path_factory.mktemp("card") / "run"
    build_cache(workdir, STORIES, groups)
    train(TrainConfig(workdir, beta=1.0, lr=1e-3, max_steps=2, groups_per_step=2, device="cpu", progress=False,
                      save_every=0), log=lambda _: None)
    return workdir


def test_eval_on_other_data_does_not_rewrite_the_cards_table(trained, tmp_path):
    card = trained / "model" / "README.md"
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": p, "responses": r, "rewards": w}
                                                   for p, r, w in STORY_GROUPS[:2]])
    foreign = evaluate(EvalConfig(workdir=str(trained), data_paths=(str(other),), bootstrap=0, device="cpu"))
    text = card.read_text()
    assert NOT_EVALUATED in text  # the table of the model's own held-out data is not replaced
    assert f"### On other data: `{other}`" in text
    assert _loss_rows(text) == [row for row in _loss_rows(text) if f"{foreign.model['gvpo_loss']:.4g}" in row] != []

    own = evaluate(EvalConfig(workdir=str(trained), bootstrap=0, device="cpu"))
    assert own.model["gvpo_loss"] != foreign.model["gvpo_loss"]
    text = card.read_text()
    assert NOT_EVALUATED not in text and f"### On other data: `{other}`" in text  # both, each labelled
    own_table, other_section = text.split("### On other data")
    assert [f"{own.model['gvpo_loss']:.4g}" in row for row in _loss_rows(own_table)] == [True]
    assert [f"{foreign.model['gvpo_loss']:.4g}" in row for row in _loss_rows(other_section)] == [True]

    evaluate(EvalConfig(workdir=str(trained), data_paths=(str(other),), bootstrap=0, device="cpu"))
    assert card.read_text() == text  # the same dataset again: its section replaced, not added twice
