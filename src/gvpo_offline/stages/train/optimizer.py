"""The train stage's AdamW: torch's fused kernel where it is known to apply, else torch's default.

torch's default AdamW allocates temporaries of the parameters' size at every step. On CPU it is the
per-tensor loop: for each weight, √v / √(1−β₂ᵗ) makes two temporaries of that weight's size (the
largest weight sets the peak: 2 × 33 MB for a 32,000 × 256 fp32 LM head). On CUDA it is ``foreach``:
list-wide ops whose √v̂ list is as large as all parameters together. ``fused=True`` runs one kernel per
parameter tensor that reads and writes the weight, its gradient and both moments in place: no such
temporary, and the same update to float rounding (benchmarks/peak_rss.py measures both;
tests/test_train.py compares the weights after several steps).
torch ≥ 2.4 has the fused kernel for CPU and CUDA, float32/bfloat16/float16.

Where: one process (CPU or CUDA). Sharded runs (FSDP's DTensor parameters under torchrun) keep torch's
default: the fused kernel over DTensors is not exercised by this project's tests. The optimizer state
(``exp_avg``, ``exp_avg_sq``, ``step``) has the same layout either way, so checkpoints resume across
the two. A checkpoint's param_groups carry the ``fused``/``foreach`` flags of the run that saved it;
:func:`keep_implementation` puts back the ones this run chose (a one-process checkpoint resumed sharded
must not bring ``fused=True`` to DTensors).
"""

from __future__ import annotations

import torch
from torch import Tensor

FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def can_fuse(params: list[Tensor]) -> bool:
    """Whether torch's fused AdamW applies: plain tensors on one CPU or CUDA device, floating dtypes."""
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in FUSED_DEVICES
            and all(p.dtype in FUSED_DTYPES and type(p.data) is Tensor for p in params))


def adamw(params: list[Tensor], lr: float, weight_decay: float, sharded: bool) -> torch.optim.AdamW:
    """AdamW over ``params`` (the trainable weights, or their fp32 master copies): fused in one process
    when :func:`can_fuse`, torch's default otherwise (``sharded``: FSDP runs)."""
    fused = not sharded and bool(params) and can_fuse(params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def keep_implementation(optimizer: torch.optim.Optimizer) -> None:
    """After a checkpoint's state was loaded into ``optimizer``: step with the implementation it was built
    with (its ``defaults``), not the one the checkpoint's param_groups brought."""
    for group in optimizer.param_groups:
        for flag in ("fused", "foreach"):
            if flag in optimizer.defaults:
                group[flag] = optimizer.defaults[flag]
