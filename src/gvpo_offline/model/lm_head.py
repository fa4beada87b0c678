"""log p(target) through the LM head, without the [M, V] log-softmax: target logit − logsumexp, chunked.

    hidden [M, d] ──(W [V, d], b [V])──▶ z = transform(h·Wᵀ + b)  ──▶  log p(t) = z_t − logsumexp(z)

:func:`target_logps` is what every log-prob of the package goes through when the family's head is
verified (``logprobs.FAST_PATH_FAMILIES``). It is a custom autograd function (:class:`TargetLogprob`):

* **forward**, chunk by chunk of rows: the logits in one reused float32 buffer, the target logit picked,
  then the buffer turned in place into exp(z − max) for the logsumexp. Saved for backward: the hidden
  states, the targets and lse [M] — no logits, no log-softmax.
* **backward**, chunk by chunk: ∂L/∂z = −g·(p − onehot) (times the transform's derivative), then
  ∂L/∂h = ∂L/∂z·W and ∂L/∂W += ∂L/∂zᵀ·h. p comes one of two ways:

  - **kept**: when the pass needs gradients and its chunks' exp(z − max) fit :func:`keep_bytes_for`
    (128 MiB on CPU), the forward keeps them (a fresh buffer per chunk instead of the reused one) with
    1/Σexp per row, and backward forms p = exp(z − max)/Σ in one pass: one of the head's four
    M×d×V matmuls saved (the recompute), and the exp pass with it. Unless the graph is retained for
    another backward, that pass writes ∂L/∂z into the kept chunk itself (no [rows, V] buffer). Chunks
    past the budget take the other way; so does a soft-capped head (its derivative needs the logits).
  - **recomputed**: the logits once more (one matmul), then in place p = exp(z − lse).

  Compared with the activation-checkpointed log-softmax this replaced, no log-softmax is recomputed,
  nor its [M, V] output and gradient allocated.

Chunks are sized in bytes (:func:`chunk_rows_for`). On CPU, where the stage keeps freed blocks in
the heap (runtime/memory.py's ``keep_freed_memory``, as precompute-ref, train and eval do), one [rows, V]
float32 buffer may take 128 MiB (1,048 rows at vocabulary 32k): the head's matmuls run faster on wider
chunks (d = 256, vocabulary 32k, 245 → 1,048 rows: 1.07–1.17× on the head alone; benchmarks/lm_head.py,
`narrow` against `new`).
Elsewhere a chunk stays under glibc's default 32 MiB mmap threshold, so that freed blocks go back to the
heap and are reused rather than mapped and page-faulted afresh each chunk.

The transform (:class:`LogitTransform`) is the family's logit post-processing: a scale (Cohere ×
logit_scale, Granite ÷ logits_scaling, HyperCLOVA X × logits_scaling) then a soft-cap (Gemma 2/3).

On CUDA, `cut-cross-entropy <https://github.com/apple/ml-cross-entropy>`_ (``pip install
gvpo-offline[cce]``) computes the same thing in one fused kernel when it is installed and the head has
no bias, in bf16/fp16 (:func:`fused_kernel`); everything else takes the chunked path. The fused path has NOT yet run on
a GPU here (no GPU in CI): tests/test_lm_head.py checks only its selection on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gvpo_offline.runtime import memory

# Bytes of one [rows, V] float32 logits buffer. CPU with freed blocks kept in the heap (runtime/memory.py):
# wide chunks keep the head's matmuls efficient. CPU otherwise: under glibc's default mmap threshold
# (32 MiB), so a freed buffer returns to the heap and the next chunk's comes from there. CUDA: the caching
# allocator reuses blocks anyway; larger chunks keep the matmuls wide.
CPU_CHUNK_BYTES = 128 << 20
CPU_MMAP_CHUNK_BYTES = 30 << 20
CUDA_CHUNK_BYTES = 256 << 20
KERNEL_ENV = "GVPO_OFFLINE_LM_HEAD"  # 'chunked' forces the chunked path where a fused kernel would run
# Bytes of exp(z − max) chunks a pass with gradients may keep from forward for backward, saving the
# backward's logits matmul (vs_trl's workload, vocabulary 32k, all kept: the head's backward 4.6 → 2.4 CPU s
# with runtime/memory.py, benchmarks/where_time_goes.py; benchmarks/lm_head.py's larger steps keep
# about half: 1.04×). It adds to the step's peak memory (up to this much), so it is a budget, not all of
# [M, V]. CUDA: 0 (not measured on a GPU). KEEP_ENV overrides it (MiB; 0 = always recompute, as before).
CPU_KEEP_BYTES = 128 << 20
CUDA_KEEP_BYTES = 0
KEEP_ENV = "GVPO_OFFLINE_LM_HEAD_KEEP_MIB"


@dataclass(frozen=True)
class LogitTransform:
    """What a family does to h·Wᵀ + b before the softmax, in float32: z ↦ softcap·tanh(scale·z / softcap)
    (no soft-cap: scale·z)."""

    scale: float = 1.0
    softcap: float | None = None


def chunk_rows_for(vocab_size: int, device: torch.device | str = "cpu", budget_bytes: int | None = None,
                   heap_keeps_freed: bool | None = None) -> int:
    """Rows per LM-head chunk so that one [rows, vocab] float32 buffer is ≤ ``budget_bytes``
    (default: :data:`CUDA_CHUNK_BYTES` on CUDA; on CPU :data:`CPU_CHUNK_BYTES` where freed blocks are kept
    in the heap, else :data:`CPU_MMAP_CHUNK_BYTES`); 1 to 4096. ``heap_keeps_freed``: whether they are kept
    (None: whether runtime/memory.py's keep_freed_memory has set glibc up in this process)."""
    device = torch.device(device)
    if heap_keeps_freed is None:
        heap_keeps_freed = memory.freed_memory_kept()
    if device.type == "cuda":
        default = CUDA_CHUNK_BYTES
    else:
        default = CPU_CHUNK_BYTES if heap_keeps_freed else CPU_MMAP_CHUNK_BYTES
    budget = budget_bytes or default
    return max(1, min(4096, budget // (4 * vocab_size)))


def keep_bytes_for(device: torch.device | str = "cpu") -> int:
    """Bytes of exp(z − max) chunks a pass with gradients keeps for its backward: ``GVPO_OFFLINE_LM_HEAD_KEEP_MIB``
    (MiB) when set, else :data:`CPU_KEEP_BYTES` / :data:`CUDA_KEEP_BYTES`."""
    value = os.environ.get(KEEP_ENV)
    if value is not None:
        return max(0, int(float(value) * (1 << 20)))
    return CUDA_KEEP_BYTES if torch.device(device).type == "cuda" else CPU_KEEP_BYTES


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The matmul's dtype: autocast's when it is on (bf16 on GPU), else the weight's."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype


def _raw_logits(h: Tensor, w: Tensor, b: Tensor | None, scale: float, out: Tensor) -> Tensor:
    """scale·(h·wᵀ + b) into ``out`` [n, V] float32 (h, w, b already in the compute dtype)."""
    if h.dtype == torch.float32:
        if b is None:
            torch.mm(h, w.t(), out=out)
        else:
            torch.addmm(b, h, w.t(), out=out)
    else:
        out.copy_(torch.nn.functional.linear(h, w, b))
    if scale != 1.0:
        out.mul_(scale)
    return out


class TargetLogprob(torch.autograd.Function):
    """log p(targets) = z_t − logsumexp(z) of z = transform(hidden·Wᵀ + b): [M] float32. See the module."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                transform: LogitTransform, chunk: int, keep_bytes: int = 0) -> Tensor:
        """``keep_bytes``: up to this many bytes of exp(z − max) chunks are kept for backward (0: none;
        never with a soft-cap)."""
        dtype = _compute_dtype(hidden, weight)
        m, vocab = hidden.shape[0], weight.shape[0]
        logps = torch.empty(m, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        inv_sum = torch.empty_like(logps)  # 1 / Σ exp(z − max) per row: p = exp(z − max) · inv_sum
        keep_rows = 0 if transform.softcap else keep_bytes // (4 * vocab)
        kept: list[Tensor | None] = []
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            buffer = None
            for s in range(0, m, chunk):
                h, t = hidden[s : s + chunk].to(dtype), targets[s : s + chunk, None]
                n = h.shape[0]
                if s + n <= keep_rows:  # this chunk's buffer stays alive for backward
                    out = torch.empty(n, vocab, dtype=torch.float32, device=hidden.device)
                else:
                    if buffer is None:
                        buffer = torch.empty(min(chunk, m), vocab, dtype=torch.float32, device=hidden.device)
                    out = buffer[:n]
                z = _raw_logits(h, w, b, transform.scale, out)
                if transform.softcap:
                    z.div_(transform.softcap).tanh_().mul_(transform.softcap)
                top = z.amax(dim=1, keepdim=True)
                picked = z.gather(1, t)
                z.sub_(top).exp_()  # the buffer now holds exp(z − max): logsumexp without a temporary
                total = z.sum(dim=1, keepdim=True)
                torch.reciprocal(total, out=inv_sum[s : s + n, None])
                lse[s : s + n] = (total.log_() + top).squeeze(1)
                logps[s : s + n] = picked.squeeze(1) - lse[s : s + n]
                kept.append(z if s + n <= keep_rows else None)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, inv_sum, *kept)
        ctx.transform, ctx.chunk, ctx.dtype = transform, chunk, dtype
        return logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, targets, lse, inv_sum, *kept = ctx.saved_tensors
        transform, chunk, dtype = ctx.transform, ctx.chunk, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        m, vocab = hidden.shape[0], weight.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None  # the first chunk's product, then accumulated into (no zero-filled [V, d] first)
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b and bias is not None else None
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        rows = min(chunk, m)
        buffer = None  # [rows, V] float32, made when a chunk needs it
        # d softcap·tanh(x/softcap) / dx
        slope = torch.empty(rows, vocab, device=hidden.device) if transform.softcap else None
        consume = not _graph_kept()  # no second backward: a kept chunk may become its own gradient
        for c, s in enumerate(range(0, m, chunk)):
            h, t = hidden[s : s + chunk].to(dtype), targets[s : s + chunk, None]
            n = h.shape[0]
            g_rows = grad_out[s : s + n, None]
            if buffer is None and (kept[c] is None or not consume):
                buffer = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
            if kept[c] is not None:  # ∂L/∂z = −g·(p − onehot) with p = kept · inv_sum, in one pass
                row_scale = (g_rows * inv_sum[s : s + n, None]).neg_().mul_(transform.scale)
                # in place when the graph is not retained (no [rows, V] buffer); else the kept chunk
                # stays as it was for the retained graph's next backward
                z = kept[c].mul_(row_scale) if consume else torch.mul(kept[c], row_scale, out=buffer[:n])
                z.scatter_add_(1, t, g_rows * transform.scale)
            else:
                z = _raw_logits(h, w, b, transform.scale, buffer[:n])
                if transform.softcap:
                    z.div_(transform.softcap).tanh_()
                    torch.mul(z, z, out=slope[:n]).neg_().add_(1.0)  # 1 − tanh²
                    z.mul_(transform.softcap)
                z.sub_(lse[s : s + n, None]).exp_()  # softmax p, in place
                z.scatter_add_(1, t, z.new_full((n, 1), -1.0))  # p − onehot
                z.mul_(g_rows.neg())  # ∂L/∂z = −g·(p − onehot)
                if transform.softcap:
                    z.mul_(slope[:n])
                if transform.scale != 1.0:
                    z.mul_(transform.scale)
            g = z.to(dtype)
            if need_h:
                grad_h[s : s + n] = g @ w
            if need_w:
                if grad_w is None:
                    grad_w = (g.t() @ h).float()
                elif dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w += (g.t() @ h).float()
            if grad_b is not None:
                grad_b += z.sum(dim=0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def _graph_kept() -> bool:
    """Whether the running backward was asked to keep the graph (``retain_graph=True``); True where this
    torch cannot tell (the safe answer: saved tensors are left as they are)."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


def fused_kernel(hidden: Tensor, bias: Tensor | None):
    """cut-cross-entropy's ``linear_cross_entropy`` when it can compute this head, else None: a CUDA
    tensor, no bias, the package installed (the optional extra ``cce``), and ``GVPO_OFFLINE_LM_HEAD`` not
    ``chunked``."""
    if not hidden.is_cuda or bias is not None or os.environ.get(KERNEL_ENV) == "chunked":
        return None
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:  # not installed, or its triton kernels cannot load here
        return None
    return linear_cross_entropy


def target_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                 transform: LogitTransform = LogitTransform(), chunk: int | None = None) -> Tensor:
    """log p(targets[m] | hidden[m]) through the head (W [V, d], b [V] or None) and ``transform``:
    hidden [M, d], targets [M] → [M] float32. Differentiable in hidden, W and b. ``chunk``: rows per
    chunk (None: :func:`chunk_rows_for` the vocabulary). On CUDA, the fused kernel when
    :func:`fused_kernel` finds one and the matmul runs in bf16/fp16 (scale folded into the hidden states:
    (s·h)·Wᵀ = s·(h·Wᵀ))."""
    targets = targets.long()
    dtype = _compute_dtype(hidden, weight)
    kernel = fused_kernel(hidden, bias) if dtype in (torch.bfloat16, torch.float16) else None
    if kernel is not None:
        e = hidden.to(dtype) * transform.scale if transform.scale != 1.0 else hidden.to(dtype)
        loss = kernel(e, weight.to(dtype), targets, softcap=transform.softcap, reduction="none", filter_eps=None)
        return -loss.float()
    chunk = chunk or chunk_rows_for(weight.shape[0], hidden.device)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    keep = keep_bytes_for(hidden.device) if needs_grad else 0
    return TargetLogprob.apply(hidden, weight, bias, targets, transform, chunk, keep)
