"""A user's first hour (issue 22) and fixed costs per command (issue 23): checks before work, CLI
habits (aliases, key=value overrides, --version, help on every option), and what --help imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, write_jsonl

STORIES = REPO / "sample_data" / "stories260K"
ROWS = [{"prompt": f"p{i // 2}", "response": f"r{i}", "reward": i % 2} for i in range(8)]


def _no_model_work(monkeypatch):
    """Make any model or tokenizer loading fail loudly: a check that runs first never reaches them."""
    from gvpo_offline.model import hub, loading

    def refuse(*_args, **_kwargs):
        raise AssertionError("model work started before the data was checked")

    for module, name in ((hub, "resolve_model"), (loading, "load_tokenizer"), (loading, "load_model")):
        monkeypatch.setattr(module, name, refuse)


# ---- 22.8: checks before work ------------------------------------------------------------------


def test_precompute_reports_bad_data_before_any_model_work(tmp_path, run_cli, monkeypatch):
    _no_model_work(monkeypatch)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    res = run_cli("precompute-ref", tmp_path / "nope.jsonl", "--model", STORIES, "--workdir", tmp_path / "w")
    assert res.code == 2 and "nope.jsonl: no such file or directory" in res.err, res.err
    res = run_cli("precompute-ref", data, "--model", STORIES, "--workdir", tmp_path / "w", "--reward-col", "score")
    assert res.code == 2 and "missing column 'score' (--reward-col maps the reward" in res.err, res.err
    res = run_cli("precompute-ref", data, "--model", STORIES, "--workdir", tmp_path / "w",
                  "--eval-data", tmp_path / "held.jsonl")
    assert res.code == 2 and "held.jsonl: no such file or directory" in res.err, res.err
    assert not (tmp_path / "w").exists()  # nothing written


def test_eval_reports_bad_data_before_any_model_work(workdir, tmp_path, run_cli, monkeypatch):
    _no_model_work(monkeypatch)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    res = run_cli("eval", "--workdir", workdir, "--beta", "1", "--model", STORIES, "--data", data,
                  "--group-col", "conv_id")
    assert res.code == 2 and "missing column 'conv_id' (--group-col" in res.err, res.err
    res = run_cli("eval", "--workdir", workdir, "--beta", "1", "--model", STORIES, "--data", tmp_path / "x.jsonl")
    assert res.code == 2 and "x.jsonl: no such file or directory" in res.err, res.err


def test_inspect_with_a_model_reports_bad_data_before_the_tokenizer(tmp_path, run_cli, monkeypatch):
    _no_model_work(monkeypatch)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    res = run_cli("inspect", data, "--model", STORIES, "--prompt-col", "question")
    assert res.code == 2 and "missing column 'question' (--prompt-col maps the prompt" in res.err, res.err
