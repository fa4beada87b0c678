"""Packed rows: each prompt computed once for all its responses, and no padding between sequences.

The sibling of :func:`gvpo_offline.model.logprobs.sequence_logps` (same result to float rounding, same
arguments). Pairs that share a prompt (a group) become one *segment*: the prompt once, then each
response; several segments fill one *row* of at most ``row_tokens`` tokens:

    row:       [ prompt A | A.resp 1 | A.resp 2 | A.resp 3 ][ prompt B | B.resp 1 | B.resp 2 ] ...
    positions:   0 .. p-1   p .. p+r1-1  p .. p+r2-1 ...       0 .. q-1   q ..        q ..

Each token sees exactly what it would see as a separate sequence: prompt tokens see the earlier tokens
of their prompt; a response token sees its whole prompt and the earlier tokens of its own response,
never a sibling response nor another segment (plus the sliding window, by position, for models that
have one). Position ids restart after the prompt for each response, so rotary embeddings see the usual
positions. The first token of every response is predicted by the prompt's last hidden state, so in
training the gradients of all k responses flow into the prompt's activations.

Attention is computed per *piece* (:class:`Pieces`): a prompt against itself, each response against its
prompt and itself. Every attention layer gathers the pieces' queries and keys and runs the model's own
attention function (sdpa or eager) over buckets of similar-sized pieces with small masks, or, on a CUDA
GPU in half precision, torch's flash-attention varlen kernel over all pieces unpadded (checked once
against the bucket path). Nothing is computed for masked-out blocks, so a packed pass costs about its
real tokens: packing pays in proportion to the shared prompt tokens (see :data:`MIN_SHARED_FRACTION`).
The model's attention is routed through these once (:func:`route_attention`); ordinary calls are
unchanged.

Supported (each checked against separate sequences in tests/test_packing.py): model types in
:data:`SUPPORTED_MODEL_TYPES` (Llama, Mistral, Qwen2/3, Gemma 1/2/3 text, Phi-3: their attention layers
take the attention function from ``config._attn_implementation`` and pass the forward's keyword
arguments to it) with the ``sdpa`` or ``eager`` attention backends, on transformers >= 5 (tested with
5.24). Anything else (flash-attention or flex backends, other architectures, position-bias models)
falls back to the padded separate-sequence path with a one-line note (:func:`unsupported_reason`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gvpo_offline.model.loading import unwrap_peft
from gvpo_offline.model.logprobs import head_transform, logits_chunk_for, response_logps

PACKING_CHOICES = ("auto", "on", "off")
# 'auto' packs a batch when computing each distinct prompt once removes at least this share of its tokens.
# Attention runs piece by piece (Pieces below), so a packed pass costs about its real tokens: on 2 CPU
# cores (1 thread, benchmarks/shared_prompt.py) the speed-up tracks the saved share (prompt 64 / responses
# 192 / k = 4, share 0.19: 1.17×; prompt 512 / responses 128 / k = 8, share 0.7: 2.8× precompute, 3.6×
# train step) and the quick start's groups (prompts ~30 tokens, responses ~100, share ~0.1) train at the
# same speed either way (22.6 s packed, 22.1 s padded per epoch). Below 15% the gain is within noise.
MIN_SHARED_FRACTION = 0.15
# Longest packed row (tokens). Attention cost does not depend on it (pieces); it bounds the [rows, T]
# layout of a pass, whose pad tokens at the ends of shorter rows still go through the MLPs.
MAX_ROW_TOKENS = 4096
SUPPORTED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}
)
_ROUTED_BACKENDS = ("sdpa", "eager")  # attention functions that route_attention can wrap
_MASKABLE_LAYERS = {"full_attention", "sliding_attention"}


def unsupported_reason(config) -> str | None:
    """Why the packed layout cannot run this model config (None: it can)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return f"transformers {transformers.__version__} (attention functions get the forward's keyword arguments from 5.0)"
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one checked to compute packed rows"
    backend = (getattr(config, "_attn_implementation", None) or "sdpa").removeprefix("gvpo_")
    if backend not in _ROUTED_BACKENDS:
        return f"the {backend!r} attention backend cannot compute packed rows (sdpa and eager can)"
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        return "the model's attention is not causal"
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - _MASKABLE_LAYERS:
        return f"layer types {sorted(layer_types - _MASKABLE_LAYERS)} are not supported"
    return None


def resolve(setting: str, config, model=None) -> tuple[str, str | None]:
    """``--packing`` setting -> (mode 'auto', 'on' or 'off' for :func:`use_packing`, a one-line note when
    the model cannot run packed rows and padded separate sequences are used instead). With ``model``, its
    LM head must be on the fast path too (packed rows need it; a LoRA-wrapped head, e.g. ``--lora-target``
    or ``--modules-to-save`` naming lm_head, is not)."""
    if setting not in PACKING_CHOICES:
        raise ValueError(f"--packing must be one of {', '.join(PACKING_CHOICES)}, got {setting!r}")
    if setting == "off":
        return "off", None
    reason = unsupported_reason(config)
    if reason is None and model is not None and head_transform(unwrap_peft(model)) is None:
        reason = "the LM head is not a plain linear layer (e.g. LoRA or --modules-to-save on it)"
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
    """A [R, T] batch of rows: token ids, logical positions, the attention pieces and, per scored token,
    (row, column, target, pair).

    A *piece* is one block of attention that is actually needed: a prompt attending to itself, or one
    response attending to its prompt and to itself, as (query columns, key columns) into the row. Pad
    columns at the end of short rows belong to no piece (their outputs are zeros, nothing reads them)."""
    width = max(row_tokens(r) for r in rows)
    shape = (len(rows), width)
    ids = torch.zeros(shape, dtype=torch.long)
    position = torch.zeros(shape, dtype=torch.long)
    pieces: list[tuple[range, list[int]]] = []  # (query columns, key columns) as flat indices r*T + col
    row_of, col_of, targets, owners = [], [], [], []
    for r, row in enumerate(rows):
        col = 0
        for seg in row:
            prompt = list(prompt_ids[seg.pairs[0]])
            p = len(prompt)
            ids[r, col : col + p] = torch.tensor(prompt)
            position[r, col : col + p] = torch.arange(p)
            prompt_cols = range(r * width + col, r * width + col + p)
            pieces.append((prompt_cols, list(prompt_cols)))
            last_prompt = col + p - 1
            col += p
            for i in seg.pairs:
                resp = list(response_ids[i])
                n = len(resp)
                ids[r, col : col + n] = torch.tensor(resp)
                position[r, col : col + n] = torch.arange(p, p + n)
                response_cols = range(r * width + col, r * width + col + n)
                pieces.append((response_cols, [*prompt_cols, *response_cols]))
                # token t of the response is predicted by the hidden state before it: the prompt's last
                # token for t = 0, then the response's own tokens
                row_of += [r] * n
                col_of += [last_prompt, *range(col, col + n - 1)]
                targets += resp
                owners += [i] * n
                col += n
    return ids, position, pieces, (row_of, col_of, targets, owners)


# A bucket of pieces is padded to its longest query and key lists; a piece joins the current bucket
# while the padded work (pieces × queries × keys) stays within this factor of the real work.
BUCKET_SLACK = 1.3


@dataclass
class _Bucket:
    """Pieces batched into one attention call: [P, Lq] query and [P, Lk] key token indices (flat into
    the [R·T] tokens of the rows; padding slots point at token 0), their logical positions, validity."""

    q_index: Tensor
    k_index: Tensor
    q_position: Tensor
    k_position: Tensor
    q_valid: Tensor
    k_valid: Tensor


class Pieces:
    """The attention of a batch of packed rows, computed piece by piece (passed to the model's forward as
    the ``gvpo_pieces`` keyword, which transformers hands to every attention call).

    Instead of a dense [T, T] mask over a whole row (mostly masked-out blocks), every layer gathers each
    piece's queries and keys, runs the model's own attention function (sdpa or eager) over buckets of
    similar-sized pieces with a small causal (and sliding-window) mask by logical position, and scatters
    the outputs back: work and memory ∝ Σ queries × keys of the pieces, not rows × T². Gradients flow
    through the gathers, so all k responses' gradients reach the shared prompt's keys and values."""

    def __init__(self, pieces: list[tuple[range, list[int]]], position: Tensor, config, device):
        self.config = config
        flat_position = position.reshape(-1)
        # buckets: pieces by decreasing key length; a piece joins the open bucket while padding stays small
        # and the bucket's key slots stay within the pass's tokens (the gathered keys and values, repeated
        # for grouped-query heads, then take no more memory than the pass's own)
        key_budget = position.numel()
        groups: list[list[int]] = []
        max_q = max_k = real = 0
        for j in sorted(range(len(pieces)), key=lambda j: (-len(pieces[j][1]), -len(pieces[j][0]), j)):
            q, k = len(pieces[j][0]), len(pieces[j][1])
            n = len(groups[-1]) + 1 if groups else 0
            if (groups and n * max(max_q, q) * max(max_k, k) <= BUCKET_SLACK * (real + q * k)
                    and n * max(max_k, k) <= key_budget):
                groups[-1].append(j)
                max_q, max_k, real = max(max_q, q), max(max_k, k), real + q * k
            else:
                groups.append([j])
                max_q, max_k, real = q, k, q * k
        self.buckets = [self._bucket([pieces[j] for j in g], flat_position, device) for g in groups]
        self.query_tokens = torch.cat([b.q_index[b.q_valid] for b in self.buckets])
        self._masks: dict[tuple[int, int | None, bool], Tensor] = {}
        self.calls = 0
        self._ordered = [pieces[j] for g in groups for j in g]  # queries in query_tokens order
        self._device = device
        self._varlen: _Varlen | None = None

    @property
    def varlen(self) -> _Varlen:
        """The same pieces without padding, for a variable-length kernel: concatenated key token indices
        and cumulative query / key lengths. Built on first use (only the CUDA varlen path needs it)."""
        if self._varlen is None:
            ordered, device = self._ordered, self._device
            self._varlen = _Varlen(
                k_index=torch.tensor([t for _, k in ordered for t in k], device=device),
                cu_q=torch.tensor([0, *itertools.accumulate(len(q) for q, _ in ordered)], dtype=torch.int32,
                                  device=device),
                cu_k=torch.tensor([0, *itertools.accumulate(len(k) for _, k in ordered)], dtype=torch.int32,
                                  device=device),
                max_q=max(len(q) for q, _ in ordered), max_k=max(len(k) for _, k in ordered),
            )
        return self._varlen

    @staticmethod
    def _bucket(members, flat_position, device) -> _Bucket:
        lq = max(len(q) for q, _ in members)
        lk = max(len(k) for _, k in members)
        q_index = torch.zeros(len(members), lq, dtype=torch.long)
        k_index = torch.zeros(len(members), lk, dtype=torch.long)
        q_valid = torch.zeros(len(members), lq, dtype=torch.bool)
        k_valid = torch.zeros(len(members), lk, dtype=torch.bool)
        for m, (q, k) in enumerate(members):
            q_index[m, : len(q)] = torch.tensor(q)
            k_index[m, : len(k)] = torch.tensor(k)
            q_valid[m, : len(q)] = True
            k_valid[m, : len(k)] = True
        return _Bucket(q_index.to(device), k_index.to(device), flat_position[q_index].to(device),
                       flat_position[k_index].to(device), q_valid.to(device), k_valid.to(device))

    def window(self, module) -> int | None:
        """The layer's sliding window (None: full attention), as the model's own masks define it: per
        layer type where the config lists them, else the config's one window for every layer."""
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return window if layer_types[module.layer_idx] == "sliding_attention" else None
        return window

    def mask(self, b: int, window: int | None, additive: bool, dtype) -> Tensor:
        """[P, 1, Lq, Lk] mask of bucket ``b``: valid key, key position ≤ query position, within the window.
        Padding query slots may see key slot 0 (no empty softmax row; their outputs are dropped)."""
        key = (b, window, additive)
        if key not in self._masks:
            bucket = self.buckets[b]
            qp, kp = bucket.q_position[:, :, None], bucket.k_position[:, None, :]
            allowed = bucket.k_valid[:, None, :] & (kp <= qp)
            if window is not None:
                allowed &= qp - kp < window
            allowed[:, :, 0] |= ~bucket.q_valid
            allowed = allowed[:, None]
            if additive:  # eager attention adds its mask to the scores, as HF builds them
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
                    ~allowed, torch.finfo(dtype).min)
            self._masks[key] = allowed
        return self._masks[key]

    def attend(self, attention, additive: bool, module, query: Tensor, key: Tensor, value: Tensor, **kwargs):
        """query [R, H, T, D], key/value [R, Hkv, T, D] -> ([R, T, H, D], None), like HF attention
        functions; ``attention`` is the model's own function, called once per bucket, or the flash
        varlen kernel where :func:`_varlen_usable` (CUDA, half precision, sdpa, no soft-cap)."""
        self.calls += 1
        rows, heads, width, dim = query.shape
        q_tokens = query.transpose(1, 2).reshape(rows * width, heads, dim)
        k_tokens = key.transpose(1, 2).reshape(rows * width, key.shape[1], key.shape[3])
        v_tokens = value.transpose(1, 2).reshape(rows * width, value.shape[1], value.shape[3])
        window = self.window(module)

        def buckets() -> Tensor:
            outputs = []
            for b, bucket in enumerate(self.buckets):
                out, _ = attention(
                    module, q_tokens[bucket.q_index].transpose(1, 2), k_tokens[bucket.k_index].transpose(1, 2),
                    v_tokens[bucket.k_index].transpose(1, 2), self.mask(b, window, additive, query.dtype), **kwargs,
                )
                outputs.append(out[bucket.q_valid])  # [queries, H, D]
            return torch.cat(outputs)

        if not additive and _varlen_usable(query, kwargs):
            v = self.varlen
            attended = _varlen_kernel()(
                q_tokens[self.query_tokens], k_tokens[v.k_index], v_tokens[v.k_index], v.cu_q, v.cu_k, v.max_q,
                v.max_k, scale=kwargs.get("scaling"), window_size=(window - 1 if window else -1, 0), enable_gqa=True,
            )
            if not _VARLEN_CHECK:  # first use in this process: compare with the bucket path once
                with torch.no_grad():
                    expected = buckets()
                _check_varlen(attended.detach(), expected)
                if not _VARLEN_CHECK["ok"]:
                    attended = buckets()
        else:
            attended = buckets()
        out = q_tokens.new_zeros(rows * width, heads, attended.shape[-1])
        out = out.index_copy(0, self.query_tokens, attended.to(out.dtype))
        return out.view(rows, width, heads, -1), None


@dataclass(frozen=True)
class _Varlen:
    """All pieces without padding, for a variable-length kernel: [Nk] key token indices, cumulative
    query / key lengths ([pieces + 1] int32) and the longest of each."""

    k_index: Tensor
    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int


def _varlen_kernel():
    """torch's flash-attention varlen kernel (torch >= 2.10; CUDA only), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _varlen_usable(query: Tensor, kwargs: dict) -> bool:
    """Whether this attention call can run on the varlen kernel: CUDA, fp16/bf16, no dropout, no
    attention soft-cap, and not found wrong by the one-time check (:func:`_check_varlen`)."""
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256
            and not kwargs.get("dropout") and kwargs.get("softcap") is None
            and _VARLEN_CHECK.get("ok", True) and _varlen_kernel() is not None)


# {"ok": bool} once the first varlen call of the process was compared with the bucket path. The kernel's
# causal mask must be aligned bottom-right (a response's n queries are the last n of its p + n keys).
_VARLEN_CHECK: dict[str, bool] = {}


def _check_varlen(attended: Tensor, expected: Tensor) -> None:
    """Trust the varlen kernel only if its first output matches the bucket path (to half-precision
    rounding); otherwise use buckets for the rest of the process, with a one-line note on stderr."""
    import sys

    error = (attended.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    _VARLEN_CHECK["ok"] = error <= 0.02 * scale + 1e-3
    if not _VARLEN_CHECK["ok"]:
        print(f"note: packed rows: the flash varlen kernel differs from SDPA by {error:.3g} (scale {scale:.3g}); "
              "using SDPA per piece instead", file=sys.stderr)


def _eager_attention(module):
    """The eager attention function of the module's own modeling file (Gemma2's soft-caps its scores)."""
    import sys

    return sys.modules[type(module).__module__].eager_attention_forward


def _routed(backend: str):
    """The attention function registered as 'gvpo_<backend>': the backend itself, except that a forward
    pass given ``gvpo_pieces`` is computed piece by piece."""

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, gvpo_pieces: Pieces | None = None, **kwargs):
        inner = sdpa_attention_forward if backend == "sdpa" else _eager_attention(module)
        if gvpo_pieces is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        return gvpo_pieces.attend(inner, backend == "eager", module, query, key, value, **kwargs)

    return attention


def route_attention(model) -> None:
    """Switch the model's attention to 'gvpo_sdpa' / 'gvpo_eager' (once, permanently): the same function
    and masks as before for every ordinary call (generation included), plus the piecewise path when a
    forward pass carries ``gvpo_pieces``. Permanent, because activation checkpointing re-runs the
    forward during backward. Not saved: ``save_pretrained`` writes no attention implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    backend = model.config._attn_implementation
    if backend.startswith("gvpo_"):
        return
    if backend not in _ROUTED_BACKENDS:
        raise ValueError(f"packed rows need the sdpa or eager attention backend, not {backend!r}")
    AttentionInterface.register(f"gvpo_{backend}", _routed(backend))
    AttentionMaskInterface.register(f"gvpo_{backend}", sdpa_mask if backend == "sdpa" else eager_mask)
    model.set_attn_implementation(f"gvpo_{backend}")


def rows_logps(
    model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
    rows: list[list[Segment]], chunk_tokens: int | None = None,
) -> Tensor:
    """One forward pass over ``rows`` (a plan of some of the pairs) -> [B] float32: Σ log π(y|x) for the
    pairs in the rows, 0 for the others. Differentiable, like logprobs.sequence_logps."""
    if any(len(prompt_ids[i]) == 0 or len(response_ids[i]) == 0 for row in rows for s in row for i in s.pairs):
        raise ValueError("every prompt and every response needs at least one token")
    model = unwrap_peft(model)
    device = getattr(model, "gvpo_compute_device", None) or next(model.parameters()).device  # see distributed
    chunk_tokens = chunk_tokens or logits_chunk_for(model.get_output_embeddings().weight.shape[0])
    route_attention(model)
    ids, position, pieces, (row_of, col_of, targets, owners) = _layout(rows, prompt_ids, response_ids)
    plan = Pieces(pieces, position, model.config, device)
    # the real masks are the pieces'; this 4D placeholder only makes transformers skip building a [T, T] one
    placeholder = torch.ones(len(rows), 1, 1, 1, dtype=torch.bool, device=device)
    hidden = model.base_model(
        input_ids=ids.to(device), attention_mask=placeholder, position_ids=position.to(device), use_cache=False,
        gvpo_pieces=plan,
    ).last_hidden_state
    if plan.calls == 0:  # an attention module that does not take its function from config._attn_implementation
        raise RuntimeError(f"packed rows: {type(model).__name__}'s attention never received the pieces")
    picked = hidden[torch.tensor(row_of, device=device), torch.tensor(col_of, device=device)]
    return response_logps(model, picked, torch.tensor(targets, device=device),
                          torch.tensor(owners, device=device), len(prompt_ids), chunk_tokens)


def packed_logps(
    model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
    chunk_tokens: int | None = None, row_tokens: int | None = None,
) -> Tensor:
    """:func:`gvpo_offline.model.logprobs.sequence_logps` with each prompt computed once: [B] float32.

    All B pairs go through the model in one pass, laid out by :func:`plan_rows` in rows of at most
    ``row_tokens`` tokens (None: a single row). Pairs with identical prompt ids share one copy of it.
    """
    return rows_logps(model, prompt_ids, response_ids, plan_rows(prompt_ids, response_ids, row_tokens), chunk_tokens)
