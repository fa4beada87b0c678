"""runtime/memory.py: release_freed_memory hands freed heap pages back to the OS (glibc); after
keep_freed_memory a freed 100 MiB block is reused without page faults, and the user's own malloc settings
(or GVPO_OFFLINE_MALLOC=default) leave glibc as it is."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gvpo_offline.runtime import memory

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process whose glibc never maps a block on its own (mmap threshold 1 GiB) and never trims the
# heap by itself (trim threshold 1 TiB): 200 MB of 1 MB blocks, freed, stay resident until the call.
CHILD = """
from gvpo_offline.runtime.memory import release_freed_memory

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

blocks = [bytearray(1 << 20) for _ in range(200)]
blocks = [b for i, b in enumerate(blocks) if i == 199]  # keep the top block: the heap cannot shrink at its end
before = rss_mb()
trimmed = release_freed_memory()
print(before, rss_mb(), trimmed)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="malloc_trim is glibc's")
def test_release_freed_memory_returns_freed_heap_pages():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
           "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_ARENA_MAX": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    before, after, trimmed = done.stdout.split()
    assert trimmed == "True"
    assert float(before) - float(after) > 150  # MB: the 199 freed blocks under the kept one


# a fresh process: apply (or not), then allocate, touch and free 100 MiB three times; print the page faults
PROBE = """
import resource
from gvpo_offline.runtime import memory
applied = memory.keep_freed_memory()
x = bytearray(100 << 20); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    x = bytearray(100 << 20); del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(**env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if k not in (*memory._USER_SETTINGS, memory.SWITCH_ENV)}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_blocks_are_reused_without_page_faults():
    applied, faults = probe()
    default_applied, default_faults = probe(**{memory.SWITCH_ENV: "default"})
    assert applied and not default_applied
    pages = 3 * (100 << 20) // 4096
    assert default_faults > pages // 2  # glibc's default: each 100 MiB block mapped and faulted afresh
    assert faults < pages // 50


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "65536"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                                 {memory.SWITCH_ENV: "default"}])
def test_the_users_malloc_settings_are_left_alone(env, monkeypatch):
    for name in (*memory._USER_SETTINGS, memory.SWITCH_ENV, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert memory.user_settings() is None
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert memory.user_settings() is not None  # then keep_freed_memory sets nothing (the probe above)
