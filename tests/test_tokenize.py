"""The one tokenization: special tokens, EOS, truncation sides, chat templates, fingerprint."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from gvpo_offline.data.tokenize import (
    TokenizeConfig,
    clamp_to_model,
    encode_pair,
    encode_prompt,
    load_prompt_template,
    tokenizer_fingerprint,
)
from gvpo_offline.runtime.errors import GvpoError

MODEL = Path(__file__).resolve().parents[1] / "sample_data" / "stories260K"
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL)


def test_prompt_has_special_tokens_response_has_eos_only(tok):
    pair = encode_pair(tok, "Once upon a time", "there was a dog.", TokenizeConfig())
    assert pair.prompt_ids == tok("Once upon a time").input_ids
    assert pair.prompt_ids[0] == tok.bos_token_id
    body = tok("there was a dog.", add_special_tokens=False).input_ids
    assert pair.response_ids == body + [tok.eos_token_id]
    assert tok.bos_token_id not in pair.response_ids
    no_eos = encode_pair(tok, "Once upon a time", "there was a dog.", TokenizeConfig(add_eos=False))
    assert no_eos.response_ids == body


def test_prompt_cut_from_left_response_from_right(tok):
    prompt, response = "Once upon a time there was a big red ball", "and the ball rolled down the hill fast"
    full_p = tok(prompt).input_ids
    full_r = tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
    cfg = TokenizeConfig(max_length=10, max_prompt_length=4)
    pair = encode_pair(tok, prompt, response, cfg)
    assert pair.prompt_ids == full_p[-4:] and pair.prompt_truncated
    assert pair.response_ids == full_r[:6] and pair.response_truncated
    roomy = encode_pair(tok, prompt, response, TokenizeConfig(max_length=100, max_prompt_length=50))
    assert not roomy.prompt_truncated and not roomy.response_truncated


def test_chat_prompt_uses_template_and_errors_without_one(tok):
    messages = [{"role": "user", "content": "Tell me a story."}]
    with pytest.raises(GvpoError, match="chat template"):
        encode_prompt(tok, messages, TokenizeConfig())
    ids, _ = encode_prompt(tok, messages, TokenizeConfig(prompt_template=TEMPLATE))
    assert ids == tok("user: Tell me a story.\nassistant:", add_special_tokens=False).input_ids


def test_prompt_template_from_file(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    assert load_prompt_template(str(path)) == TEMPLATE
    assert load_prompt_template(TEMPLATE) == TEMPLATE


def test_config_rejects_prompt_budget_that_leaves_no_room():
    with pytest.raises(GvpoError, match="max-prompt-length"):
        TokenizeConfig(max_length=8, max_prompt_length=8)


def test_clamp_to_model_context():
    cfg, clamped = clamp_to_model(TokenizeConfig(max_length=1024, max_prompt_length=512), 512)
    assert clamped and cfg.max_length == 512 and cfg.max_prompt_length == 511
    same, clamped = clamp_to_model(TokenizeConfig(max_length=256, max_prompt_length=128), 512)
    assert not clamped and same.max_length == 256


def test_fingerprint_survives_save_and_reload_but_not_a_change(tok, tmp_path):
    tok.save_pretrained(tmp_path / "copy")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "copy")
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tok)
    reloaded.chat_template = TEMPLATE
    assert tokenizer_fingerprint(reloaded) != tokenizer_fingerprint(tok)
    other = AutoTokenizer.from_pretrained(tmp_path / "copy")
    other.add_tokens(["<extra_token>"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)


def test_readme_template_file_puts_real_newlines_between_turns():
    """README's --prompt-template example is a file: each turn on its own line, no literal backslash-n."""
    from transformers import AutoTokenizer

    from gvpo_offline.data.tokenize import TokenizeConfig, encode_prompt, load_prompt_template

    root = Path(__file__).resolve().parents[1]
    path = root / "examples" / "chat_template.jinja"
    assert f"--prompt-template {path.relative_to(root)}" in (root / "docs" / "data.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(root / "sample_data" / "stories260K")
    cfg = TokenizeConfig(max_length=256, max_prompt_length=128, prompt_template=load_prompt_template(str(path)))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Tell a story"}]
    text = tokenizer.decode(encode_prompt(tokenizer, messages, cfg)[0], skip_special_tokens=True)
    lines = [line.strip() for line in text.splitlines()]  # (sentencepiece puts a space after the EOS)
    assert lines == ["user: Hi", "assistant: Hello", "user: Tell a story", "assistant:"]
    # an assistant turn ends with EOS, so the model learns to stop: the response's target is " ..." + EOS
    response = encode_pair(tokenizer, messages, "Once upon a time", cfg).response_ids
    assert response == tokenizer(" Once upon a time", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


# ---- chat responses end the way the template ends an assistant turn ---------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's pre-tokenizer pattern
CORPUS = ["Once upon a time there was a little dog.", "Tell me a story about a cat.", "Hi there, how are you?",
          "user assistant model system\n\n", "The sun was warm and happy."] * 4


def tiny_tokenizer(template: str, specials: list[str], bos: str, eos: str):
    """A byte-level BPE tokenizer trained in memory on a few sentences, split as Llama 3 and Qwen2 split
    text (a run of newlines is one piece), with ``template`` as its chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos)
    tokenizer.chat_template = template
    return tokenizer


# (template, special tokens, bos, eos, the tokens that end an assistant turn)
CHAT_SHAPES = {
    "chatml": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|endoftext|>",
               ["<|im_end|>", "\n"]),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
              ["<end_of_turn>", "\n"]),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>", ["<|eot_id|>"]),
}


@pytest.mark.parametrize("shape", sorted(CHAT_SHAPES))
def test_chat_response_ends_with_the_templates_end_of_turn_not_eos(shape):
    template, specials, bos, eos, turn_end = CHAT_SHAPES[shape]
    tok = tiny_tokenizer(template, specials, bos, eos)
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    pair = encode_pair(tok, messages, "Once upon a time there was a little dog.", TokenizeConfig())
    body = tok("Once upon a time there was a little dog.", add_special_tokens=False).input_ids
    end = [tok.convert_tokens_to_ids(t) if t in specials else tok(t, add_special_tokens=False).input_ids[0]
           for t in turn_end]
    assert pair.response_ids == body + end
    assert tok.eos_token_id not in pair.response_ids
    # the prompt is what the model is given before it speaks: the generation prompt included
    assert tok.decode(pair.prompt_ids).endswith({"chatml": "<|im_start|>assistant\n", "gemma": "<start_of_turn>model\n",
                                                 "llama3": "<|end_header_id|>\n\n"}[shape])
    # plain-text prompts keep their rule: response + EOS
    assert encode_pair(tok, "Tell me a story.", "Hi there", TokenizeConfig()).response_ids[-1] == tok.eos_token_id


def test_chat_template_whose_prompt_is_not_a_prefix_is_refused_naming_it():
    # the generation prompt says "assistant", the rendered assistant turn says "model": no common prefix
    bad = CHATML.replace("<|im_start|>{{ m['role'] }}", "<|im_start|>{{ 'model' if m['role'] == 'assistant' else m['role'] }}")
    template, specials, bos, eos, _ = CHAT_SHAPES["chatml"]
    tok = tiny_tokenizer(bad, specials, bos, eos)
    messages = [{"role": "user", "content": "Hi there"}]
    with pytest.raises(GvpoError, match="chat template of the tokenizer.*not a prefix") as err:
        encode_pair(tok, messages, "Once upon a time", TokenizeConfig())
    assert "\n" not in str(err.value)
    with pytest.raises(GvpoError, match="^--prompt-template: .*not a prefix"):
        encode_pair(tok, messages, "Once upon a time", TokenizeConfig(prompt_template=bad))
    assert encode_pair(tok, messages, "Once upon a time", TokenizeConfig(prompt_template=template)).response_ids
