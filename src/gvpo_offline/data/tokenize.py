"""The one tokenization used everywhere: precompute-ref, train, eval, inspect and sample.

A plain-text prompt becomes the tokenizer's ids *with* its special tokens, and its response ids
*without* special tokens, then EOS (``add_eos``).

A chat prompt (a list of messages) goes through the chat template with ``add_generation_prompt=True``,
and its response is the assistant turn **exactly as the template renders it**, so it ends the way the
model ends a turn (ChatML ``<|im_end|>`` + newline, Gemma ``<end_of_turn>``, Llama 3 ``<|eot_id|>``), not
with the tokenizer's EOS: the ids of prompt + assistant message (rendered without a generation prompt)
minus the ids of the prompt (rendered with one), as TRL does. The prompt's ids must be a prefix of the
whole conversation's ids; a template for which they are not is refused (:data:`RESPONSE_RULE`, recorded
in the reference cache's key).

Prompts are truncated from the left (the end of the conversation is kept), responses from the right.
Reference and policy log-probs are only comparable because they share this function.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from gvpo_offline.runtime.errors import GvpoError

Prompt = str | list[dict[str, str]]

# How a response becomes token ids; part of the reference cache's key, so a changed rule recomputes it.
RESPONSE_RULE = "text: response ids + EOS; chat: the template's assistant turn (conversation ids minus prompt ids)"


@dataclass(frozen=True)
class TokenizeConfig:
    """Tokenization settings; recorded in the manifest, so changing any of them invalidates the cache.

    max_length: prompt + response tokens (clamped to the model's max_position_embeddings).
    max_prompt_length: prompt tokens kept (from the end).
    add_eos: append the tokenizer's EOS id to every response of a plain-text prompt (a chat prompt's
        response ends as the chat template ends an assistant turn).
    prompt_template: a Jinja chat template used for message prompts when the tokenizer has none.
    """

    max_length: int = 1024
    max_prompt_length: int = 512
    add_eos: bool = True
    prompt_template: str | None = None

    def __post_init__(self):
        if self.max_prompt_length < 1 or self.max_length < 2:
            raise GvpoError("--max-length must be >= 2 and --max-prompt-length >= 1")
        if self.max_prompt_length >= self.max_length:
            raise GvpoError(
                f"--max-prompt-length ({self.max_prompt_length}) must be smaller than "
                f"--max-length ({self.max_length}) so that every response keeps at least one token"
            )

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one (prompt, response); ``n_tokens`` = len(response_ids) is what log-probs sum over."""

    prompt_ids: list[int]
    response_ids: list[int]
    prompt_truncated: bool
    response_truncated: bool


def load_prompt_template(value: str | None) -> str | None:
    """``--prompt-template``: a Jinja chat-template string, or the path of a file holding one.

    A value without any Jinja tag (``{{ }}``, ``{% %}``) cannot be a template: it must name a file, and a
    missing file is an error (a typo such as ``chat.jnja`` would otherwise become every prompt's text).
    """
    if value is None:
        return None
    path = Path(value)
    if len(value) < 4096 and "\n" not in value and path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise GvpoError(f"--prompt-template {value}: cannot read the file ({err})") from None
    if "{{" not in value and "{%" not in value:
        raise GvpoError(
            f"--prompt-template {value}: no such file (and not a Jinja template: it has no {{{{ }}}} or {{% %}})"
        )
    return value


def clamp_to_model(cfg: TokenizeConfig, max_position_embeddings: int | None) -> tuple[TokenizeConfig, bool]:
    """Return ``cfg`` with max_length no larger than the model's context, and whether it was clamped."""
    if max_position_embeddings and cfg.max_length > max_position_embeddings:
        prompt_len = min(cfg.max_prompt_length, max_position_embeddings - 1)
        return (
            TokenizeConfig(max_position_embeddings, prompt_len, cfg.add_eos, cfg.prompt_template),
            True,
        )
    return cfg, False


def fit_to_model(cfg: TokenizeConfig, model_path, trust_remote_code: bool = False) -> tuple[TokenizeConfig, str | None]:
    """The one clamping rule of precompute-ref and inspect: ``cfg`` clamped to the model's context, and a
    note saying so (None when nothing changed)."""
    from gvpo_offline.model.loading import context_length

    fitted, clamped = clamp_to_model(cfg, context_length(model_path, trust_remote_code))
    if not clamped:
        return cfg, None
    return fitted, (f"note: --max-length {cfg.max_length} clamped to the model's context "
                    f"({fitted.max_length} tokens; prompts keep at most {fitted.max_prompt_length})")


TRUNCATION_WARN_SHARE = 0.05  # warn on its own line when more than this share of responses is cut


def truncation_warning(cut: int, total: int, cfg: TokenizeConfig) -> str | None:
    """A visible warning when more than 5% of ``total`` responses are cut at ``cfg.max_length``."""
    if not total or cut / total <= TRUNCATION_WARN_SHARE:
        return None
    return (f"warning: {cut / total:.1%} of the responses ({cut:,} of {total:,}) are cut to fit "
            f"prompt + response <= {cfg.max_length} tokens: GVPO then compares truncated responses; raise "
            f"--max-length (up to the model's context) or lower --max-prompt-length if that is not intended")


class NoChatTemplate(GvpoError):
    """Chat-message prompts for a tokenizer without a chat template (and no --prompt-template); the
    stages put the file and line of the first chat prompt in front (data.locate.chat_prompts_located)."""


def _chat_text(tokenizer, messages: list[dict[str, str]], cfg: TokenizeConfig, add_generation_prompt: bool) -> str:
    template = cfg.prompt_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise NoChatTemplate(
            "the prompts are chat messages but the tokenizer has no chat template: "
            "pass --prompt-template (a Jinja chat template or a file holding one)"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except Exception as err:  # noqa: BLE001 - jinja2 syntax/sandbox/undefined errors: one line
        import jinja2

        if not isinstance(err, (jinja2.TemplateError, TypeError, ValueError)):
            raise
        message = " ".join(str(err).split())
        raise GvpoError(f"{_template_name(tokenizer, cfg)}: {type(err).__name__}: {message}") from None


def _template_name(tokenizer, cfg: TokenizeConfig) -> str:
    """Which chat template is used, in words (for error messages)."""
    if cfg.prompt_template:
        return "--prompt-template"
    return f"the chat template of the tokenizer {getattr(tokenizer, 'name_or_path', '') or ''}".rstrip()


def _chat_ids(tokenizer, messages: list[dict[str, str]], cfg: TokenizeConfig, add_generation_prompt: bool) -> list[int]:
    # The chat template writes BOS and friends itself: don't add them twice.
    text = _chat_text(tokenizer, messages, cfg, add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, prompt: Prompt, cfg: TokenizeConfig) -> tuple[list[int], bool]:
    """Prompt -> (ids truncated from the left to ``cfg.max_prompt_length``, was it truncated)."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        ids = _chat_ids(tokenizer, prompt, cfg, add_generation_prompt=True)
    if not ids:  # a tokenizer without BOS and an empty prompt: nothing to condition the response on
        raise GvpoError(f"the prompt {prompt!r} has no tokens; give a non-empty prompt")
    if len(ids) > cfg.max_prompt_length:
        return list(ids[-cfg.max_prompt_length :]), True
    return list(ids), False


def encode_response(tokenizer, response: str, cfg: TokenizeConfig, prompt: Prompt = "") -> list[int]:
    """Response -> its target ids (not truncated), by :data:`RESPONSE_RULE`.

    ``prompt`` a string: the response's ids without special tokens, plus EOS unless ``cfg.add_eos`` is
    off. ``prompt`` chat messages: the assistant turn as the chat template renders it (its end-of-turn
    tokens included; ``add_eos`` does not apply): ids of prompt + {"role": "assistant", "content":
    response} minus ids of the prompt with the generation prompt. GvpoError (one line, naming the
    template) when the prompt's ids are not a prefix of the conversation's.
    """
    if not isinstance(prompt, str):
        return _assistant_turn_ids(tokenizer, prompt, response, cfg)
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if cfg.add_eos:
        if tokenizer.eos_token_id is None:
            raise GvpoError("the tokenizer has no EOS token: pass --no-eos")
        ids.append(tokenizer.eos_token_id)
    return ids


def _assistant_turn_ids(tokenizer, messages: list[dict[str, str]], response: str, cfg: TokenizeConfig) -> list[int]:
    prompt_ids = _chat_ids(tokenizer, messages, cfg, add_generation_prompt=True)
    turn = [*messages, {"role": "assistant", "content": response}]
    ids = _chat_ids(tokenizer, turn, cfg, add_generation_prompt=False)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise GvpoError(
            f"{_template_name(tokenizer, cfg)}: the prompt's tokens (rendered with the generation prompt) are not "
            "a prefix of the tokens of prompt + assistant reply, so the reply's tokens are undefined; use a "
            "template whose generation prompt is how it starts an assistant turn (--prompt-template)"
        )
    return ids[len(prompt_ids) :]


def turn_end_id(tokenizer, cfg: TokenizeConfig) -> int | None:
    """The token with which the chat template ends an assistant turn (ChatML ``<|im_end|>``, Gemma
    ``<end_of_turn>``, Llama 3 ``<|eot_id|>``): where sampling a chat reply stops, so that the reply's
    text, tokenized again by :func:`encode_response`, gives the tokens that were sampled followed by the
    turn's end. Read off a probe reply: the first token after the reply's own tokens; None when there
    is no chat template or the probe's tokens do not show it."""
    probe = "Hello"
    try:
        turn = _assistant_turn_ids(tokenizer, [{"role": "user", "content": "Hi"}], probe, cfg)
    except GvpoError:
        return None
    body = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    if turn[: len(body)] != body or len(turn) == len(body):
        return None
    return turn[len(body)]


def encode_pair(tokenizer, prompt: Prompt, response: str, cfg: TokenizeConfig) -> EncodedPair:
    """Tokenize and truncate one (prompt, response): prompt from the left, response from the right."""
    prompt_ids, prompt_cut = encode_prompt(tokenizer, prompt, cfg)
    return truncate_response(prompt_ids, prompt_cut, encode_response(tokenizer, response, cfg, prompt), cfg)


def truncate_response(
    prompt_ids: list[int], prompt_cut: bool, response_ids: list[int], cfg: TokenizeConfig
) -> EncodedPair:
    """Cut ``response_ids`` from the right so that prompt + response fits in ``cfg.max_length``."""
    room = cfg.max_length - len(prompt_ids)
    return EncodedPair(prompt_ids, response_ids[:room], prompt_cut, len(response_ids) > room)


# Probe texts for the fingerprint: spaces, case, digits, unicode, special-looking text, a chat turn.
_PROBES = (
    "Once upon a time, there was a little dog named Max.",
    "  Leading spaces,\ttabs\nand newlines  ",
    "UPPER lower 12345 3.14159 e=mc^2 <s> </s> <|im_start|> [INST]",
    "Ünïcödé — naïve café, 東京, emoji 🙂, Ωμέγα",
)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides token ids: vocabulary, special tokens, chat template and the ids of probe texts.

    Semantic rather than file-based, so a tokenizer saved and reloaded with ``save_pretrained`` (which may
    rewrite harmless settings in tokenizer.json) keeps its fingerprint.
    """
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    probes = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in _PROBES]
    h.update(json.dumps(
        {
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "eos": tokenizer.eos_token_id,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "probes": probes,
        },
        sort_keys=True,
    ).encode())
    return h.hexdigest()
