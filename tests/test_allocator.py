"""runtime/allocator.py: after keep_freed_memory, a freed 100 MiB block is reused without page faults;
the user's own malloc settings and GVPO_OFFLINE_MALLOC=default leave glibc as it is."""

import os
import subprocess
import sys

import pytest

from gvpo_offline.runtime import allocator

# a fresh process: apply (or not), then allocate, touch and free 100 MiB three times; print the page faults
PROBE = """
import resource
from gvpo_offline.runtime import allocator
applied = allocator.keep_freed_memory()
x = bytearray(100 << 20); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    x = bytearray(100 << 20); del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(**env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if k not in (*allocator._USER_SETTINGS, allocator.SWITCH_ENV)}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_blocks_are_reused_without_page_faults():
    applied, faults = probe()
    default_applied, default_faults = probe(**{allocator.SWITCH_ENV: "default"})
    assert applied and not default_applied
    pages = 3 * (100 << 20) // 4096
    assert default_faults > pages // 2  # glibc's default: each 100 MiB block mapped and faulted afresh
    assert faults < pages // 50


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "65536"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                                 {allocator.SWITCH_ENV: "default"}])
def test_the_users_malloc_settings_are_left_alone(env, monkeypatch):
    for name in (*allocator._USER_SETTINGS, allocator.SWITCH_ENV, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert allocator.user_settings() is None
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert allocator.user_settings() is not None  # then keep_freed_memory sets nothing (the probe above)
