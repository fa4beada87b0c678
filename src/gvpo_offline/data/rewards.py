"""User reward callables: ``--reward module:function`` with signature ``(prompt, response, **fields) -> float``.

``module`` is an importable module name or the path of a ``.py`` file (``sample_data/reward.py:score``).
``prompt`` is what the data holds: a string or a list of ``{"role", "content"}`` messages.

A reward may also take the prompt row's other fields as keyword arguments, e.g.
``def correct(prompt, response, ground_truth): ...``: a JSONL prompts file with a ``ground_truth`` field
(as ``convert gsm8k`` writes) then passes it. A field is passed when the function names it or has
``**kwargs``; ``id`` and the data-layout columns (responses, rewards, ...) are not passed. A field named
like the parameter that receives the prompt or the response is refused up front
(:func:`check_reward_fields`), and so is a parameter without a default that some prompt row lacks
(:func:`check_reward_signature`), both before any model work. The reward gets copies: whatever it does
to the prompt or a field, what is written is what was read.

A reward that cannot score a row (its reference answer is missing) raises :class:`Unscorable`: ``sample``
skips that prompt and counts it, the generation eval stops naming it.

Shipped rewards: :func:`gsm8k_correct`.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from gvpo_offline.runtime.errors import GvpoError

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


NOT_REWARD_FIELDS = frozenset({"prompt", "id", "responses", "rewards", "response", "reward", "group_id"})


def reward_kwargs(fn: RewardFn, fields: dict | None) -> dict:
    """The fields of a prompt row that ``fn`` accepts as keyword arguments: those it names (beyond the
    first two positional parameters), or all of them when it has ``**kwargs``."""
    fields = {k: v for k, v in (fields or {}).items() if k not in NOT_REWARD_FIELDS}
    if not fields:
        return {}
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: (prompt, response) only
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return fields
    named = {p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in fields.items() if k in named}


class Unscorable(ValueError):
    """Raised by a reward for a row it cannot score (e.g. a null or number-less ground truth): never a 0."""


def reward_field_clash(fn: RewardFn, fields: dict | None) -> str | None:
    """The name of a row field that would reach ``fn`` as a keyword and that is also the name of the
    parameter receiving the prompt or the response (Python would fail with "multiple values"), or None."""
    passed = reward_kwargs(fn, fields)
    try:
        params = list(inspect.signature(fn).parameters.values())[:2]
    except (TypeError, ValueError):
        return None
    return next((p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name in passed), None)


def check_reward_fields(fn: RewardFn, rows) -> None:
    """GvpoError (one line) for the first of ``rows`` — (where, fields) pairs — whose fields collide with
    the reward's prompt/response parameter names: checked before any model is loaded."""
    for where, fields in rows:
        name = reward_field_clash(fn, fields)
        if name is not None:
            raise GvpoError(f"{where}: the field {name!r} would be passed to the reward function, whose parameter "
                            f"{name!r} already receives the {'prompt' if _position(fn, name) == 0 else 'response'}; "
                            "rename the field or the parameter")


def _position(fn: RewardFn, name: str) -> int:
    return [p.name for p in inspect.signature(fn).parameters.values()].index(name)
def check_reward_signature(fn: RewardFn, spec: str, rows: list[dict], where: str) -> None:
    """Before any model work: ``fn`` must take ``(prompt, response)`` positionally, and every further
    parameter without a default must be a field of every prompt row (``rows``: each row's other fields;
    ``where``: the prompts' source, for the message). One GvpoError naming the parameter, the first row
    without it and the fields the rows do have."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise GvpoError(f"--reward {spec}: it takes {inspect.signature(fn)}, but a reward is called as "
                        "fn(prompt, response, **row fields)")
    for p in params[2:]:
        if p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        lacking = next((i for i, row in enumerate(rows) if p.name not in row or p.name in NOT_REWARD_FIELDS), None)
        if p.kind is p.POSITIONAL_ONLY or lacking is not None:
            have = sorted(set().union(*rows) - NOT_REWARD_FIELDS) if rows else []
            raise GvpoError(f"--reward {spec}: its parameter {p.name!r} is not a field of prompt {(lacking or 0) + 1} "
                            f"of {where} (row fields there: {', '.join(have) or 'none'}); a reward gets "
                            "(prompt, response) and the row fields it names as keywords")


def score(fn: RewardFn, prompt, response: str, fields: dict | None = None) -> float:
    """Call the reward (with the row's ``fields`` it accepts, see :func:`reward_kwargs`) on copies of the
    prompt and the fields (a reward that appends to the message list changes nothing the caller writes);
    insist on a finite real number (not a string such as "1.5", not a bool)."""
    value = fn(copy.deepcopy(prompt), response, **copy.deepcopy(reward_kwargs(fn, fields)))
    item = value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value  # numpy/torch scalar
    if isinstance(item, bool) or not isinstance(item, numbers.Real):
        raise GvpoError(f"the reward function returned {value!r} ({type(value).__name__}), not a number")
    value = float(item)
    if not math.isfinite(value):
        raise GvpoError(f"the reward function returned {value}, not a finite number")
    return value


def score_responses(
    fn: RewardFn, prompt, responses: list[str], where: str, fields: dict | None = None
) -> list[float]:
    """Rewards of ``responses`` to ``prompt`` (``fields``: the prompt row's other fields). Any failure of
    the user's function becomes one GvpoError that names ``where`` (e.g. "prompt id '7'") instead of a
    traceback."""
    rewards = []
    for response in responses:
        try:
            rewards.append(score(fn, prompt, response, fields))
        except GvpoError as err:
            raise GvpoError(f"{where}: {err}") from None
        except Unscorable as err:
            raise Unscorable(f"{where}: {err}") from None
        except (Exception, SystemExit) as err:  # noqa: BLE001 - the user's code failed (or exited): one line
            raise GvpoError(f"the reward function failed on {where}: {type(err).__name__}: {err}") from None
    return rewards


# ---- shipped rewards -----------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_ANSWER_MARKERS = ("####", "A:", "answer is", "Answer:")


def final_number(text: str) -> float | None:
    """The final numeric answer of a GSM8K-style solution: the first number after the last answer marker
    (``#### 18``, ``A: 18``, ``the answer is 18``), else the last number in the text; ``$`` and thousands
    commas are ignored. None when there is no number."""
    tail = text
    for marker in _ANSWER_MARKERS:
        at = text.rfind(marker)
        if at >= 0 and _NUMBER.search(text, at + len(marker)):
            tail = text[at + len(marker):]
            found = _NUMBER.search(tail)
            return float(found.group().replace("$", "").replace(",", ""))
    numbers = _NUMBER.findall(tail)
    return float(numbers[-1].replace("$", "").replace(",", "")) if numbers else None


def gsm8k_correct(prompt, response: str, ground_truth: str) -> float:
    """1.0 when the response's final number equals the ground truth's (``#### 18`` or ``A: 18`` solutions,
    or a bare number), else 0.0. Use with ``--reward gvpo_offline.rewards:gsm8k_correct`` on prompts that
    carry a ``ground_truth`` field (``gvpo-offline convert gsm8k`` writes it). A ground truth that is
    null or holds no number raises :class:`Unscorable` (the row is skipped and counted, never scored 0)."""
    expected = final_number(ground_truth) if isinstance(ground_truth, str) else (
        float(ground_truth) if isinstance(ground_truth, (int, float)) and not isinstance(ground_truth, bool)
        and math.isfinite(ground_truth) else None)
    if expected is None:
        raise Unscorable(f"ground_truth {ground_truth!r} holds no number to compare with")
    answered = final_number(response)
    return float(expected is not None and answered is not None and math.isclose(answered, expected, abs_tol=1e-6))
