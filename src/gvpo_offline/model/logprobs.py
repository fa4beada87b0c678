"""The one sequence log-prob function, shared by precompute-ref, train and eval.

Reference and policy log-probs are computed the same way: Σ over response tokens only (prompt and
padding masked), log-softmax and the sums in float32, and never the full [batch, time, vocab] logits —
only response positions, chunk by chunk. The forward pass runs in the dtype the weights are loaded in
(no autocast): precompute-ref, train and eval load the same weights dtype (the cache's), so ℓ = 0 at
step 0 to rounding. Many pairs without grad: :mod:`gvpo_offline.model.scoring`; packed rows:
:mod:`gvpo_offline.model.packing`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from gvpo_offline.model.loading import unwrap_peft

# ---- batching ------------------------------------------------------------------------------------


def default_batch_tokens(device: torch.device) -> int:
    """Padded tokens per no-grad forward pass: 16384 on a GPU; 2048 on CPU, where small batches stay in
    cache and ran ~25% faster (measured)."""
    return 16384 if device.type == "cuda" else 2048


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size (rows × longest) ≤ batch_tokens.

    Longest first, so an out-of-memory batch shows up at once. A sequence longer than the budget gets
    a batch of its own. Deterministic (stable sort).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


# ---- log-probs -----------------------------------------------------------------------------------

# Logit elements per LM-head chunk: 32M fp32 = 128 MiB (twice that with the log-softmax), e.g. 2048
# positions up to a 16k vocabulary, 261 at 128k. Blocks above glibc's 32 MiB mmap threshold go back to
# the OS when freed; smaller ones fragment the heap (measured on CPU).
LOGIT_BUDGET = 1 << 25


def logits_chunk_for(vocab_size: int, budget: int = LOGIT_BUDGET) -> int:
    """Response positions per LM-head chunk so that one [chunk, vocab] fp32 block is ≤ ``budget`` elements."""
    return max(1, min(4096, budget // vocab_size))


def _logit_postprocess(config):
    """What some architectures do to the LM head's output before the softmax (applied in fp32)."""
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    scale = getattr(config, "logit_scale", None)  # Cohere: logits × scale
    divisor = getattr(config, "logits_scaling", None)  # Granite: logits / scaling

    def apply(logits: Tensor) -> Tensor:
        if scale:
            logits = logits * scale
        if divisor:
            logits = logits / divisor
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


def _token_logps(lm_head, hidden: Tensor, targets: Tensor, postprocess) -> Tensor:
    """log p(target) for each row: hidden [M, d], targets [M] -> [M] float32. Logits only for M rows."""
    logits = postprocess(lm_head(hidden).float())
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def sequence_logps(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    chunk_tokens: int | None = None,
) -> Tensor:
    """Σ_t log π(y_t | x, y_<t) over each response's tokens: [B] float32 on the model's device.

    prompt_ids, response_ids: B lists of token ids (from gvpo_offline.data.tokenize); every prompt and every
    response needs at least one token. The pairs are concatenated and right-padded; only the positions
    that predict response tokens go through the LM head, ``chunk_tokens`` at a time (None:
    :func:`logits_chunk_for` the vocabulary), so memory is O(chunk_tokens × vocab), not
    O(batch × time × vocab). With grad enabled, each chunk is recomputed in the backward pass (activation
    checkpointing) so its logits are not kept either. Differentiable; call under torch.no_grad() for the
    reference. It runs in the weights' dtype (see the module docstring).
    """
    sharded = getattr(model, "gvpo_sequence_logps", None)  # distributed.shard_model: inside FSDP's hooks
    if sharded is not None:
        return sharded(prompt_ids, response_ids, chunk_tokens)
    return sequence_logps_unsharded(model, prompt_ids, response_ids, chunk_tokens)


def sequence_logps_unsharded(model, prompt_ids, response_ids, chunk_tokens: int | None = None) -> Tensor:
    """:func:`sequence_logps` itself (under FSDP it runs as a registered forward method of the root)."""
    model = unwrap_peft(model)
    device = getattr(model, "gvpo_compute_device", None) or next(model.parameters()).device
    if any(len(p) == 0 for p in prompt_ids) or any(len(r) == 0 for r in response_ids):
        raise ValueError("every prompt and every response needs at least one token")
    lm_head = model.get_output_embeddings()
    chunk_tokens = chunk_tokens or logits_chunk_for(lm_head.weight.shape[0])
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    batch, width = len(lengths), max(lengths)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    rows, positions, targets = [], [], []
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[b, : lengths[b]] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention_mask[b, : lengths[b]] = 1
        rows += [b] * len(r)
        positions += range(len(p) - 1, len(p) + len(r) - 1)  # hidden state at t-1 predicts token t
        targets += r
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    rows_t = torch.tensor(rows, device=device)
    positions_t = torch.tensor(positions, device=device)
    targets_t = torch.tensor(targets, device=device)

    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    return response_logps(model, hidden[rows_t, positions_t], targets_t, rows_t, batch, chunk_tokens)


def response_logps(model, picked: Tensor, targets: Tensor, owners: Tensor, n_out: int, chunk_tokens: int) -> Tensor:
    """Σ log p(target) per sequence: picked [M, d] hidden states that predict targets [M]; owners [M] in
    0..n_out-1 say whose sum each goes to -> [n_out] float32. The LM head sees ``chunk_tokens`` rows at a
    time (recomputed in the backward pass when grad is on, so no chunk's logits are kept)."""
    lm_head = model.get_output_embeddings()
    postprocess = _logit_postprocess(model.config)
    pieces = []
    for start in range(0, picked.shape[0], chunk_tokens):
        h, t = picked[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_token_logps, lm_head, h, t, postprocess, use_reentrant=False))
        else:
            pieces.append(_token_logps(lm_head, h, t, postprocess))
    token_logps = torch.cat(pieces)
    return torch.zeros(n_out, dtype=torch.float32, device=picked.device).index_add(0, owners, token_logps)
