"""`convert ultrafeedback|helpsteer2|nectar` and `--from-hub`: small fixtures in each dataset's published schema.

Schemas (field names and types as on the Hugging Face dataset cards / files):
  openbmb/UltraFeedback: source, instruction, models, completions[{annotations{aspect{Rating: str, Rationale}},
      critique, custom_system_prompt, fine-grained_score: float, model, overall_score: float, principle,
      response}], correct_answers, incorrect_answers
  nvidia/HelpSteer2 (train.jsonl.gz): prompt, response, helpfulness..verbosity: int 0..4, flat rows
  berkeley-nest/Nectar (data/rlaif.parquet): prompt, answers[{answer, model, rank: float}], turns,
      num_responses, source: list[str], good_natured: bool
"""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from gvpo_offline.data import DataConfig, load_groups
from gvpo_offline.stages.convert import HELPSTEER2_WEIGHTS


def _uf_completion(model, response, overall, ratings):
    annotations = {aspect: {"Rating": rating, "Rationale": "..."} for aspect, rating in ratings.items()}
    annotations["truthfulness"].update({"Type": ["0"], "Rationale For Rating": "..."})
    numeric = [float(r) for r in ratings.values() if r != "N/A"]
    return {
        "annotations": annotations, "critique": "ok", "custom_system_prompt": "", "model": model,
        "fine-grained_score": sum(numeric) / len(numeric), "overall_score": overall,
        "principle": "helpfulness", "response": response,
    }


def _uf_row(instruction, completions):
    return {"source": "evol_instruct", "instruction": instruction, "models": [c["model"] for c in completions],
            "completions": completions, "correct_answers": ["None"], "incorrect_answers": ["None"]}


UF_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
UF_ROWS = [
    _uf_row("Write a haiku.", [
        _uf_completion("gpt-4", "Leaves fall", 8.5, dict(zip(UF_ASPECTS, ["5", "4", "5", "5"]))),
        _uf_completion("alpaca-7b", "A poem", 6.0, dict(zip(UF_ASPECTS, ["3", "N/A", "4", "3"]))),
        _uf_completion("falcon-40b", "Haiku!", 4.0, dict(zip(UF_ASPECTS, ["2", "2", "1", "3"]))),
        _uf_completion("llama-2", "", 1.0, dict(zip(UF_ASPECTS, ["1", "1", "1", "1"]))) | {"response": "no"},
    ]),
    _uf_row("Only one scored.", [
        _uf_completion("gpt-4", "x", 7.0, dict(zip(UF_ASPECTS, ["5", "N/A", "5", "5"]))),
        _uf_completion("gpt-3.5", "y", None, dict(zip(UF_ASPECTS, ["4", "4", "4", "4"]))),
    ]),
]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ultrafeedback_score_fields(tmp_path, run_cli):
    src = write_jsonl(tmp_path / "uf.jsonl", UF_ROWS)
    out = tmp_path / "uf_out.jsonl"
    result = run_cli("convert", "ultrafeedback", src, "-o", out)
    assert result.code == 0, result.err
    assert "wrote 1 groups (4 responses)" in result.err and "skipped 1 instructions" in result.err
    (row,) = _rows(out)
    assert row["prompt"] == "Write a haiku." and row["responses"] == ["Leaves fall", "A poem", "Haiku!", "no"]
    assert row["rewards"] == [8.5, 6.0, 4.0, 1.0]

    assert run_cli("convert", "ultrafeedback", src, "-o", out, "--score-field", "fine-grained_score").code == 0
    rows = _rows(out)  # the second instruction has two fine-grained scores, so it is a group now
    expected = [[c["fine-grained_score"] for c in r["completions"]] for r in UF_ROWS]
    assert [r["rewards"] for r in rows] == expected

    assert run_cli("convert", "ultrafeedback", src, "-o", out, "--score-field", "honesty").code == 0
    (row,) = _rows(out)  # "N/A" ratings leave their completion out
    assert row["responses"] == ["Leaves fall", "Haiku!", "no"] and row["rewards"] == [4.0, 2.0, 1.0]
    assert len(load_groups(DataConfig((str(out),))).stats.k_hist) == 1

    result = run_cli("convert", "ultrafeedback", src, "-o", out, "--score-field", "overall")
    assert result.code == 2 and "--score-field 'overall'" in result.err


HS2_ROWS = [  # HelpSteer2: two responses per prompt, attributes are int 0..4
    {"prompt": "What is 2+2?", "response": "4", "helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 1},
    {"prompt": "What is 2+2?", "response": "Four, because...", "helpfulness": 3, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 3},
    {"prompt": "Name a color.", "response": "Blue", "helpfulness": 2, "correctness": 3, "coherence": 4, "complexity": 0, "verbosity": 0},
    {"prompt": "Hi <extra_id_1>Assistant Hello <extra_id_1>User Bye", "response": "Bye", "helpfulness": 3, "correctness": 3, "coherence": 4, "complexity": 0, "verbosity": 1},
    {"prompt": "Name a color.", "response": "Red is a color.", "helpfulness": 3, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 2},
]


def test_helpsteer2_weighted_sum(tmp_path, run_cli):
    src = tmp_path / "train.jsonl.gz"  # as published
    with gzip.open(src, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in HS2_ROWS)
    out = tmp_path / "hs2.jsonl"
    result = run_cli("convert", "helpsteer2", src, "-o", out)
    assert result.code == 0, result.err
    assert "wrote 2 groups (4 responses)" in result.err and "skipped 1 prompts with a single response" in result.err
    rows = _rows(out)
    assert [r["prompt"] for r in rows] == ["What is 2+2?", "Name a color."]
    assert rows[1]["responses"] == ["Blue", "Red is a color."]
    nvidia = {"helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46, "complexity": 0.47, "verbosity": -0.33}
    assert HELPSTEER2_WEIGHTS == nvidia
    for row, source in ((rows[0], HS2_ROWS[:2]), (rows[1], [HS2_ROWS[2], HS2_ROWS[4]])):
        assert row["rewards"] == pytest.approx([sum(w * s[a] for a, w in nvidia.items()) for s in source])

    assert run_cli("convert", "helpsteer2", src, "-o", out, "--weights", "helpfulness=1,verbosity=-0.5").code == 0
    assert _rows(out)[0]["rewards"] == [4 - 0.5, 3 - 1.5]
    result = run_cli("convert", "helpsteer2", src, "-o", out, "--weights", "helpfulnes=1")
    assert result.code == 2 and "unknown attribute 'helpfulnes'" in result.err

    bad = write_jsonl(tmp_path / "bad.jsonl", [HS2_ROWS[0], dict(HS2_ROWS[1], correctness="high")])
    result = run_cli("convert", "helpsteer2", bad, "-o", out)
    assert result.code == 2 and "bad.jsonl: line 2: field 'correctness'" in result.err


NECTAR_TYPE = pa.struct([("answer", pa.string()), ("model", pa.string()), ("rank", pa.float64())])


def _nectar_table():
    answers = [{"answer": f"answer {r}", "model": f"m{r}", "rank": float(r)} for r in (3, 1, 7, 2, 5, 4, 6)]
    rows = [
        {"prompt": "\n\nHuman: Tell me a joke.\n\nAssistant:", "answers": answers, "turns": 1, "num_responses": 7,
         "source": ["sharegpt"], "good_natured": True},
        {"prompt": "\n\nHuman: One?\n\nAssistant:", "answers": answers[:1], "turns": 1, "num_responses": 1,
         "source": ["lmsys-chat-1m"], "good_natured": True},
    ]
    schema = pa.schema([("prompt", pa.string()), ("answers", pa.list_(NECTAR_TYPE)), ("turns", pa.int64()),
                        ("num_responses", pa.int64()), ("source", pa.list_(pa.string())), ("good_natured", pa.bool_())])
    return pa.Table.from_pylist(rows, schema=schema)


def test_nectar_reward_is_minus_rank(tmp_path, run_cli):
    src = tmp_path / "rlaif.parquet"  # as published
    pq.write_table(_nectar_table(), src)
    out = tmp_path / "nectar.jsonl"
    result = run_cli("convert", "nectar", src, "-o", out)
    assert result.code == 0, result.err
    assert "wrote 1 groups (7 responses)" in result.err and "skipped 1" in result.err
    (row,) = _rows(out)
    assert row["prompt"] == "\n\nHuman: Tell me a joke.\n\nAssistant:"
    assert row["responses"] == [f"answer {r}" for r in range(1, 8)] and row["rewards"] == [-r for r in range(1, 8)]
    assert load_groups(DataConfig((str(out),))).stats.k_hist == {7: 1}


def test_from_hub_local_folders(tmp_path, run_cli):
    import datasets

    saved = tmp_path / "nectar_saved"
    datasets.Dataset(_nectar_table()).save_to_disk(str(saved))
    out = tmp_path / "out.jsonl"
    result = run_cli("convert", "nectar", "--from-hub", saved, "-o", out)
    assert result.code == 0, result.err
    assert _rows(out)[0]["rewards"] == [-r for r in range(1, 8)]

    folder = tmp_path / "hs2_repo"  # a dataset repository checked out locally: data files per split
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", HS2_ROWS[:2])
    write_jsonl(folder / "validation.jsonl", HS2_ROWS[2:])
    result = run_cli("convert", "helpsteer2", "--from-hub", folder, "--split", "validation", "-o", out)
    assert result.code == 0, result.err
    assert [r["prompt"] for r in _rows(out)] == ["Name a color."]

    result = run_cli("convert", "helpsteer2", "--from-hub", folder, "--split", "test", "-o", out)
    assert result.code == 2 and "--from-hub" in result.err and "test" in result.err
    result = run_cli("convert", "helpsteer2", folder / "train.jsonl", "--from-hub", folder, "-o", out)
    assert result.code == 2 and "either an INPUT file or --from-hub" in result.err


def test_from_hub_offline_without_a_cached_copy_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "gvpo_offline", "convert", "nectar", "--from-hub",
                           "berkeley-nest/Nectar", "-o", str(tmp_path / "out.jsonl")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --from-hub berkeley-nest/Nectar (split train): cannot load it")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.jsonl").exists()
