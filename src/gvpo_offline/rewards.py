"""User reward callables: ``--reward module:function`` with signature ``(prompt, response) -> float``.

``module`` is an importable module name or the path of a ``.py`` file (``sample_data/reward.py:score``).
``prompt`` is what the data holds: a string or a list of ``{"role", "content"}`` messages.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import numbers
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from gvpo_offline.errors import GvpoError

RewardFn = Callable[[object, str], float]


def load_reward_fn(spec: str, timeout: float | None = None) -> RewardFn:
    """Resolve ``module:function`` (or ``path/to/file.py:function``) to a callable. A module that fails to
    import (syntax error, an exception or sys.exit at import time) is one GvpoError. With ``timeout``
    (seconds, ``--reward-timeout``) every call that takes longer fails with :class:`RewardTimeout`."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise GvpoError(f"--reward {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise GvpoError(f"--reward {spec!r}: no such file {path}")
            mod_spec = importlib.util.spec_from_file_location(f"gvpo_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except GvpoError:
        raise
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the user's module failed: one line
        message = " ".join(str(err).split())
        raise GvpoError(f"--reward {spec!r}: cannot import {module_name!r}: {type(err).__name__}: {message}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise GvpoError(f"--reward {spec!r}: {module_name!r} has no callable {func_name!r}")
    if timeout is not None:
        if not 0 < timeout < math.inf:
            raise GvpoError(f"--reward-timeout must be a finite number of seconds > 0, got {timeout}")
        fn = _with_timeout(fn, timeout)
    return fn


class RewardTimeout(Exception):
    """A reward call ran past ``--reward-timeout``."""


def _with_timeout(fn: RewardFn, seconds: float) -> RewardFn:
    """``fn`` with a wall-clock limit per call (SIGALRM; only in the main thread, elsewhere unlimited)."""

    @functools.wraps(fn)
    def limited(*args, **kwargs):
        with _alarm(seconds):
            return fn(*args, **kwargs)

    return limited


@contextmanager
def _alarm(seconds: float):
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise RewardTimeout(f"took longer than {seconds:g} s (--reward-timeout)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def score(fn: RewardFn, prompt, response: str) -> float:
    """Call the reward and insist on a finite real number (not a string such as "1.5", not a bool)."""
    value = fn(prompt, response)
    item = value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value  # numpy/torch scalar
    if isinstance(item, bool) or not isinstance(item, numbers.Real):
        raise GvpoError(f"the reward function returned {value!r} ({type(value).__name__}), not a number")
    value = float(item)
    if not math.isfinite(value):
        raise GvpoError(f"the reward function returned {value}, not a finite number")
    return value


def score_responses(fn: RewardFn, prompt, responses: list[str], where: str) -> list[float]:
    """Rewards of ``responses`` to ``prompt``. Any failure of the user's function becomes one GvpoError
    that names ``where`` (e.g. "prompt id '7'") instead of a traceback."""
    rewards = []
    for response in responses:
        try:
            rewards.append(score(fn, prompt, response))
        except GvpoError as err:
            raise GvpoError(f"{where}: {err}") from None
        except (Exception, SystemExit) as err:  # noqa: BLE001 - the user's code failed (or exited): one line
            raise GvpoError(f"the reward function failed on {where}: {type(err).__name__}: {err}") from None
    return rewards
