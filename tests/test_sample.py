"""`gvpo-offline sample` and sample.generate_responses, on the real stories260K model (CPU, seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_jsonl

from gvpo_offline.data import DataConfig, load_groups

MODEL = REPO / "sample_data" / "stories260K"
PROMPTS = [
    "Once upon a time, there was a little cat named Tom.",
    "One day, Lily went to the park with her mom.",
    "Ben had a red ball. He loved to play outside.",
    "Once upon a time, there was a happy dog named Max.",
    "Sue found a shiny rock in the garden.",
]
FAST = ("--max-new-tokens", "12", "--device", "cpu", "--batch-size", "4")

pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason="sample_data/stories260K is missing")


@pytest.fixture
def prompts_txt(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture
def reward_py(tmp_path: Path) -> Path:
    path = tmp_path / "reward.py"
    path.write_text(
        "def length(prompt, response):\n    return float(len(response.split()))\n\n"
        "def boom(prompt, response):\n    raise ValueError('no reward today')\n\n"
        "def text(prompt, response):\n    return 'high'\n"
    )
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_writes_valid_groups_within_k_range(run_cli, prompts_txt, reward_py, tmp_path):
    out = tmp_path / "groups.jsonl"
    res = run_cli("sample", prompts_txt, "--model", MODEL, "--k-range", "2:4",
                  "--reward", f"{reward_py}:length", "-o", out, *FAST)
    assert res.code == 0, res.err
    rows = read_lines(out)
    assert [r["id"] for r in rows] == ["1", "2", "3", "4", "5"]  # ids default to line numbers
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        assert set(r) == {"id", "prompt", "responses", "rewards"}
        assert 2 <= len(r["responses"]) <= 4 and len(r["rewards"]) == len(r["responses"])
        assert all(resp.strip() for resp in r["responses"])
        assert r["rewards"] == [float(len(resp.split())) for resp in r["responses"]]
    assert len({len(r["responses"]) for r in rows}) > 1  # k really varies
    data = load_groups(DataConfig((str(out),)))
    assert data.stats.n_groups == 5 and data.stats.dropped_k1_groups == 0


def test_sample_is_deterministic_and_resumes_without_duplicates(run_cli, prompts_txt, reward_py, tmp_path,
                                                                monkeypatch):
    from gvpo_offline.stages import sample

    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    args = ("--k", "3", "--reward", f"{reward_py}:length", *FAST)
    assert run_cli("sample", prompts_txt, "--model", MODEL, "-o", full, *args).code == 0
    assert not sample.journal_path(full).exists()  # a finished run leaves no record behind

    append, blocks = sample.append_durably, []

    def killed_in_the_third_block(out, text):  # one prompt (3 rows of 4) per block
        blocks.append(text)
        if len(blocks) < 3:
            return append(out, text)
        out.flush()  # half of what is written reaches the disk, then the run dies
        os.write(out.fileno(), text[: len(text) // 2].encode())
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "append_durably", killed_in_the_third_block)
    assert run_cli("sample", prompts_txt, "--model", MODEL, "-o", part, *args).code == 130
    monkeypatch.undo()
    lines = full.read_text().splitlines(keepends=True)
    assert part.read_text() == lines[0] + lines[1] + lines[2][: len(lines[2]) // 2]
    res = run_cli("sample", prompts_txt, "--model", MODEL, "-o", part, *args)
    assert res.code == 0, res.err
    assert "2 already there" in res.err
    assert part.read_text() == full.read_text()  # same groups, same order, nothing duplicated
    res = run_cli("sample", prompts_txt, "--model", MODEL, "-o", part, *args)  # nothing left to do
    assert res.code == 0 and part.read_text() == full.read_text()


def test_sample_jsonl_prompts_with_ids(run_cli, reward_py, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "id": 7}])
    out = tmp_path / "g.jsonl"
    res = run_cli("sample", prompts, "--model", MODEL, "--k", "2", "--reward", f"{reward_py}:length", "-o", out, *FAST)
    assert res.code == 0, res.err
    assert [r["id"] for r in read_lines(out)] == ["a", "7"]


@pytest.mark.parametrize(
    ("fn", "message"),
    [("boom", "the reward function failed on prompt id '1': ValueError: no reward today"),
     ("text", "not a number"),
     ("missing", "has no callable 'missing'")],
)
def test_sample_reward_errors_are_one_line(run_cli, prompts_txt, reward_py, tmp_path, fn, message):
    res = run_cli("sample", prompts_txt, "--model", MODEL, "--k", "2", "--reward", f"{reward_py}:{fn}",
                  "-o", tmp_path / "g.jsonl", *FAST)
    assert res.code == 2
    assert message in res.err and "Traceback" not in res.err
    assert len(res.err.strip().splitlines()) <= 2  # progress line at most, then the error


@pytest.mark.parametrize(
    ("opts", "message"),
    [(("--k", "1"), "--k must be >= 2"),
     (("--k-range", "3:2"), "need 2 <= A <= B"),
     (("--k-range", "two"), "expected A:B"),
     (("--k", "2", "--k-range", "2:3"), "exactly one of --k and --k-range"),
     ((), "exactly one of --k and --k-range")],
)
def test_sample_option_errors(run_cli, prompts_txt, reward_py, tmp_path, opts, message):
    res = run_cli("sample", prompts_txt, "--model", MODEL, "--reward", f"{reward_py}:length",
                  "-o", tmp_path / "g.jsonl", *opts, *FAST)
    assert res.code == 2 and message in res.err


def test_sample_bad_prompts_file(run_cli, reward_py, tmp_path):
    bad = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"text": "no prompt field"}])
    res = run_cli("sample", bad, "--model", MODEL, "--k", "2", "--reward", f"{reward_py}:length",
                  "-o", tmp_path / "g.jsonl", *FAST)
    assert res.code == 2 and "p.jsonl: line 2" in res.err


def test_generate_responses_independent_of_batching():
    from gvpo_offline.data.tokenize import TokenizeConfig
    from gvpo_offline.model.loading import load_model, load_tokenizer
    from gvpo_offline.stages.sample import SamplingConfig, generate_responses

    tokenizer = load_tokenizer(MODEL)
    model = load_model(MODEL, torch.device("cpu"))
    tok_cfg = TokenizeConfig(max_length=512, max_prompt_length=64)
    a = generate_responses(model, tokenizer, PROMPTS, [2, 3, 2, 2, 3], SamplingConfig(max_new_tokens=16, batch_size=5), tok_cfg)
    b = generate_responses(model, tokenizer, PROMPTS[2:], 3, SamplingConfig(max_new_tokens=16, batch_size=2), tok_cfg,
                           seed_keys=[2, 3, 4])
    assert [g[:2] for g in b] == [g[:2] for g in a[2:]]  # same (seed, key, j) -> same response
    assert a[0][0] != a[0][1]  # but the samples of one prompt differ
    c = generate_responses(model, tokenizer, PROMPTS, 2, SamplingConfig(max_new_tokens=16, seed=1), tok_cfg)
    assert c != [g[:2] for g in a]  # another seed, other samples
    greedy = generate_responses(model, tokenizer, PROMPTS[:1], 2, SamplingConfig(temperature=0, max_new_tokens=16), tok_cfg)
    assert greedy[0][0] == greedy[0][1]
    # prompt + response never exceeds max_length
    short = TokenizeConfig(max_length=20, max_prompt_length=16)
    out = generate_responses(model, tokenizer, PROMPTS[:1], 1, SamplingConfig(max_new_tokens=50), short)
    prompt_len = len(tokenizer(PROMPTS[0])["input_ids"])
    assert len(tokenizer(out[0][0], add_special_tokens=False)["input_ids"]) <= 20 - prompt_len + 1


def test_sample_passes_other_prompt_fields_to_the_reward(run_cli, tmp_path):
    """A JSONL prompt's extra fields reach a reward that names them, and stay in the written groups."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": PROMPTS[0], "ground_truth": "3", "source": "x"},
        {"id": "b", "prompt": PROMPTS[1], "ground_truth": "5", "source": "y"},
    ])
    reward = tmp_path / "truth.py"
    reward.write_text("def truth(prompt, response, ground_truth):\n    return float(ground_truth)\n")
    out = tmp_path / "groups.jsonl"
    res = run_cli("sample", prompts, "--model", MODEL, "--k", "2", "--reward", f"{reward}:truth", "-o", out, *FAST)
    assert res.code == 0, res.err
    rows = read_lines(out)
    assert [r["rewards"] for r in rows] == [[3.0, 3.0], [5.0, 5.0]]
    assert [(r["ground_truth"], r["source"]) for r in rows] == [("3", "x"), ("5", "y")]
    assert load_groups(DataConfig((str(out),))).stats.n_groups == 2  # still valid grouped data


@pytest.mark.parametrize("shape", ["chatml", "gemma", "llama3"])
def test_chat_sampling_stops_at_the_turn_end_and_the_reply_tokenizes_back_to_what_was_sampled(shape):
    """A chat reply stops where the template ends an assistant turn (not only at EOS), and its text,
    tokenized again as every stage does, is the sampled tokens followed by the turn's end."""
    from test_tokenize import CHAT_SHAPES, tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from gvpo_offline.data.tokenize import TokenizeConfig, encode_pair, turn_end_id
    from gvpo_offline.stages.sample import SamplingConfig, generate_responses

    template, specials, bos, eos, turn_end = CHAT_SHAPES[shape]
    tok = tiny_tokenizer(template, specials, bos, eos)
    end = tok.convert_tokens_to_ids(turn_end[0])
    assert turn_end_id(tok, TokenizeConfig()) == end
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))
    # logits that ignore the input: the turn's end first (forbidden as the first token), then "Hello"
    word = tok("Hello", add_special_tokens=False).input_ids[0]
    model.lm_head = torch.nn.Linear(16, len(tok), bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[word], model.lm_head.bias[end] = 1.0, 2.0
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    cfg = TokenizeConfig(max_length=128, max_prompt_length=64)
    [[reply]] = generate_responses(model.eval(), tok, [messages], 1, SamplingConfig(temperature=0, max_new_tokens=8), cfg)
    assert reply == tok.decode([word])
    assert encode_pair(tok, messages, reply, cfg).response_ids[:2] == [word, end]


def test_sample_refuses_resuming_an_output_made_with_other_settings(run_cli, prompts_txt, reward_py, tmp_path):
    out = tmp_path / "groups.jsonl"
    args = ("--model", MODEL, "--k", "2", "-o", out, *FAST)
    assert run_cli("sample", prompts_txt, "--reward", f"{reward_py}:length", *args).code == 0
    settings = json.loads((tmp_path / "groups.jsonl.settings.json").read_text())
    assert settings["reward"] == f"{reward_py}:length" and settings["temperature"] == 1.0 and settings["k"] == 2
    before = out.read_text()
    res = run_cli("sample", prompts_txt, "--reward", f"{reward_py}:length", "--temperature", "0.5", *args)
    assert res.code == 2 and "sampled with other settings (temperature: 1.0 -> 0.5" in res.err
    res = run_cli("sample", prompts_txt, "--reward", f"{reward_py}:text", *args)
    assert res.code == 2 and "reward: " in res.err and ":length" in res.err
    reward_py.write_text(reward_py.read_text() + "\n# edited\n")  # the same name, another reward
    res = run_cli("sample", prompts_txt, "--reward", f"{reward_py}:length", *args)
    assert res.code == 2 and "reward_file_sha256" in res.err
    assert out.read_text() == before  # nothing appended by a refused run


def test_sample_warns_when_most_groups_have_equal_rewards(run_cli, prompts_txt, tmp_path):
    reward = tmp_path / "flat.py"
    reward.write_text("def one(prompt, response):\n    return 1.0\n")
    res = run_cli("sample", prompts_txt, "--model", MODEL, "--k", "2", "--reward", f"{reward}:one",
                  "-o", tmp_path / "out.jsonl", *FAST)
    assert res.code == 0, res.err
    assert "warning: 5 of 5 groups have all-equal rewards" in res.err


def test_sample_checks_the_reward_signature_before_loading_the_model(run_cli, prompts_txt, tmp_path, monkeypatch):
    from gvpo_offline.model import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    reward = tmp_path / "gt.py"
    reward.write_text("def correct(prompt, response, ground_truth):\n    return 1.0\n")
    res = run_cli("sample", prompts_txt, "--model", MODEL, "--k", "2", "--reward", f"{reward}:correct",
                  "-o", tmp_path / "out.jsonl", *FAST)
    assert res.code == 2 and "parameter 'ground_truth' is not a field of prompt 1" in res.err
