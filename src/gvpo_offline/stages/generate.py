"""Batched, seeded sampling from a loaded model: :func:`generate_responses`, used by ``sample`` and by
``eval``'s generation eval. Prompts are tokenized with :func:`gvpo_offline.data.tokenize.encode_prompt`,
exactly as every other stage does.

Determinism: every sampled row (prompt, sample j) draws its randomness from its own generator, seeded
from ``(seed, key of the prompt, j)``, through the Gumbel-max trick (argmax of logits/T + Gumbel
noise is a draw from softmax(logits/T)). A response therefore does not depend on which other prompts
share its batch, on the batch size, or on ``n`` (asking for more samples only adds new ones), up to
floating-point differences between padded batches, which can flip a near-tie token in rare cases.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from gvpo_offline.data.tokenize import Prompt, TokenizeConfig, clamp_to_model, encode_prompt, turn_end_id
from gvpo_offline.runtime.errors import GvpoError


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample.

    temperature: softmax temperature; 0 means greedy decoding.
    top_p: nucleus sampling mass (1.0 = off).
    max_new_tokens: at most this many new tokens per response (also clamped so that prompt + response
        fits in ``TokenizeConfig.max_length``).
    seed: the seed every row's generator is derived from.
    batch_size: rows (prompt × sample) per ``model.generate`` call.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:
            raise GvpoError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GvpoError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise GvpoError("--max-new-tokens and --batch-size must be >= 1")


def stable_int(*parts: object) -> int:
    """A 63-bit integer from ``parts``, identical across runs and machines (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---- generation ----------------------------------------------------------------------------------


class _RowSampler(LogitsProcessor):
    """Logits processor that turns greedy decoding into per-row seeded sampling (Gumbel-max).

    Applies temperature and top-p, forbids the stop tokens (EOS, a chat turn's end) as the first new
    token (so no response is empty), and adds Gumbel noise drawn from each row's own generator;
    ``generate`` then takes the argmax.
    """

    def __init__(self, generators, temperature: float, top_p: float, stop_ids: list[int], prompt_width: int):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p
        self.stop_ids, self.prompt_width = stop_ids, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        if self.stop_ids and input_ids.shape[1] == self.prompt_width:
            scores[:, self.stop_ids] = -float("inf")
        if self.temperature == 0:
            return scores
        scores = scores / self.temperature
        if self.top_p < 1:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop_sorted = cum - sorted_scores.softmax(-1) >= self.top_p  # keep the first token always
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, -float("inf"))
        vocab = scores.shape[-1]
        uniform = torch.stack(
            [torch.rand(vocab, generator=g, device=g.device, dtype=torch.float64) for g in self.generators]
        ).to(scores.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-12)))
        return scores + gumbel.float()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings (generation flags, pad tokens) and progress bars for the duration."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    n: Sequence[int] | int,
    cfg: SamplingConfig,
    tokenize_cfg: TokenizeConfig,
    *,
    seed_keys: Sequence[object] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[list[str]]:
    """Sample ``n[i]`` responses for each prompt: a list (per prompt) of lists of decoded strings.

    prompts: strings or chat-message lists, tokenized with :func:`encode_prompt` (truncated from the
        left to ``tokenize_cfg.max_prompt_length``).
    n: samples per prompt, one int for all or one per prompt.
    Rows are left-padded (attention mask; pad = the tokenizer's pad, else unk, else EOS), sorted by
    prompt length and generated ``cfg.batch_size`` at a time; generation stops at EOS (and, for chat
    prompts, at the token that ends the template's assistant turn, tokenize.turn_end_id) or after
    min(cfg.max_new_tokens, tokenize_cfg.max_length − prompt length) tokens. Only the new tokens are
    decoded, special tokens skipped, so that tokenizing a reply again (tokenize.encode_response) gives
    the sampled tokens and the turn's end. A stop token is never the first new token, so responses are not empty
    (bar the odd whitespace-only token).
    seed_keys: a stable identity per prompt for seeding (default: its position in ``prompts``). Give
        the prompt's id or file position when the same prompt may come in different calls (resuming).
    progress: called with the number of rows finished after each batch.
    Deterministic for the same seed, inputs and keys; see the module docstring for batch independence.
    """
    counts = [n] * len(prompts) if isinstance(n, int) else list(n)
    if len(counts) != len(prompts):
        raise ValueError(f"n has {len(counts)} entries for {len(prompts)} prompts")
    keys = list(range(len(prompts))) if seed_keys is None else list(seed_keys)
    tokenize_cfg, _ = clamp_to_model(tokenize_cfg, getattr(model.config, "max_position_embeddings", None))
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if any(not isinstance(p, str) for p in prompts):
        turn_end = turn_end_id(tokenizer, tokenize_cfg)
        stop_ids += [turn_end] if turn_end is not None and turn_end not in stop_ids else []

    encoded = [encode_prompt(tokenizer, p, tokenize_cfg)[0] for p in prompts]
    rows = [(i, j) for i, k in enumerate(counts) for j in range(k)]
    rows.sort(key=lambda r: -len(encoded[r[0]]))  # similar lengths together: less padding
    results: list[list[str]] = [[""] * k for k in counts]

    was_training = model.training
    model.eval()
    try:
        with quiet_transformers():
            for start in range(0, len(rows), cfg.batch_size):
                batch = rows[start : start + cfg.batch_size]
                texts = _generate_batch(model, tokenizer, [encoded[i] for i, _ in batch],
                                        [(cfg.seed, keys[i], j) for i, j in batch],
                                        cfg, tokenize_cfg, pad_id, stop_ids, device)
                for (i, j), text in zip(batch, texts):
                    results[i][j] = text
                if progress is not None:
                    progress(len(batch))
    finally:
        model.train(was_training)
    return results


def _generate_batch(model, tokenizer, prompt_ids, seeds, cfg, tokenize_cfg, pad_id, stop_ids, device) -> list[str]:
    """One ``model.generate`` call over left-padded rows; returns the decoded new tokens per row."""
    from transformers import GenerationConfig, LogitsProcessorList

    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, ids in enumerate(prompt_ids):
        input_ids[b, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, width - len(ids) :] = 1
    rooms = [max(1, min(cfg.max_new_tokens, tokenize_cfg.max_length - len(p))) for p in prompt_ids]

    generators = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(stable_int(*s))
        generators.append(g)
    sampler = _RowSampler(generators, cfg.temperature, cfg.top_p, stop_ids, width)
    gen_cfg = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max(rooms), pad_token_id=pad_id,
        eos_token_id=stop_ids or None, bos_token_id=tokenizer.bos_token_id,
    )
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        generation_config=gen_cfg, logits_processor=LogitsProcessorList([sampler]),
    )
    texts = []
    for b, room in enumerate(rooms):
        new = out[b, width : width + room].tolist()
        stops = [new.index(t) for t in stop_ids if t in new]
        new = new[: min(stops)] if stops else new
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts
