"""Signals: Ctrl-C (SIGINT) and SIGTERM stop a command with exit code 130 / 143, never 0.

Both arrive in Python as KeyboardInterrupt (the CLI installs a SIGTERM handler that raises it), so every
stage's ``except KeyboardInterrupt`` cleanup runs for both; :func:`exit_code` tells them apart afterwards.
``train`` wants to stop at a step boundary instead (to save a checkpoint): inside :func:`deferred` the
first signal only sets a flag that the loop polls; a second one interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_received: int | None = None


class Interrupted(KeyboardInterrupt):
    """Raised by a stage that stopped cleanly on a signal (after saving what it could)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum, frame) -> None:
    global _received
    _received = signum
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def installed() -> Iterator[None]:
    """For the duration of a command: SIGINT and SIGTERM raise KeyboardInterrupt and are remembered."""
    global _received
    _received = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_code(exc: BaseException | None = None) -> int:
    """128 + the signal that stopped us: 130 for SIGINT (also a bare KeyboardInterrupt), 143 for SIGTERM."""
    signum = getattr(exc, "signum", None) or _received or signal.SIGINT
    return 128 + int(signum)


@contextmanager
def deferred() -> Iterator[Callable[[], int | None]]:
    """Yield ``requested() -> signal number or None``: the first SIGINT/SIGTERM only sets it (poll it at a
    safe point), a second one raises KeyboardInterrupt at once. Handlers are restored on exit."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum, frame):
        global _received
        _received = signum
        if pending:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        pending.append(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield lambda: pending[0] if pending else None
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
