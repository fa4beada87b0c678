"""Models: loading, device/dtype choice, fingerprints, and the one sequence log-prob function.

``sequence_logps`` is shared by precompute-ref, train and eval so that reference and policy log-probs
are computed the same way: Σ over response tokens only (prompt and padding masked), log-softmax in
float32, and never the full [batch, time, vocab] logits — only response positions, chunk by chunk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from gvpo_offline.errors import GvpoError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
ADAPTER_CONFIG = "adapter_config.json"


# ---- device, dtype, loading ----------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (device in ("cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise GvpoError(f"unknown --device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GvpoError(f"--device {device} was asked for but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on a GPU that supports it, float32 otherwise."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise GvpoError(f"unknown --dtype {dtype!r}: use auto, float32 or bfloat16")
    return table[dtype]


def model_folder(spec: str | Path) -> Path:
    """The local folder of ``spec``: a model folder, a LoRA adapter folder (``adapter_config.json``), or a
    hub id ``org/name[@revision]`` resolved through the Hugging Face cache (gvpo_offline.hub)."""
    from gvpo_offline.hub import resolve_model

    path = resolve_model(spec).path
    if not path.is_dir():
        raise GvpoError(f"{path}: not a folder (expected a model folder or a hub id org/name[@revision])")
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        raise GvpoError(f"{path}: not a model folder (no config.json, no adapter_config.json)")
    return path


def is_adapter(path: Path) -> bool:
    """A PEFT adapter folder (adapter_config.json) rather than a full model."""
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a model folder, adapter folder or hub id; a one-line GvpoError when it cannot be
    loaded. An adapter folder without tokenizer files uses its base model's."""
    from transformers import AutoTokenizer

    folder = model_folder(path)
    if is_adapter(folder) and not (folder / "tokenizer_config.json").is_file():
        from gvpo_offline.adapters import base_spec

        folder = model_folder(base_spec(folder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a usable tokenizer folder"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GvpoError(f"{folder}: cannot load a tokenizer from this folder ({reason})") from None
    # We tokenize whole texts and truncate them ourselves (and report how many): transformers' "Token
    # indices sequence length is longer than the specified maximum" warning is expected, so mark it as given.
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def context_length(path: str | Path, trust_remote_code: bool = False) -> int | None:
    """The model's context (``max_position_embeddings`` of its config.json; a LoRA adapter's is its base
    model's), None when it does not say."""
    from transformers import AutoConfig

    folder = model_folder(path)
    if is_adapter(folder):
        from gvpo_offline.adapters import base_spec

        folder = model_folder(base_spec(folder))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return getattr(config, "max_position_embeddings", None)


def load_model(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """AutoModelForCausalLM from a model folder or hub id, on ``device``, in eval mode (no dropout). An
    adapter folder gives its base model with the adapter merged in (gvpo_offline.adapters)."""
    from transformers import AutoModelForCausalLM

    folder = model_folder(path)
    if is_adapter(folder):
        from gvpo_offline.adapters import load_merged

        return load_merged(folder, device, dtype, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval()


# ---- fingerprints --------------------------------------------------------------------------------


def model_fingerprint(path: str | Path) -> str:
    """sha256 over the model folder's config.json and weight files (content, not names' paths or dates).

    Weight hashes come from gvpo_offline.hub.file_sha256: read off the blob name in a hub snapshot, else
    hashed once and cached on disk by (size, mtime, ctime, inode), so a 15 GB model is not re-read by
    every command. An adapter folder's fingerprint covers its config, its weights and its base model's
    fingerprint (gvpo_offline.adapters.adapter_fingerprint)."""
    from gvpo_offline.hub import file_sha256

    path = model_folder(path)
    if is_adapter(path):
        from gvpo_offline.adapters import adapter_fingerprint

        return adapter_fingerprint(path)
    weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        raise GvpoError(f"{path}: no weight files (*.safetensors, *.bin) in the model folder")
    h = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    config.pop("transformers_version", None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for weight in weights:
        h.update(weight.name.encode())
        h.update(file_sha256(weight).encode())
    return h.hexdigest()


def unwrap_peft(model):
    """The transformers model a peft model wraps, its LoRA layers injected (others: the model itself).
    The log-prob functions call ``model.base_model`` for hidden states, which on a peft model is not the
    transformers body."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


def compute_context(device: torch.device, dtype: torch.dtype):
    """The one numeric regime of every log-prob: float32 weights, and autocast to ``dtype`` when it is
    lower precision (bf16 on GPU). Reference, policy and eval all use it, so ℓ = 0 at step 0."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


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

    prompt_ids, response_ids: B lists of token ids (from gvpo_offline.tokenize); every prompt and every
    response needs at least one token. The pairs are concatenated and right-padded; only the positions
    that predict response tokens go through the LM head, ``chunk_tokens`` at a time (None:
    :func:`logits_chunk_for` the vocabulary), so memory is O(chunk_tokens × vocab), not
    O(batch × time × vocab). With grad enabled, each chunk is recomputed in the backward pass (activation
    checkpointing) so its logits are not kept either. Differentiable; call under torch.no_grad() for the
    reference. Run it inside :func:`compute_context` for the shared numeric regime.
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


def batched_logps(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    batch_tokens: int,
    dtype: torch.dtype = torch.float32,
    chunk_tokens: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    packed: bool = False,
) -> np.ndarray:
    """:func:`sequence_logps` of many pairs without grad: [N] float64 (summed in fp32), in input order.

    ``packed=False``: pairs are batched by length (:func:`length_batches`, rows × longest ≤
    ``batch_tokens``). ``packed=True``: each prompt is computed once for its responses and sequences are
    packed without padding (:mod:`gvpo_offline.packing`: rows of ≤ min(batch_tokens, MAX_ROW_TOKENS)
    tokens, batched rows × longest ≤ ``batch_tokens``); same values to float rounding. Runs in
    :func:`compute_context` for ``dtype``. ``on_batch(n_pairs, n_tokens)`` after each batch (progress;
    n_tokens = prompt + response tokens of those pairs, as if scored separately).
    """
    device = next(model.parameters()).device
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    out = np.zeros(len(lengths), dtype=np.float64)
    if packed:
        from gvpo_offline import packing

        rows = packing.plan_rows(prompt_ids, response_ids, min(batch_tokens, packing.MAX_ROW_TOKENS))
        plan = [[rows[j] for j in b] for b in length_batches([packing.row_tokens(r) for r in rows], batch_tokens)]
    else:
        plan = length_batches(lengths, batch_tokens)
    with torch.no_grad(), compute_context(device, dtype):
        for batch in plan:
            if packed:
                batch_rows, batch = batch, [i for row in batch for seg in row for i in seg.pairs]
                logps = packing.rows_logps(model, prompt_ids, response_ids, batch_rows, chunk_tokens)[batch]
            else:
                logps = sequence_logps(
                    model, [prompt_ids[i] for i in batch], [response_ids[i] for i in batch], chunk_tokens
                )
            out[batch] = logps.double().cpu().numpy()
            if on_batch is not None:
                on_batch(len(batch), sum(lengths[i] for i in batch))
    return out
