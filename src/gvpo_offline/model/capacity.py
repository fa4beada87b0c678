"""How much RAM this process may still use: the lower of the kernel's ``MemAvailable`` and the room left
under its cgroup's memory limit (a container's or a batch job's), which MemAvailable does not see.

cgroup v2: every level from the process's cgroup up to the root that has a ``memory.max`` other than
``max``; room = ``memory.max`` − (``memory.current`` − ``inactive_file`` of ``memory.stat``), the working set
(page cache that can be dropped is not counted as used, as ``docker stats`` and the kubelet count it).
cgroup v1: ``memory.limit_in_bytes`` − (``memory.usage_in_bytes`` − ``total_inactive_file``)."""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED_V1 = 1 << 60  # v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX × page size)


def mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_room_bytes(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int | None:
    """Bytes left under this process's tightest cgroup memory limit (v2 or v1); None without a limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: walk up from the process's cgroup to the root
            level = root / path.lstrip("/")
            while True:
                limit = _read_int(level / "memory.max")
                if limit is not None:
                    used = (_read_int(level / "memory.current") or 0) - _stat(level / "memory.stat", "inactive_file")
                    rooms.append(limit - max(used, 0))
                if level == root or root not in level.parents:
                    break
                level = level.parent
        elif "memory" in controllers.split(","):
            level = root / "memory" / path.lstrip("/")
            if not (level / "memory.limit_in_bytes").exists():
                level = root / "memory"  # inside a container the hierarchy is mounted at its own cgroup
            limit = _read_int(level / "memory.limit_in_bytes")
            if limit is not None and limit < UNLIMITED_V1:
                used = (_read_int(level / "memory.usage_in_bytes") or 0) - _stat(level / "memory.stat",
                                                                                  "total_inactive_file")
                rooms.append(limit - max(used, 0))
    return max(0, min(rooms)) if rooms else None


def available_ram_bytes() -> int | None:
    """The RAM this process may still use: min(MemAvailable, cgroup room); None when neither is known."""
    known = [b for b in (mem_available_bytes(), cgroup_room_bytes()) if b is not None]
    return min(known) if known else None
