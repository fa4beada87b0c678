"""Living under a launcher (``torchrun``, ``accelerate launch``): a rank never outlives its launcher, and a
lost peer is one line, not a traceback per rank.

* :func:`watch_parent`: when the launcher that started this rank dies (``kill -9`` of torchrun: its ranks run
  in sessions of their own and get no signal), the rank dies with it at once, writing nothing more. On Linux
  the kernel does it: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (through ctypes) kills the rank the moment its
  parent exits, even in the middle of a checkpoint write (which stays a temp folder that the next run
  removes). Elsewhere, or if prctl fails, a daemon thread polls ``os.getppid()`` every :data:`POLL_S` s and
  leaves with ``os._exit(1)`` (no atexit handler, no ``finally``, no other thread runs again), rank 0 with
  one line first; bound: ~:data:`POLL_S` s. (The kernel sends PDEATHSIG when the parent *thread* that
  forked us exits: torchrun and ``accelerate launch`` start their ranks from their main thread.)
* :func:`lost_peer_message`: the one line for a collective that failed because another rank is gone
  (gloo: "Connection closed by peer", "Connection reset", a send/recv timeout; NCCL: a watchdog timeout or
  a remote error), or None for any other error.
* :func:`single_process_note`: ``accelerate launch --cpu --num_processes N`` starts ONE process without a
  process group (accelerate's CPU launcher is not multi-process unless ``--multi_cpu`` with MPI): say so.
"""

from __future__ import annotations

import os
import sys
import threading

POLL_S = 0.5
PARENT_DIED_EXIT = 1

_watching = False


def watch_parent(rank: int, poll_s: float = POLL_S) -> None:
    """From now on this process ends when its parent (the launcher) dies: by the kernel's SIGKILL on Linux,
    else by a polling thread (rank 0 prints one line on stderr first; the other ranks leave silently)."""
    global _watching
    if _watching:
        return
    _watching = True
    parent = os.getppid()
    if parent != 1 and _kill_me_with_my_parent():
        return

    def watch() -> None:
        import time

        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                if rank == 0:
                    _write(f"error: the launcher that started this job (pid {parent}) is gone; every rank stops "
                           "now, without writing anything more\n")
                os._exit(PARENT_DIED_EXIT)

    threading.Thread(target=watch, name="gvpo-parent-watchdog", daemon=True).start()


def _kill_me_with_my_parent() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent exits. True when it is set up."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _write(text: str) -> None:
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (OSError, ValueError):
        pass


# what gloo, NCCL and the TCPStore say when a peer is gone (never a generic network phrase: a hub download's
# "Connection refused" is not a lost rank)
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "ProcessGroupNCCL",
              "NCCL communicator was aborted", "Watchdog caught collective operation timeout", "remote process exited",
              "Socket Timeout")


def is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective's failure because a peer rank died or stopped answering."""
    return any(marker in str(error) for marker in _LOST_PEER)


def lost_peer_message(error: BaseException, rank: int, world_size: int) -> str | None:
    """The one line for ``error`` when it is a collective's failure because a peer rank died or hangs,
    naming what torchrun will add; None when it is something else."""
    if not is_lost_peer(error):
        return None
    return (f"rank {rank}: lost contact with another of the job's {world_size} processes (it exited, was killed, "
            "or its node is gone); every rank stops, without writing anything more. torchrun names the rank that "
            "failed first in its own report below")


def single_process_note(environ=os.environ) -> str | None:
    """A note when ``accelerate launch`` started this command as ONE process although several were asked for.

    accelerate's simple (non-distributed) launcher, which ``--cpu --num_processes N`` uses without
    ``--multi_cpu``, starts a single process: it exports ACCELERATE_USE_CPU, and with N > 1 also MASTER_ADDR /
    MASTER_PORT (and CCL_WORKER_COUNT), but no WORLD_SIZE or RANK. That combination is what we detect."""
    if "WORLD_SIZE" in environ or "RANK" in environ or "ACCELERATE_USE_CPU" not in environ:
        return None
    if "MASTER_ADDR" not in environ and "CCL_WORKER_COUNT" not in environ:
        return None
    return ("note: accelerate launch asked for several processes but started one (no WORLD_SIZE): its --cpu "
            "--num_processes N runs a single process; for N CPU processes use torchrun --nproc_per_node N. "
            "Running in one process")
