"""The glibc heap of the compute stages: freed large blocks kept for reuse within a stage, handed back
to the operating system between stages.

**Within a stage** (:func:`keep_freed_memory`, called by precompute-ref, train and eval).

On Linux, PyTorch's CPU tensors come from glibc malloc. By default a block over the dynamic mmap threshold
(at most 32 MiB) gets its own mapping, and freed memory at the top of the heap is given back to the OS
once it passes the trim threshold; the next step's tensors of the same sizes (gradients of the embedding
and LM head, AdamW's temporaries, the LM head's chunks) are then mapped and page-faulted afresh. On the
TRL-comparison workload (benchmarks/vs_trl.py: a 19.5M Llama, vocabulary 32k, fp32, one thread) that was
1.1–1.5 s of system time out of a 10 s train epoch (benchmarks/per_token.py measures it).

:func:`keep_freed_memory` raises both thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`) with
``mallopt``, so blocks up to 256 MiB come from the heap and freed ones are reused without page faults.
The peak RSS stays the peak of live memory (a reused block is not counted twice); memory freed at the
end of a phase is kept by the process, up to 1 GiB, instead of going back to the OS.

Left as it is: another C library (musl, macOS, Windows), a user's own malloc settings (any
``MALLOC_*_`` variable or ``GLIBC_TUNABLES`` naming malloc), and ``GVPO_OFFLINE_MALLOC=default`` (the
switch benchmarks use to measure the default).

**Between stages** (:func:`release_freed_memory`, called when precompute-ref is done).

glibc's malloc keeps freed blocks in the process heap for reuse (and raises its mmap threshold after a
large block is freed, so later blocks of that size also stay in the heap). Between two stages in one
process — precompute-ref then train in a notebook or a benchmark — the first stage's freed model,
activations and tokenization stay resident (RSS) although nothing references them.
``malloc_trim(0)`` returns the free pages at the top of the heap and inside it (``madvise``) to the OS;
it frees nothing that is still in use, so it changes no result. Elsewhere than glibc it does nothing.
No garbage collection first: the stage's model and tensors are freed by reference counting when the stage
returns (vs_trl's workload: the same RSS after the trim with or without ``gc.collect()``), and a full
collection scans every object the imports made — 0.28–0.33 CPU s with transformers loaded, 8% of that
workload's precompute (benchmarks/where_time_goes.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

MMAP_THRESHOLD = 256 << 20  # blocks up to this size come from the heap (glibc's dynamic maximum: 32 MiB)
TRIM_THRESHOLD = 1 << 30  # free memory kept at the top of the heap before it is given back
SWITCH_ENV = "GVPO_OFFLINE_MALLOC"  # 'default': leave glibc's settings as they are
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_applied: bool | None = None  # None: not tried yet in this process


def user_settings() -> str | None:
    """What in the environment already sets glibc malloc (None: nothing)."""
    if os.environ.get(SWITCH_ENV) == "default":
        return f"{SWITCH_ENV}=default"
    for name in _USER_SETTINGS:
        if name in os.environ:
            return name
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


@functools.cache
def _glibc(name: str, argtypes: tuple, restype):
    """glibc's function ``name`` with its C signature, or None (musl, macOS, Windows: no such call)."""
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes, function.restype = list(argtypes), restype
    return function


def keep_freed_memory() -> bool:
    """Set :data:`MMAP_THRESHOLD` and :data:`TRIM_THRESHOLD` in glibc malloc, once per process; returns
    whether they are set (False: not glibc, or the environment sets malloc already: :func:`user_settings`)."""
    global _applied
    if _applied is None:
        _applied = False
        mallopt = _glibc("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
        if sys.platform.startswith("linux") and user_settings() is None and mallopt is not None:
            _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                         TRIM_THRESHOLD))
    return _applied


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has set glibc's thresholds in this process (so blocks up to
    :data:`MMAP_THRESHOLD` come from the heap and freed ones are reused)."""
    return bool(_applied)


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``).

    Call it where a stage has dropped its large objects (a model, a cache table). Returns whether the
    heap was trimmed (False where malloc_trim does not exist). Costs a few milliseconds.
    """
    trim = _glibc("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    if trim is None:
        return False
    trim(0)
    return True
