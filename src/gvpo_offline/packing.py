"""Packed rows: each prompt computed once for all its responses, and no padding between sequences.

The sibling of :func:`gvpo_offline.modeling.sequence_logps` (same result to float rounding, same
arguments). Pairs that share a prompt (a group) become one *segment*: the prompt once, then each
response; several segments fill one *row* of at most ``row_tokens`` tokens:

    row:       [ prompt A | A.resp 1 | A.resp 2 | A.resp 3 ][ prompt B | B.resp 1 | B.resp 2 ] ...
    positions:   0 .. p-1   p .. p+r1-1  p .. p+r2-1 ...       0 .. q-1   q ..        q ..

A 4D mask makes each token see exactly what it would see as a separate sequence: prompt tokens see
the earlier tokens of their prompt; a response token sees its whole prompt and the earlier tokens of
its own response, never a sibling response nor another segment (plus the sliding window, by position,
for models that have one). Position ids restart after the prompt for each response, so rotary
embeddings see the usual positions. The first token of every response is predicted by the prompt's
last hidden state, so in training the gradients of all k responses flow into the prompt's activations.

Supported (each checked against separate sequences in tests/test_packing.py): model types in
:data:`SUPPORTED_MODEL_TYPES` (Llama, Mistral, Qwen2/3, Gemma 1/2/3 text, Phi-3: their forward passes a
custom 4D mask, or a {layer type: mask} dict, straight to attention) with the ``sdpa`` or ``eager``
attention backends, on transformers >= 5 (tested with 5.24). Anything else (flash-attention, flex,
other architectures, position-bias models) falls back to the padded separate-sequence path with a
one-line note (:func:`unsupported_reason`). Flash-attention varlen is not used: the tool loads models
with sdpa, and varlen cannot express "every response sees the shared prompt".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gvpo_offline.modeling import logits_chunk_for, response_logps, unwrap_peft

PACKING_CHOICES = ("auto", "on", "off")
# 'auto' packs a batch when computing each distinct prompt once removes at least this share of its tokens.
# Below it the dense block mask costs more than it saves: attention runs over whole packed rows (T² per
# row, masked blocks included). Measured on 2 CPU cores: the quick start's groups (prompts ~30 tokens,
# responses ~100, share ~0.1) trained 5× slower packed; prompt 512 / responses 128 / k = 8 (share 0.7)
# 2.6× faster precompute and 3× faster train steps (benchmarks/shared_prompt.py).
MIN_SHARED_FRACTION = 0.3
# Longest packed row. Attention over a row costs rows × T² whatever the mask, so on a GPU budget of
# 16384 tokens four rows of 4096 waste less on masked-out blocks than one row of 16384.
MAX_ROW_TOKENS = 4096
SUPPORTED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}
)
_MASKABLE_LAYERS = {"full_attention", "sliding_attention"}


def unsupported_reason(config) -> str | None:
    """Why the packed layout cannot run this model config (None: it can)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return f"transformers {transformers.__version__} (custom 4D masks are passed through as-is from 5.0)"
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one whose attention takes a custom 4D mask here"
    backend = getattr(config, "_attn_implementation", None) or "sdpa"
    if backend not in ("sdpa", "eager"):
        return f"the {backend!r} attention backend takes no custom 4D mask (sdpa and eager do)"
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        return "the model's attention is not causal"
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - _MASKABLE_LAYERS:
        return f"layer types {sorted(layer_types - _MASKABLE_LAYERS)} are not supported"
    return None


def resolve(setting: str, config) -> tuple[str, str | None]:
    """``--packing`` setting -> (mode 'auto', 'on' or 'off' for :func:`use_packing`, a one-line note when
    the model cannot run packed rows and padded separate sequences are used instead)."""
    if setting not in PACKING_CHOICES:
        raise ValueError(f"--packing must be one of {', '.join(PACKING_CHOICES)}, got {setting!r}")
    if setting == "off":
        return "off", None
    reason = unsupported_reason(config)
    if reason is None:
        return setting, None
    return "off", f"--packing {setting}: {reason}; using padded separate sequences"


def shared_fraction(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> float:
    """Share of the tokens saved by computing each distinct prompt once: 1 − packed / separate tokens."""
    separate = sum(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    prompts = {tuple(p): len(p) for p in prompt_ids}
    packed = sum(prompts.values()) + sum(len(r) for r in response_ids)
    return 1.0 - packed / separate if separate else 0.0


def use_packing(mode: str, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> bool:
    """Whether to run these pairs (a cache shard, a train step, an eval set) in packed rows: always for
    'on', never for 'off', and for 'auto' when :func:`shared_fraction` ≥ :data:`MIN_SHARED_FRACTION`.
    Decided from token lengths only, so every rank and every rerun decides the same."""
    if mode == "auto":
        return shared_fraction(prompt_ids, response_ids) >= MIN_SHARED_FRACTION
    return mode == "on"


# ---- the plan: pairs -> segments -> rows -----------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One prompt and some of the responses to it: ``pairs`` index the input pairs (all with the same
    prompt ids); ``tokens`` = len(prompt) + Σ len(response)."""

    pairs: tuple[int, ...]
    tokens: int


def plan_segments(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], max_tokens: int,
    share_prompt: bool = True,
) -> list[Segment]:
    """Pairs with identical prompt ids (in first-seen order) -> segments of ≤ ``max_tokens`` tokens.

    A group too long for one segment is cut into several, each with its own copy of the prompt; a single
    pair longer than ``max_tokens`` is a segment on its own. ``share_prompt=False``: one pair per segment
    (padding-free rows of separate sequences)."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompt_ids):
        by_prompt.setdefault(tuple(p) if share_prompt else (i, *p), []).append(i)
    segments = []
    for pairs in by_prompt.values():
        prompt_len = len(prompt_ids[pairs[0]])
        current, tokens = [], prompt_len
        for i in pairs:
            if current and tokens + len(response_ids[i]) > max_tokens:
                segments.append(Segment(tuple(current), tokens))
                current, tokens = [], prompt_len
            current.append(i)
            tokens += len(response_ids[i])
        segments.append(Segment(tuple(current), tokens))
    return segments


def plan_rows(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], row_tokens: int | None = None,
    share_prompt: bool = True,
) -> list[list[Segment]]:
    """All pairs laid out in rows of ≤ ``row_tokens`` tokens (None: one row), first-fit decreasing.
    Deterministic; a segment longer than the budget gets a row of its own."""
    if row_tokens is None:
        row_tokens = sum(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    segments = plan_segments(prompt_ids, response_ids, row_tokens, share_prompt)
    rows: list[list[Segment]] = []
    room: list[int] = []
    for seg in sorted(segments, key=lambda s: -s.tokens):  # stable: ties keep input order
        for r, free in enumerate(room):
            if seg.tokens <= free:
                rows[r].append(seg)
                room[r] -= seg.tokens
                break
        else:
            rows.append([seg])
            room.append(row_tokens - seg.tokens)
    return rows


def row_tokens(row: list[Segment]) -> int:
    return sum(seg.tokens for seg in row)


def padded_tokens(rows: list[list[Segment]]) -> int:
    """Tokens one forward pass over ``rows`` occupies: rows × longest row."""
    return len(rows) * max(row_tokens(r) for r in rows) if rows else 0


def split_pairs(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pairs: Sequence[int], budget: int
) -> list[list[int]]:
    """Cut ``pairs`` into pieces whose packed rows fit ``budget`` (one segment each; a pair longer than
    the budget alone): the micro-batches of a group too large for one pass."""
    sub = plan_segments([prompt_ids[i] for i in pairs], [response_ids[i] for i in pairs], budget)
    return [[pairs[j] for j in seg.pairs] for seg in sub]


# ---- the forward pass ------------------------------------------------------------------------------


def _layout(rows: list[list[Segment]], prompt_ids, response_ids):
    """Per-token tensors of a [R, T] batch of rows: ids, segment, branch (0 prompt, j ≥ 1 = the
    segment's j-th response), logical position; and, per scored token, (row, column, target, pair)."""
    width = max(row_tokens(r) for r in rows)
    shape = (len(rows), width)
    ids = torch.zeros(shape, dtype=torch.long)
    # padding: each pad token is its own segment (-1-column), so it only sees itself (no empty softmax rows)
    segment = -1 - torch.arange(width).expand(shape).clone()
    branch = torch.zeros(shape, dtype=torch.long)
    position = torch.zeros(shape, dtype=torch.long)
    row_of, col_of, targets, owners = [], [], [], []
    for r, row in enumerate(rows):
        col = 0
        for s, seg in enumerate(row):
            prompt = list(prompt_ids[seg.pairs[0]])
            p = len(prompt)
            ids[r, col : col + p] = torch.tensor(prompt)
            segment[r, col : col + p] = s
            position[r, col : col + p] = torch.arange(p)
            last_prompt = col + p - 1
            col += p
            for j, i in enumerate(seg.pairs, start=1):
                resp = list(response_ids[i])
                n = len(resp)
                ids[r, col : col + n] = torch.tensor(resp)
                segment[r, col : col + n] = s
                branch[r, col : col + n] = j
                position[r, col : col + n] = torch.arange(p, p + n)
                # token t of the response is predicted by the hidden state before it: the prompt's last
                # token for t = 0, then the response's own tokens
                row_of += [r] * n
                col_of += [last_prompt, *range(col, col + n - 1)]
                targets += resp
                owners += [i] * n
                col += n
    return ids, segment, branch, position, (row_of, col_of, targets, owners)


def block_mask(segment: Tensor, branch: Tensor, position: Tensor, window: int | None = None) -> Tensor:
    """[R, 1, T, T] bool, True = query (dim 2) may attend key (dim 3): same segment, key in the prompt
    or in the query's own response, key not after the query, and (sliding window) position distance
    < ``window``."""
    q, k = (lambda t: t[:, :, None]), (lambda t: t[:, None, :])
    allowed = (q(segment) == k(segment)) & ((k(branch) == 0) | (k(branch) == q(branch)))
    allowed &= k(position) <= q(position)
    if window is not None:
        allowed &= q(position) - k(position) < window
    return allowed[:, None]


def _attention_masks(config, segment, branch, position, device):
    """The mask argument of the base model: a 4D tensor, or {layer type: 4D tensor} for models with
    sliding-window layers. bool for sdpa; additive float (0 / -max) for eager, as HF builds them."""
    eager = getattr(config, "_attn_implementation", "sdpa") == "eager"

    def fmt(mask: Tensor) -> Tensor:
        mask = mask.to(device)
        if not eager:
            return mask
        return torch.zeros(mask.shape, device=device).masked_fill_(~mask, torch.finfo(torch.float32).min)

    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        out = {"full_attention": fmt(block_mask(segment, branch, position))}
        if "sliding_attention" in layer_types:
            out["sliding_attention"] = fmt(block_mask(segment, branch, position, window))
        return out
    return fmt(block_mask(segment, branch, position, window))  # Mistral-style: one window for every layer


def rows_logps(
    model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
    rows: list[list[Segment]], chunk_tokens: int | None = None,
) -> Tensor:
    """One forward pass over ``rows`` (a plan of some of the pairs) -> [B] float32: Σ log π(y|x) for the
    pairs in the rows, 0 for the others. Differentiable, like modeling.sequence_logps."""
    if any(len(prompt_ids[i]) == 0 or len(response_ids[i]) == 0 for row in rows for s in row for i in s.pairs):
        raise ValueError("every prompt and every response needs at least one token")
    model = unwrap_peft(model)
    device = getattr(model, "gvpo_compute_device", None) or next(model.parameters()).device  # see distributed
    chunk_tokens = chunk_tokens or logits_chunk_for(model.get_output_embeddings().weight.shape[0])
    ids, segment, branch, position, (row_of, col_of, targets, owners) = _layout(rows, prompt_ids, response_ids)
    masks = _attention_masks(model.config, segment, branch, position, device)
    hidden = model.base_model(
        input_ids=ids.to(device), attention_mask=masks, position_ids=position.to(device), use_cache=False
    ).last_hidden_state
    picked = hidden[torch.tensor(row_of, device=device), torch.tensor(col_of, device=device)]
    return response_logps(model, picked, torch.tensor(targets, device=device),
                          torch.tensor(owners, device=device), len(prompt_ids), chunk_tokens)


def packed_logps(
    model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
    chunk_tokens: int | None = None, row_tokens: int | None = None,
) -> Tensor:
    """:func:`gvpo_offline.modeling.sequence_logps` with each prompt computed once: [B] float32.

    All B pairs go through the model in one pass, laid out by :func:`plan_rows` in rows of at most
    ``row_tokens`` tokens (None: a single row). Pairs with identical prompt ids share one copy of it.
    """
    return rows_logps(model, prompt_ids, response_ids, plan_rows(prompt_ids, response_ids, row_tokens), chunk_tokens)
