"""Data layer: readers, layouts, column mapping, group ids, counts, and every validation error."""

from __future__ import annotations

import gzip
import hashlib
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from gvpo_offline.data import ColumnMap, DataConfig, content_group_id, load_groups
from gvpo_offline.runtime.errors import DataError
from gvpo_offline.runtime.files import sha256_file

GROUPED = [
    {"prompt": "Say hi", "responses": ["hi", "hello", "hey"], "rewards": [1, 0.5, -2]},
    {"prompt": [{"role": "user", "content": "2+2?"}], "responses": ["4", {"role": "assistant", "content": "five"}], "rewards": [1.0, 0]},
    {"prompt": "Say hi", "responses": ["yo", "yo"], "rewards": [3, 3]},
]


def sha_id(prompt) -> str:
    """The documented content id, computed independently of the implementation."""
    if isinstance(prompt, str):
        text = json.dumps(prompt, ensure_ascii=False)
    else:
        text = json.dumps(prompt, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


EXPECTED_GROUPED = [
    {"group_id": sha_id("Say hi"), "prompt": '"Say hi"', "responses": ["hi", "hello", "hey"], "rewards": [1.0, 0.5, -2.0]},
    {
        "group_id": sha_id([{"role": "user", "content": "2+2?"}]),
        "prompt": '[{"role":"user","content":"2+2?"}]',
        "responses": ["4", "five"],
        "rewards": [1.0, 0.0],
    },
    {"group_id": sha_id("Say hi") + "-1", "prompt": '"Say hi"', "responses": ["yo", "yo"], "rewards": [3.0, 3.0]},
]


def load(*paths, **kw):
    return load_groups(DataConfig(tuple(str(p) for p in paths), **kw))


def to_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---- readers -----------------------------------------------------------------------------------------


def test_jsonl_grouped_canonical_table(tmp_path):
    data = load(write_jsonl(tmp_path / "d.jsonl", GROUPED))
    assert data.layout == "grouped"
    assert data.table.to_pylist() == EXPECTED_GROUPED
    assert data.table.schema.field("responses").type == pa.list_(pa.string())
    assert data.table.schema.field("rewards").type == pa.list_(pa.float64())
    groups = list(data.iter_groups())
    assert groups[1].prompt == [{"role": "user", "content": "2+2?"}] and groups[0].prompt == "Say hi"


def test_file_info_is_size_and_sha256(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GROUPED)
    (info,) = load(path).files
    assert info.size == path.stat().st_size
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path, chunk_bytes=7) == info.sha256  # chunked streaming gives the same digest


def test_jsonl_gz_json_array_and_json_lines_read_the_same(tmp_path):
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in GROUPED)
    (tmp_path / "a.json").write_text(json.dumps(GROUPED, indent=2))
    write_jsonl(tmp_path / "lines.json", GROUPED)  # a .json file holding one object per line
    for name in ("d.jsonl.gz", "a.json", "lines.json"):
        assert load(tmp_path / name).table.to_pylist() == EXPECTED_GROUPED, name


def test_parquet_grouped_matches_jsonl(tmp_path):
    rows = [
        {"prompt": "Say hi", "responses": ["hi", "hello", "hey"], "rewards": [1.0, 0.5, -2.0]},
        {"prompt": "Say hi", "responses": ["yo", "yo"], "rewards": [3.0, 3.0]},
    ]
    data = load(to_parquet(tmp_path / "d.parquet", rows))
    assert data.table.to_pylist() == [EXPECTED_GROUPED[0], EXPECTED_GROUPED[2]]


def test_parquet_messages_and_assistant_responses(tmp_path):
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be \"brief\"\n"}, {"role": "user", "content": "2+2?"}],
            "responses": [{"role": "assistant", "content": "4"}, {"role": "assistant", "content": "five"}],
            "rewards": [1, 0],
        }
    ]
    data = load(to_parquet(tmp_path / "d.parquet", rows))
    (group,) = data.iter_groups()
    assert group.prompt == rows[0]["prompt"]
    assert group.responses == ["4", "five"] and group.rewards == [1.0, 0.0]
    assert group.group_id == sha_id(rows[0]["prompt"])  # same id as the JSONL reader would give


@pytest.mark.parametrize("prompt_kind", ["string", "messages"])
def test_prompt_json_is_identical_from_jsonl_and_parquet(tmp_path, prompt_kind):
    """The vectorised JSON encoding of Parquet prompts must equal json.dumps byte for byte."""
    nasty = 'q\\"\x00\x01\x07\b\t\n\x0b\f\r\x1f\x7f é 🙂 \u2028 end'
    prompts = [nasty, "plain", " x "] if prompt_kind == "string" else [
        [{"role": "user", "content": nasty}], [{"role": "sys\ntem", "content": ""}, {"role": "user", "content": "x"}]
    ]
    rows = [{"prompt": p, "responses": ["a", "b"], "rewards": [1, 0]} for p in prompts]
    from_jsonl = load(write_jsonl(tmp_path / "d.jsonl", rows)).table
    from_parquet = load(to_parquet(tmp_path / "d.parquet", rows)).table
    assert from_parquet.to_pylist() == from_jsonl.to_pylist()
    assert [json.loads(p) for p in from_parquet["prompt"].to_pylist()] == prompts


def test_directory_and_glob(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "b.jsonl", GROUPED[1:2])
    write_jsonl(folder / "a.jsonl", GROUPED[:1])
    to_parquet(folder / "sub" / "c.parquet", [{"prompt": "p", "responses": ["x", "y"], "rewards": [0.0, 1.0]}])
    (folder / "README.txt").write_text("not data")
    write_jsonl(folder / ".hidden.jsonl", [{"junk": 1}])
    data = load(folder)
    assert [f.path for f in data.files] == [str(folder / "a.jsonl"), str(folder / "b.jsonl"), str(folder / "sub" / "c.parquet")]
    assert [g.prompt for g in data.iter_groups()] == ["Say hi", [{"role": "user", "content": "2+2?"}], "p"]
    by_glob = load(str(folder / "*.jsonl"))
    assert [f.path for f in by_glob.files] == [str(folder / "a.jsonl"), str(folder / "b.jsonl")]


def test_save_to_disk_folder(tmp_path):
    import datasets

    rows = [{"prompt": "Say hi", "responses": ["hi", "hello", "hey"], "rewards": [1.0, 0.5, -2.0]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    data = load(tmp_path / "ds")
    assert data.table.to_pylist() == EXPECTED_GROUPED[:1]
    arrow_files = sorted(p for p in (tmp_path / "ds").iterdir() if p.suffix == ".arrow")
    assert [f.path for f in data.files] == [str(p) for p in arrow_files]


# ---- layouts -----------------------------------------------------------------------------------------

FLAT = [  # interleaved: groups must be rebuilt in first-seen order, responses in row order
    {"prompt": "A", "response": "a1", "reward": 1},
    {"prompt": "B", "response": "b1", "reward": 0.25},
    {"prompt": "A", "response": "a2", "reward": 2},
    {"prompt": "C", "response": "c1", "reward": 5},
    {"prompt": "B", "response": {"role": "assistant", "content": "b2"}, "reward": -1},
    {"prompt": "A", "response": "a3", "reward": 3},
]
EXPECTED_FLAT = [
    {"group_id": sha_id("A"), "prompt": '"A"', "responses": ["a1", "a2", "a3"], "rewards": [1.0, 2.0, 3.0]},
    {"group_id": sha_id("B"), "prompt": '"B"', "responses": ["b1", "b2"], "rewards": [0.25, -1.0]},
]


def test_flat_jsonl_grouped_by_prompt_and_k1_dropped(tmp_path):
    data = load(write_jsonl(tmp_path / "f.jsonl", FLAT))
    assert data.layout == "flat"
    assert data.table.to_pylist() == EXPECTED_FLAT
    assert data.stats.n_rows == 6 and data.stats.dropped_k1_groups == 1  # "C" has one response


def test_flat_parquet_matches_flat_jsonl(tmp_path):
    rows = [dict(r, response=r["response"] if isinstance(r["response"], str) else "b2") for r in FLAT]
    data = load(to_parquet(tmp_path / "f.parquet", rows))
    assert data.table.to_pylist() == EXPECTED_FLAT


def test_flat_with_group_ids(tmp_path):
    rows = [
        {"group_id": "g1", "prompt": "A", "response": "x", "reward": 1},
        {"group_id": 7, "prompt": "A", "response": "y", "reward": 2},
        {"group_id": "g1", "prompt": "A", "response": "z", "reward": 3},
        {"group_id": 7, "prompt": "A", "response": "w", "reward": 4},
    ]
    expected = [
        {"group_id": "g1", "prompt": '"A"', "responses": ["x", "z"], "rewards": [1.0, 3.0]},
        {"group_id": "7", "prompt": '"A"', "responses": ["y", "w"], "rewards": [2.0, 4.0]},
    ]
    assert load(write_jsonl(tmp_path / "f.jsonl", rows)).table.to_pylist() == expected
    pq_rows = [dict(r, group_id=str(r["group_id"])) for r in rows]
    assert load(to_parquet(tmp_path / "f.parquet", pq_rows)).table.to_pylist() == expected


def test_flat_group_with_two_prompts_is_an_error(tmp_path):
    rows = [
        {"group_id": "g", "prompt": "A", "response": "x", "reward": 1},
        {"group_id": "g", "prompt": "A", "response": "y", "reward": 1},
        {"group_id": "g", "prompt": "B", "response": "z", "reward": 1},
    ]
    with pytest.raises(DataError) as err:
        load(write_jsonl(tmp_path / "f.jsonl", rows))
    assert (err.value.line, err.value.field) == (3, "group_id")
    assert "different prompt" in str(err.value) and "line 1" in str(err.value)
    with pytest.raises(DataError) as err:
        load(to_parquet(tmp_path / "f.parquet", rows))
    assert (err.value.row, err.value.field) == (2, "group_id")


def test_column_mapping_grouped_and_flat(tmp_path):
    grouped = [{"q": "Say hi", "answers": ["hi", "yo"], "scores": [1, 0], "qid": "first"}]
    data = load(write_jsonl(tmp_path / "g.jsonl", grouped), columns=ColumnMap("q", "answers", "scores", "qid"))
    assert data.layout == "grouped"
    assert data.table.to_pylist() == [{"group_id": "first", "prompt": '"Say hi"', "responses": ["hi", "yo"], "rewards": [1.0, 0.0]}]
    flat = [{"q": "A", "answer": "a1", "score": 1, "grp": "G"}, {"q": "A", "answer": "a2", "score": 0, "grp": "G"}]
    data = load(to_parquet(tmp_path / "f.parquet", flat), columns=ColumnMap("q", "answer", "score", "grp"))
    assert data.layout == "flat"
    assert data.table.to_pylist() == [{"group_id": "G", "prompt": '"A"', "responses": ["a1", "a2"], "rewards": [1.0, 0.0]}]


def test_forced_layout(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", GROUPED)
    assert load(path, layout="grouped").table.to_pylist() == EXPECTED_GROUPED
    with pytest.raises(DataError) as err:
        load(path, layout="flat")
    assert (err.value.line, err.value.field) == (1, "response")
    assert "grouped-layout row in a flat-layout file" in str(err.value)
    flat = to_parquet(tmp_path / "f.parquet", [{"prompt": "p", "response": "a", "reward": 1.0}] * 2)
    with pytest.raises(DataError) as err:
        load(flat, layout="grouped", columns=ColumnMap(response="response", reward="reward"))
    assert err.value.field == "response" and "got column type string; is this the flat layout?" in str(err.value)
    assert load(flat, columns=ColumnMap(response="response", reward="reward")).layout == "flat"  # detected by type


def test_group_ids_deterministic_and_given_ids_kept(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", GROUPED)
    first, second = load(path), load(path)
    assert first.table["group_id"].to_pylist() == second.table["group_id"].to_pylist()
    assert content_group_id('"Say hi"') == sha_id("Say hi")
    rows = [dict(GROUPED[0], id=12), dict(GROUPED[2], id="b")]
    assert load(write_jsonl(tmp_path / "ids.jsonl", rows)).table["group_id"].to_pylist() == ["12", "b"]


def test_counts_and_reward_stats(tmp_path):
    rows = [
        {"prompt": "p1", "responses": ["a", "a", "b", "a"], "rewards": [1, 2, 3, 4]},  # 2 duplicates
        {"prompt": "p2", "responses": ["x", "y"], "rewards": [5, 5]},  # all equal
        {"prompt": "p3", "responses": ["z"], "rewards": [0]},  # k = 1: dropped
        {"prompt": "p4", "responses": ["u", "u", "v"], "rewards": [0, 0, 0]},  # duplicate + all equal
    ]
    s = load(write_jsonl(tmp_path / "d.jsonl", rows)).stats
    kept = [r for r in rows if len(r["responses"]) > 1]
    rewards = np.array([x for r in kept for x in r["rewards"]], dtype=float)
    assert (s.n_rows, s.n_groups, s.n_responses, s.dropped_k1_groups) == (4, 3, 9, 1)
    assert s.k_hist == {2: 1, 3: 1, 4: 1}
    assert (s.groups_with_duplicates, s.duplicate_responses, s.all_equal_reward_groups) == (2, 3, 2)
    assert s.reward_mean == pytest.approx(rewards.mean()) and s.reward_std == pytest.approx(rewards.std())
    assert (s.reward_min, s.reward_max) == (0.0, 5.0)
    assert s.mean_group_reward_std == pytest.approx(np.mean([np.std(r["rewards"]) for r in kept]))
    assert s.mean_group_reward_spread == pytest.approx(np.mean([np.ptp(r["rewards"]) for r in kept]))


def test_only_k1_groups_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "responses": ["a"], "rewards": [1]}])
    with pytest.raises(DataError, match="no usable groups"):
        load(path)


# ---- validation errors, through the CLI: one line on stderr, exit code 2, nothing on stdout -----------


def _gz_truncated(path):
    buf = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in GROUPED * 50))
    path.write_bytes(buf[: len(buf) // 2])


def _jsonl_bytes(*lines: bytes):
    return lambda path: path.write_bytes(b"\n".join(lines) + b"\n")


def _rows(*rows):
    return lambda path: write_jsonl(path, list(rows))


def _parquet(rows, schema=None):
    return lambda path: pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


OK = {"prompt": "p", "responses": ["a", "b"], "rewards": [1, 0]}
OK_FLAT = {"prompt": "p", "response": "a", "reward": 1}

# name, file name, writer, location ("line 2" / "row 1" / None), field or None, message fragment
ERROR_CASES = [
    ("malformed json", "d.jsonl", _jsonl_bytes(json.dumps(OK).encode(), b'{"prompt": "p", '), "line 2", None, "malformed JSON"),
    ("invalid utf-8", "d.jsonl", _jsonl_bytes(json.dumps(OK).encode(), b'{"prompt": "\xff\xfe"}'), "line 2", None, "invalid UTF-8"),
    ("json array malformed", "d.json", lambda p: p.write_text(f'[\n {json.dumps(OK)},\n {{"prompt" 1}}\n]'), "line 3", None, "malformed JSON"),
    # the second object of the indented array starts on line 13 (its "{")
    ("json array element", "d.json", lambda p: p.write_text(json.dumps([OK, dict(OK, rewards=[1, "x"])], indent=1)), "line 13", "rewards[1]", "got 'x'"),
    ("truncated gzip", "d.jsonl.gz", _gz_truncated, None, None, "gzip"),
    ("not parquet", "d.parquet", lambda p: p.write_text("prompt,response\n"), None, None, "not a Parquet file"),
    ("missing field", "d.jsonl", _rows(OK, {"prompt": "p", "responses": ["a", "b"]}), "line 2", "rewards", "missing field"),
    ("missing column", "d.parquet", _parquet([{"prompt": "p", "responses": ["a", "b"]}]), None, None, "missing column 'rewards' (--reward-col maps the reward)"),
    ("missing column jsonl", "d.jsonl", _rows({"prompt": "p", "responses": ["a", "b"], "reward": [1, 0]}), "line 1", None, "missing column 'rewards' (--reward-col maps the reward; did you mean 'reward'?)"),
    ("no layout column", "d.jsonl", _rows({"prompt": "p", "answer": "a"}), "line 1", None, "cannot detect the layout"),
    ("length mismatch", "d.jsonl", _rows(OK, dict(OK, rewards=[1])), "line 2", "rewards", "has 1 values but 'responses' has 2"),
    ("length mismatch pq", "d.parquet", _parquet([OK, dict(OK, rewards=[1.0])]), "row 1", "rewards", "has 1 values but 'responses' has 2"),
    ("reward string", "d.jsonl", _rows(dict(OK, rewards=[1, "abc"])), "line 1", "rewards[1]", "expected a finite number, got 'abc'"),
    ("reward null", "d.jsonl", _rows(OK, dict(OK, rewards=[None, 1])), "line 2", "rewards[0]", "got null"),
    ("reward nan", "d.jsonl", _jsonl_bytes(b'{"prompt": "p", "responses": ["a", "b"], "rewards": [NaN, 1]}'), "line 1", "rewards[0]", "finite"),
    ("reward inf", "d.jsonl", _jsonl_bytes(b'{"prompt": "p", "responses": ["a", "b"], "rewards": [1, -Infinity]}'), "line 1", "rewards[1]", "finite"),
    ("reward 1e400", "d.jsonl", _jsonl_bytes(b'{"prompt": "p", "responses": ["a", "b"], "rewards": [1e400, 1]}'), "line 1", "rewards[0]", "overflow"),
    ("reward huge int", "d.jsonl", _jsonl_bytes(b'{"prompt": "p", "response": "a", "reward": 1' + b"0" * 400 + b"}"), "line 1", "reward", "too large"),
    ("reward bool", "d.jsonl", _rows(dict(OK_FLAT), dict(OK_FLAT, reward=True)), "line 2", "reward", "boolean"),
    ("reward nan pq", "d.parquet", _parquet([OK, OK, dict(OK, rewards=[0.0, math.nan])]), "row 2", "rewards[1]", "finite number, got nan"),
    ("reward inf flat pq", "d.parquet", _parquet([OK_FLAT, dict(OK_FLAT, reward=math.inf)]), "row 1", "reward", "finite number, got inf"),
    ("reward null pq", "d.parquet", _parquet([OK_FLAT, dict(OK_FLAT, reward=None), OK_FLAT]), "row 1", "reward", "got null"),
    ("reward bool pq", "d.parquet", _parquet([dict(OK_FLAT, reward=True)]), None, "reward", "booleans"),
    ("reward string pq", "d.parquet", _parquet([dict(OK_FLAT, reward="1")]), None, "reward", "column type string"),
    ("empty response", "d.jsonl", _rows(OK, dict(OK, responses=["a", ""])), "line 2", "responses[1]", "empty response"),
    ("empty response pq", "d.parquet", _parquet([OK, OK, dict(OK, responses=["", "b"])]), "row 2", "responses[0]", "empty response"),
    ("response user msg", "d.jsonl", _rows(dict(OK, responses=["a", {"role": "user", "content": "b"}])), "line 1", "responses[1].role", "'assistant'"),
    ("response number", "d.jsonl", _rows(dict(OK_FLAT, response=3)), "line 1", "response", "expected a response string"),
    ("prompt number", "d.jsonl", _rows(OK, dict(OK, prompt=5)), "line 2", "prompt", "expected a string or a non-empty list"),
    ("prompt empty list", "d.jsonl", _rows(dict(OK, prompt=[])), "line 1", "prompt", "non-empty list"),
    ("prompt dict", "d.jsonl", _rows(dict(OK, prompt={"role": "user", "content": "x"})), "line 1", "prompt", "expected a string"),
    ("message no content", "d.jsonl", _rows(dict(OK, prompt=[{"role": "user"}])), "line 1", "prompt[0].content", "expected a string, got null"),
    ("message no role", "d.jsonl", _rows(dict(OK, prompt=[{"role": "user", "content": "a"}, {"content": "x"}])), "line 1", "prompt[1].role", "non-empty string"),
    ("message not object", "d.jsonl", _rows(dict(OK, prompt=["hello"])), "line 1", "prompt[0]", "expected a message"),
    ("message null content pq", "d.parquet", _parquet([dict(OK, prompt=[{"role": "user", "content": c}]) for c in ("x", None)]), "row 1", "prompt[0]", "without 'content'"),
    ("prompt null flat pq", "d.parquet", _parquet([OK_FLAT, dict(OK_FLAT, prompt=None)]), "row 1", "prompt", "got null"),
    ("responses null pq", "d.parquet", _parquet([OK, dict(OK, responses=None)]), "row 1", "responses", "got null"),
    ("response user msg pq", "d.parquet", _parquet([dict(OK_FLAT, response={"role": "user", "content": "x"})]), "row 0", "response", "'assistant', got 'user'"),
    ("prompt int column pq", "d.parquet", _parquet([dict(OK, prompt=3)]), None, "prompt", "column type int64"),
    ("flat row in grouped", "d.jsonl", _rows(OK, OK, OK_FLAT), "line 3", "responses", "flat-layout row in a grouped-layout file"),
    ("grouped row in flat", "d.jsonl", _rows(OK_FLAT, OK), "line 2", "response", "grouped-layout row in a flat-layout file"),
    ("row not object", "d.jsonl", _rows(OK, [1, 2]), "line 2", None, "expected a JSON object"),
    ("duplicate id", "d.jsonl", _rows(dict(OK, id="x"), dict(OK, id="y"), dict(OK, id="x")), "line 3", "id", "duplicate group id 'x'"),
    ("duplicate id pq", "d.parquet", _parquet([dict(OK, id="x"), dict(OK, id="x")]), "row 1", "id", "duplicate group id 'x'"),
    ("bad id type", "d.jsonl", _rows(dict(OK, id=1.5)), "line 1", "id", "string or integer id"),
    ("empty responses list", "d.jsonl", _rows(dict(OK, responses=[], rewards=[])), "line 1", "responses", "at least one response"),
    ("empty file", "d.jsonl", lambda p: p.write_text("\n\n"), None, None, "empty file"),
    ("empty json array", "d.json", lambda p: p.write_text("[]"), None, None, "empty file"),
    ("empty parquet", "d.parquet", _parquet([], pa.schema([("prompt", pa.string()), ("response", pa.string()), ("reward", pa.float64())])), None, None, "empty file"),
    ("unsupported extension", "d.csv", lambda p: p.write_text("prompt,response,reward\n"), None, None, "unsupported file type"),
    ("all k = 1", "d.jsonl", _rows(OK_FLAT, dict(OK_FLAT, prompt="q")), None, None, "no usable groups"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_data_errors_through_cli(tmp_path, run_cli, case):
    _, name, write, location, field, fragment = case
    path = tmp_path / name
    write(path)
    result = run_cli("inspect", path)
    assert result.code == 2, result
    assert result.out == ""
    err = result.err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("error: ") and str(path) in err
    assert fragment in err
    if location is not None:
        assert f": {location}: " in err
    else:
        assert ": line " not in err and ": row " not in err
    if field is not None:
        assert f"field '{field}'" in err


USER_ROWS = [{"question": f"q{i // 2}", "completion": f"c{i}", "score": i % 2, "conversation_id": f"g{i // 2}"}
             for i in range(4)]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_every_missing_column_in_one_message(tmp_path, run_cli, suffix):
    """Issue 22.1: a file of the user's own column names: one message lists every missing field with the
    flag that maps it, the file's columns, and a did-you-mean; a mistyped --group-col is an error."""
    path = tmp_path / f"mine.{suffix}"
    write_jsonl(path, USER_ROWS) if suffix == "jsonl" else pq.write_table(pa.Table.from_pylist(USER_ROWS), path)
    err = run_cli("inspect", path).err.strip()
    assert "\n" not in err and "Traceback" not in err and "cannot detect the layout" in err
    for flag in ("--prompt-col", "--response-col", "--reward-col"):
        assert flag in err, err
    assert "this file's columns: question, completion, score, conversation_id" in err
    # the response mapped: the prompt and the reward still missing, named together
    err = run_cli("inspect", path, "--response-col", "completion").err.strip()
    assert "flat layout: missing columns 'prompt' (--prompt-col maps the prompt), 'reward' (--reward-col" in err, err
    # a mistyped --group-col: an error with a did-you-mean, not rows grouped by prompt
    ok = ("--prompt-col", "question", "--response-col", "completion", "--reward-col", "score")
    res = run_cli("inspect", path, *ok, "--group-col", "conversaton_id")
    assert res.code == 2 and res.out == ""
    assert ("missing column 'conversaton_id' (--group-col maps the group; did you mean 'conversation_id'?)"
            in res.err), res.err
    res = run_cli("inspect", path, *ok, "--group-col", "conversation_id", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["stats"]["n_groups"] == 2


def test_missing_paths_empty_folder_and_mixed_layouts(tmp_path, run_cli):
    result = run_cli("inspect", tmp_path / "nope.jsonl")
    assert result.code == 2 and "nope.jsonl: no such file or directory" in result.err
    (tmp_path / "empty").mkdir()
    result = run_cli("inspect", tmp_path / "empty")
    assert result.code == 2 and "empty: empty folder" in result.err
    result = run_cli("inspect", str(tmp_path / "*.parquet"))
    assert result.code == 2 and "matches no data files" in result.err
    write_jsonl(tmp_path / "a.jsonl", [OK])
    write_jsonl(tmp_path / "b.jsonl", [OK_FLAT, OK_FLAT])
    result = run_cli("inspect", tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    assert result.code == 2 and "b.jsonl: this file is in the flat layout" in result.err
    result = run_cli("inspect", tmp_path / "a.jsonl", "--layout", "sideways")
    assert result.code == 2 and "unknown layout 'sideways'" in result.err


def test_lone_surrogate_is_a_located_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(OK) + "\n" + '{"prompt": "p", "responses": ["a", "\\ud800"], "rewards": [1, 0]}\n')
    with pytest.raises(DataError) as err:
        load(path)
    assert err.value.line == 2 and "surrogate" in str(err.value)


def test_empty_prompt_is_an_error_in_json_and_parquet(tmp_path):
    rows = [{"prompt": "ok", "responses": ["a", "b"], "rewards": [0, 1]},
            {"prompt": "  ", "responses": ["a", "b"], "rewards": [0, 1]}]
    with pytest.raises(DataError, match=r"d\.jsonl: line 2: field 'prompt': the prompt is empty"):
        load(write_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(DataError, match=r"d\.parquet: row 1: field 'prompt': the prompt is empty"):
        load(to_parquet(tmp_path / "d.parquet", rows))
