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
    assert f"--prompt-template {path.relative_to(root)}" in (root / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(root / "sample_data" / "stories260K")
    cfg = TokenizeConfig(max_length=256, max_prompt_length=128, prompt_template=load_prompt_template(str(path)))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Tell a story"}]
    text = tokenizer.decode(encode_prompt(tokenizer, messages, cfg)[0], skip_special_tokens=True)
    assert text.strip() == "user: Hi\nassistant: Hello\nuser: Tell a story\nassistant:"
