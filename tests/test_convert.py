"""`gvpo-offline convert oasst|gsm8k`: real datasets to grouped JSONL, checked by loading the output."""

from __future__ import annotations

import json
from collections import Counter

from conftest import REPO, write_jsonl

from gvpo_offline.data import DataConfig, load_groups

OASST = REPO / "sample_data" / "oasst" / "en_100_tree.jsonl"
GSM8K = REPO / "sample_data" / "gsm8k" / "example_model_solutions.jsonl"


def _msg(mid, role, text, rank=None, replies=()):
    return {"message_id": mid, "role": role, "text": text, "rank": rank, "synthetic": False, "replies": list(replies)}


def test_oasst_small_tree(tmp_path, run_cli):
    tree = _msg("q1", "prompter", "Hi?", replies=[
        _msg("a2", "assistant", "Second", rank=1, replies=[
            _msg("q2", "prompter", "Why?", replies=[_msg("a4", "assistant", "Only one", rank=0)]),
        ]),
        _msg("a1", "assistant", "First", rank=0, replies=[
            _msg("q3", "prompter", "More?", replies=[
                _msg("a5", "assistant", "B", rank=1), _msg("a6", "assistant", "unranked"),
                _msg("a7", "assistant", "A", rank=0), _msg("a8", "assistant", "C", rank=2),
            ]),
        ]),
    ])
    src = write_jsonl(tmp_path / "trees.jsonl", [{"message_tree_id": "T", "tree_state": "ready_for_export", "prompt": tree}])
    out = tmp_path / "out" / "groups.jsonl"
    result = run_cli("convert", "oasst", src, "-o", out)
    assert result.code == 0, result.err
    assert "wrote 2 groups (5 responses)" in result.err and "skipped 1" in result.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"id": "T/q1", "prompt": [{"role": "user", "content": "Hi?"}], "responses": ["First", "Second"], "rewards": [0, -1]},
        {
            "id": "T/q3",
            "prompt": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "First"}, {"role": "user", "content": "More?"}],
            "responses": ["A", "B", "C"],
            "rewards": [0, -1, -2],
        },
    ]


def test_oasst_real_trees(tmp_path, run_cli):
    out = tmp_path / "oasst.jsonl"
    result = run_cli("convert", "oasst", OASST, "-o", out)
    assert result.code == 0, result.err
    data = load_groups(DataConfig((str(out),)))
    assert data.stats.n_groups == 212
    assert data.stats.k_hist == {2: 57, 3: 117, 4: 27, 5: 3, 6: 6, 8: 1, 9: 1}
    assert data.stats.dropped_k1_groups == 0
    tree_ids = {json.loads(line)["message_tree_id"] for line in OASST.read_text().splitlines()}
    groups = list(data.iter_groups())
    assert all(g.group_id.split("/")[0] in tree_ids for g in groups)
    assert all(g.prompt[-1]["role"] == "user" and g.rewards == sorted(g.rewards, reverse=True) for g in groups)
    assert all(g.rewards[0] == 0.0 for g in groups)
    assert max(len(g.prompt) for g in groups) > 1  # multi-turn conversations are kept

    result = run_cli("inspect", out, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["stats"]["k_hist"] == {"2": 57, "3": 117, "4": 27, "5": 3, "6": 6, "8": 1, "9": 1}


def test_gsm8k_real_solutions(tmp_path, run_cli):
    out = tmp_path / "gsm8k.jsonl"
    result = run_cli("convert", "gsm8k", GSM8K, "-o", out)
    assert result.code == 0, result.err
    data = load_groups(DataConfig((str(out),)))
    assert data.stats.n_groups == 1319 and data.stats.k_hist == {4: 1319}
    correct = Counter(int(sum(g.rewards)) for g in data.iter_groups())
    assert dict(sorted(correct.items())) == {0: 432, 1: 290, 2: 236, 3: 205, 4: 156}
    assert data.stats.groups_with_duplicates == 8  # kept, and counted
    assert data.stats.all_equal_reward_groups == 432 + 156
    first = json.loads(GSM8K.read_text().splitlines()[0])
    group = next(data.iter_groups())
    assert group.prompt == first["question"]
    assert group.responses == [first[m]["solution"] for m in ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    truths = [json.loads(line)["ground_truth"] for line in GSM8K.read_text().splitlines()]
    assert [r["ground_truth"] for r in rows] == truths  # kept per group, for a correctness reward

    result = run_cli("inspect", out)
    assert result.code == 0, result.err
    assert "4: 1319" in result.out


def test_convert_failure_writes_nothing(tmp_path, run_cli):
    good = json.loads(GSM8K.read_text().splitlines()[0])
    src = write_jsonl(tmp_path / "in.jsonl", [good, dict(good, **{"175b_verification": {"is_correct": "yes", "solution": "x"}})])
    out = tmp_path / "out.jsonl"
    result = run_cli("convert", "gsm8k", src, "-o", out)
    assert result.code == 2 and "in.jsonl: line 2: field '175b_verification'" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no temporary file
    out.write_text("previous\n")
    assert run_cli("convert", "gsm8k", src, "-o", out).code == 2
    assert out.read_text() == "previous\n"  # an existing output survives a failed conversion

    result = run_cli("convert", "reddit", src, "-o", out)
    assert result.code == 2 and "unknown source 'reddit'" in result.err
    result = run_cli("convert", "oasst", tmp_path / "nope.jsonl", "-o", out)
    assert result.code == 2 and "nope.jsonl" in result.err


def test_convert_that_writes_no_group_is_an_error(tmp_path, run_cli):
    """Issue 22.7: a conversion that finds no group (here: OpenAssistant trees with one ranked reply, or
    the wrong SOURCE for the file) exits 2 and writes nothing, rather than an empty file and exit 0."""
    tree = _msg("q1", "prompter", "Hi?", replies=[_msg("a1", "assistant", "Only", rank=0)])
    src = write_jsonl(tmp_path / "in.jsonl", [{"message_tree_id": "T", "tree_state": "ready_for_export", "prompt": tree}])
    out = tmp_path / "out.jsonl"
    result = run_cli("convert", "oasst", src, "-o", out)
    assert result.code == 2 and "in.jsonl: no groups to write (skipped 1 prompter messages" in result.err, result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no temporary file
