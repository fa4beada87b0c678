"""Hand freed heap memory back to the operating system between stages.

glibc's malloc keeps freed blocks in the process heap for reuse (and raises its mmap threshold after a
large block is freed, so later blocks of that size also stay in the heap). Between two stages in one
process — precompute-ref then train in a notebook or a benchmark — the first stage's freed model,
activations and tokenization stay resident (RSS) although nothing references them.
``malloc_trim(0)`` returns the free pages at the top of the heap and inside it (``madvise``) to the OS;
it frees nothing that is still in use, so it changes no result. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _libc_malloc_trim():
    """glibc's ``malloc_trim``, or None (musl, macOS, Windows: no such call)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Collect garbage cycles, then return the C heap's free pages to the OS (glibc ``malloc_trim(0)``).

    Call it where a stage has dropped its large objects (a model, a cache table). Returns whether the
    heap was trimmed (False where malloc_trim does not exist). Costs a few milliseconds.
    """
    gc.collect()
    trim = _libc_malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
