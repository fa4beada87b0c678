"""User reward callables: ``--reward module:function`` with signature ``(prompt, response) -> float``.

``module`` is an importable module name or the path of a ``.py`` file (``sample_data/reward.py:score``).
``prompt`` is what the data holds: a string or a list of ``{"role", "content"}`` messages.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

from gvpo_offline.errors import GvpoError

RewardFn = Callable[[object, str], float]


def load_reward_fn(spec: str) -> RewardFn:
    """Resolve ``module:function`` (or ``path/to/file.py:function``) to a callable."""
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
    except ImportError as err:
        raise GvpoError(f"--reward {spec!r}: cannot import {module_name!r}: {err}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise GvpoError(f"--reward {spec!r}: {module_name!r} has no callable {func_name!r}")
    return fn


def score(fn: RewardFn, prompt, response: str) -> float:
    """Call the reward and insist on a finite float."""
    value = fn(prompt, response)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise GvpoError(f"the reward function returned {value!r}, not a number") from None
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
        except Exception as err:  # noqa: BLE001 - the user's code failed: one line, and where
            raise GvpoError(f"the reward function failed on {where}: {type(err).__name__}: {err}") from None
    return rewards
