"""The one sequence log-prob function, shared by precompute-ref, train and eval.

Reference and policy log-probs are computed the same way: Σ over response tokens only (prompt and
padding masked), log-softmax and the sums in float32, and never the full [batch, time, vocab] logits —
only response positions, chunk by chunk. The forward pass runs in the dtype the weights are loaded in
(no autocast): precompute-ref, train and eval load the same weights dtype (the cache's), so ℓ = 0 at
step 0 to rounding.

Two paths, chosen per model (:func:`head_transform`):

* **fast** — families on :data:`FAST_PATH_FAMILIES` (each checked against its own ``forward`` logits in
  tests/test_lm_head.py): the backbone's hidden states at the response positions only, then the LM head
  and the family's logit post-processing in :mod:`gvpo_offline.model.lm_head` (target logit −
  logsumexp, chunked, its own backward).
* **general** — every other family (and any LM head that is not a plain ``nn.Linear``, e.g. LoRA on the
  head): the model's own ``forward``, one sequence at a time (:func:`forward_logps`), right by
  construction for whatever the family does to its logits, but slower and, in training, O(B·T·V) memory.
  Encoder models without ``is_decoder`` are refused in one line (:func:`general_path_refusal`). Many pairs without grad: :mod:`gvpo_offline.model.scoring`; packed rows:
:mod:`gvpo_offline.model.packing`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gvpo_offline.model.lm_head import LogitTransform, chunk_rows_for, target_logps
from gvpo_offline.model.loading import unwrap_peft
from gvpo_offline.runtime.errors import GvpoError

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


def logits_chunk_for(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Response positions per LM-head chunk: one [chunk, vocab] float32 buffer of a few MiB on CPU
    (:func:`gvpo_offline.model.lm_head.chunk_rows_for`)."""
    return chunk_rows_for(vocab_size, device)


def _plain(config) -> LogitTransform:
    return LogitTransform()


# The fast path: families whose ``ForCausalLM.forward`` computes exactly transform(lm_head(
# base_model(...).last_hidden_state)) — read in their transformers 5 source, and each checked against
# the model's own forward logits (tests/test_lm_head.py builds a tiny model per family). Every other
# family goes through its own forward (:func:`forward_logps`), which is right for any model but slower.
FAST_PATH_FAMILIES: dict[str, Callable[[object], LogitTransform]] = {
    **{name: _plain for name in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi3", "phi",
        "olmo2", "smollm3", "starcoder2", "stablelm", "gpt_neox")},
    "gemma2": lambda c: LogitTransform(softcap=c.final_logit_softcapping),
    "gemma3_text": lambda c: LogitTransform(softcap=c.final_logit_softcapping),
    "cohere": lambda c: LogitTransform(scale=c.logit_scale),  # logits × logit_scale
    "cohere2": lambda c: LogitTransform(scale=c.logit_scale),
    "granite": lambda c: LogitTransform(scale=1.0 / c.logits_scaling),  # logits ÷ logits_scaling
    "hyperclovax": lambda c: LogitTransform(scale=c.logits_scaling),  # logits × logits_scaling (MuP)
}


def head_transform(model) -> LogitTransform | None:
    """The verified logit post-processing of this (unwrapped) model's family, or None: not on the fast
    path (another family, or an LM head that is not a plain ``nn.Linear``, e.g. a LoRA-wrapped one)."""
    family = FAST_PATH_FAMILIES.get(getattr(model.config, "model_type", None))
    head = model.get_output_embeddings()
    if family is None or type(head) is not torch.nn.Linear:
        return None
    return family(model.config)


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
    O(batch × time × vocab); with grad enabled no chunk's logits are kept for backward either
    (:mod:`gvpo_offline.model.lm_head`). Families not on :data:`FAST_PATH_FAMILIES` go through their own
    forward instead (:func:`forward_logps`). Differentiable; call under torch.no_grad() for the
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
    if head_transform(model) is None:
        return forward_logps(model, input_ids, attention_mask, rows_t, positions_t, targets_t)
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    return response_logps(model, hidden[rows_t, positions_t], targets_t, rows_t, batch, chunk_tokens)


def response_logps(model, picked: Tensor, targets: Tensor, owners: Tensor, n_out: int,
                   chunk_tokens: int | None = None) -> Tensor:
    """Σ log p(target) per sequence on the fast path: picked [M, d] hidden states that predict targets
    [M]; owners [M] in 0..n_out-1 say whose sum each goes to -> [n_out] float32. The LM head sees
    ``chunk_tokens`` rows at a time (:func:`gvpo_offline.model.lm_head.target_logps`: no chunk's logits
    kept, no log-softmax recomputed). Raises ValueError for a model not on the fast path."""
    transform = head_transform(model)
    if transform is None:
        raise ValueError(f"model type {model.config.model_type!r} is not on the LM-head fast path")
    head = model.get_output_embeddings()
    token_logps = target_logps(picked, head.weight, head.bias, targets, transform, chunk_tokens)
    return torch.zeros(n_out, dtype=torch.float32, device=picked.device).index_add(0, owners, token_logps)


def general_path_refusal(model) -> str | None:
    """Why :func:`forward_logps` cannot give this model's log π(y|x) (None: it can): the refusals."""
    config = model.config
    if getattr(config, "is_decoder", None) is False and not getattr(config, "is_encoder_decoder", False):
        return (f"{type(model).__name__} is not causal with is_decoder=False in its config "
                "(an encoder model: set is_decoder=True to use it as a causal LM)")
    return None


def forward_logps(model, input_ids: Tensor, attention_mask: Tensor, rows: Tensor, positions: Tensor,
                  targets: Tensor) -> Tensor:
    """The general path, right for any causal LM: the model's own ``forward`` and its own logits, one
    sequence at a time and without padding — exactly what the model computes for that sequence alone
    (a batched, padded forward is not always the same to 1e-5: measured on ``dory``). input_ids and
    attention_mask [B, T] (right-padded); rows, positions, targets [M]: the hidden state at
    (rows[m], positions[m]) predicts targets[m] -> [B] float32 sums.

    Slower than the fast path (one sequence per forward; every position's [T, V] logits computed and
    log-softmaxed) and, with grad on, each sequence's logits stay alive until backward: O(B·T·V) memory
    in training. Not split within a sequence: continuing a forward over windows of positions needs each
    family's cache conventions (measured: mamba's attention mask, models without a cache), which would
    bring back per-family code.
    """
    reason = general_path_refusal(model)
    if reason is not None:
        raise GvpoError(f"cannot compute log-probs of this model: {reason}")
    sums = []
    for b, length in enumerate(attention_mask.sum(dim=1).tolist()):
        logits = model(input_ids=input_ids[b : b + 1, :length], use_cache=False).logits[0]
        mine = rows == b
        picked = logits[positions[mine]].float()
        sums.append(torch.log_softmax(picked, dim=-1).gather(-1, targets[mine, None]).sum())
        del logits, picked
    return torch.stack(sums).float()
