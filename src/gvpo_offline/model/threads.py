"""CPU threads: one deliberate rule for every stage that runs a model (``--threads``).

The rule: ``--threads N`` when given (0 = torch's own default, one per core); else OMP_NUM_THREADS when
set; else **1 on the CPU**, and torch's default on a GPU (where the CPU only feeds the device).

Why 1 on the CPU: these workloads are small batches (2048 tokens per forward pass by default), where
a second thread buys little on an idle machine and costs up to 20× on a loaded one (measured in issue
22: precompute-ref 458 vs 9,814 tok/s on a busy 2-core machine); ``benchmarks/threads.py`` measures it
for stories260K and a wider model. And with one thread every reduction runs in one fixed order, so two
runs with the same settings are bit-identical (``tests/test_first_hour.py``); across thread counts
results differ at float-rounding level, so resume with the same ``--threads``.
"""

from __future__ import annotations

import os

DEFAULT_CPU_THREADS = 1


def resolve_threads(threads: int | None, on_cpu: bool) -> int | None:
    """The intra-op thread count the rule gives (None: leave torch's default)."""
    if threads is not None:
        return threads or None
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return int(os.environ["OMP_NUM_THREADS"]) or None
    return DEFAULT_CPU_THREADS if on_cpu else None


def apply_threads(threads: int | None, device: str) -> int:
    """Set torch's intra-op threads by the rule for a stage running on ``device`` (auto, cpu, cuda...);
    return the count in effect."""
    import torch

    if threads is not None and threads < 0:
        from gvpo_offline.runtime.errors import GvpoError

        raise GvpoError(f"--threads must be 0 (torch's default) or more, got {threads}")
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    n = resolve_threads(threads, on_cpu)
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()
