"""log p(target) through the LM head, without the [M, V] log-softmax: target logit − logsumexp, chunked.

    hidden [M, d] ──(W [V, d], b [V])──▶ z = transform(h·Wᵀ + b)  ──▶  log p(t) = z_t − logsumexp(z)

:func:`target_logps` is what every log-prob of the package goes through when the family's head is
verified (``logprobs.FAST_PATH_FAMILIES``). It is a custom autograd function (:class:`TargetLogprob`):

* **forward**, chunk by chunk of rows: the logits in one reused float32 buffer, the target logit picked,
  then the buffer turned in place into exp(z − max) for the logsumexp. Saved for backward: the hidden
  states, the targets and lse [M] — no logits, no log-softmax.
* **backward**, chunk by chunk: the logits once more (the one matmul that must be redone unless [M, V]
  is kept), then in place p = exp(z − lse), p_t −= 1, times −g (and the transform's derivative):
  ∂L/∂z. Then ∂L/∂h = ∂L/∂z·W and ∂L/∂W += ∂L/∂zᵀ·h. Compared with the activation-checkpointed
  log-softmax it replaces, no log-softmax is recomputed, nor its [M, V] output and gradient allocated.

Chunks are sized in bytes (:func:`chunk_rows_for`): on CPU one [rows, V] float32 buffer stays under
glibc's 32 MiB mmap threshold, so freed blocks go back to the heap and are reused rather than being
mapped and page-faulted afresh each chunk (system time, measured: benchmarks/lm_head.py).

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

# Bytes of one [rows, V] float32 logits buffer. CPU: under glibc's largest mmap threshold (32 MiB), so
# a freed buffer returns to the heap and the next chunk's comes from there. CUDA: the caching allocator
# reuses blocks anyway; larger chunks keep the matmuls wide.
CPU_CHUNK_BYTES = 30 << 20
CUDA_CHUNK_BYTES = 256 << 20
KERNEL_ENV = "GVPO_OFFLINE_LM_HEAD"  # 'chunked' forces the chunked path where a fused kernel would run


@dataclass(frozen=True)
class LogitTransform:
    """What a family does to h·Wᵀ + b before the softmax, in float32: z ↦ softcap·tanh(scale·z / softcap)
    (no soft-cap: scale·z)."""

    scale: float = 1.0
    softcap: float | None = None


def chunk_rows_for(vocab_size: int, device: torch.device | str = "cpu", budget_bytes: int | None = None) -> int:
    """Rows per LM-head chunk so that one [rows, vocab] float32 buffer is ≤ ``budget_bytes``
    (default :data:`CPU_CHUNK_BYTES` / :data:`CUDA_CHUNK_BYTES`); 1 to 4096."""
    device = torch.device(device)
    budget = budget_bytes or (CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES)
    return max(1, min(4096, budget // (4 * vocab_size)))


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
                transform: LogitTransform, chunk: int) -> Tensor:
        dtype = _compute_dtype(hidden, weight)
        m, vocab = hidden.shape[0], weight.shape[0]
        logps = torch.empty(m, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            buffer = torch.empty(min(chunk, m), vocab, dtype=torch.float32, device=hidden.device)
            for s in range(0, m, chunk):
                h, t = hidden[s : s + chunk].to(dtype), targets[s : s + chunk, None]
                z = _raw_logits(h, w, b, transform.scale, buffer[: h.shape[0]])
                if transform.softcap:
                    z.div_(transform.softcap).tanh_().mul_(transform.softcap)
                top = z.amax(dim=1, keepdim=True)
                picked = z.gather(1, t)
                z.sub_(top).exp_()  # the buffer now holds exp(z − max): logsumexp without a temporary
                lse[s : s + chunk] = (z.sum(dim=1, keepdim=True).log_() + top).squeeze(1)
                logps[s : s + chunk] = picked.squeeze(1) - lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.transform, ctx.chunk, ctx.dtype = transform, chunk, dtype
        return logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        transform, chunk, dtype = ctx.transform, ctx.chunk, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        m, vocab = hidden.shape[0], weight.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b and bias is not None else None
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        rows = min(chunk, m)
        buffer = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
        slope = torch.empty_like(buffer) if transform.softcap else None  # d softcap·tanh(x/softcap) / dx
        for s in range(0, m, chunk):
            h, t = hidden[s : s + chunk].to(dtype), targets[s : s + chunk, None]
            n = h.shape[0]
            z = _raw_logits(h, w, b, transform.scale, buffer[:n])
            if transform.softcap:
                z.div_(transform.softcap).tanh_()
                torch.mul(z, z, out=slope[:n]).neg_().add_(1.0)  # 1 − tanh²
                z.mul_(transform.softcap)
            z.sub_(lse[s : s + n, None]).exp_()  # softmax p, in place
            z.scatter_add_(1, t, z.new_full((n, 1), -1.0))  # p − onehot
            z.mul_(grad_out[s : s + n, None].neg())  # ∂L/∂z = −g·(p − onehot)
            if transform.softcap:
                z.mul_(slope[:n])
            if transform.scale != 1.0:
                z.mul_(transform.scale)
            g = z.to(dtype)
            if need_h:
                grad_h[s : s + n] = g @ w
            if need_w:
                if dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w += (g.t() @ h).float()
            if grad_b is not None:
                grad_b += z.sum(dim=0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


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
    return TargetLogprob.apply(hidden, weight, bias, targets, transform, chunk)
