"""Progress of the long loops (reference log-probs, training, eval, sampling, tokenizing), one helper.

On a terminal it is a live rich bar. When stderr is not a terminal (SLURM, nohup, CI, ``2> log``) a
bar would print nothing until the end, so a plain line is printed instead every ``GVPO_LOG_EVERY``
seconds (default 30; 0 = after every update) and once at the end:

    train: step 12/78 (15%)  loss 1.234  |g| 12.3  lr 2.00e-04  8,120 tok/s  elapsed 0:00:09  ETA 0:00:50

Usage::

    with progress(console, "train", total=78, unit="step", describe=fmt) as update:
        update(advance=1, loss=..., grad_norm=...)   # or update(completed=12, ...)

``describe(fields, elapsed_seconds)`` turns the latest fields into the text after the count (on the
bar and on the plain lines); it is not called before the first update, so no "loss nan" shows early.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console

LOG_EVERY_ENV = "GVPO_LOG_EVERY"
DEFAULT_LOG_EVERY_S = 30.0

Describe = Callable[[dict, float], str]


def log_every_seconds() -> float:
    """Seconds between plain progress lines: ``$GVPO_LOG_EVERY`` if it is a number >= 0, else 30."""
    try:
        value = float(os.environ.get(LOG_EVERY_ENV, DEFAULT_LOG_EVERY_S))
    except ValueError:
        return DEFAULT_LOG_EVERY_S
    return value if value >= 0 else DEFAULT_LOG_EVERY_S


def duration(seconds: float) -> str:
    """``3725.2`` -> ``"1:02:05"``."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plural(n: int, word: str) -> str:
    """``plural(1, "step")`` -> ``"1 step"``, ``plural(3, "step")`` -> ``"3 steps"``."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def say(console: Console, message: str) -> None:
    """One message on the console: not wrapped, no rich markup (paths may hold [])."""
    console.print(message, soft_wrap=True, highlight=False, markup=False)


class _PlainLines:
    """The non-terminal progress: a line every ``every_s`` seconds and one at the end."""

    def __init__(self, console: Console, label: str, total: int, completed: int, unit: str, describe, every_s):
        self.console, self.label, self.total, self.unit, self.describe = console, label, total, unit, describe
        self.every_s, self.completed, self.start_completed = every_s, completed, completed
        self.fields: dict = {}
        self.started = self.last_line = time.perf_counter()
        self.printed_at: int | None = None

    def update(self, advance: int = 0, completed: int | None = None, **fields) -> None:
        self.completed = completed if completed is not None else self.completed + advance
        self.fields.update(fields)
        now = time.perf_counter()
        if now - self.last_line >= self.every_s:
            self.line(now)

    def line(self, now: float) -> None:
        self.last_line, self.printed_at = now, self.completed
        elapsed = now - self.started
        pct = f" ({100 * self.completed / self.total:.0f}%)" if self.total else ""
        unit = f"{self.unit} " if self.unit else ""
        parts = [f"{self.label}: {unit}{self.completed:,}/{self.total:,}{pct}"]
        if self.fields and self.describe is not None:
            parts.append(self.describe(self.fields, elapsed))
        parts.append(f"elapsed {duration(elapsed)}")
        done = self.completed - self.start_completed
        if 0 < done and self.completed < self.total:
            parts.append(f"ETA {duration(elapsed / done * (self.total - self.completed))}")
        say(self.console, "  ".join(parts))

    def close(self) -> None:
        if self.printed_at != self.completed and self.completed > self.start_completed:
            self.line(time.perf_counter())


@contextmanager
def progress(
    console: Console | None,
    label: str,
    total: int,
    *,
    completed: int = 0,
    unit: str = "",
    describe: Describe | None = None,
    enabled: bool = True,
    transient: bool = False,
) -> Iterator[Callable[..., None]]:
    """Progress of a loop of ``total`` items; yields ``update(advance=0, completed=None, **fields)``.

    A rich bar when ``console`` (default: stderr) is a terminal, plain lines otherwise (module docstring);
    nothing when ``enabled`` is false. ``transient``: the bar disappears when done (terminal only).
    """
    console = console or Console(stderr=True)
    if not enabled:
        yield lambda advance=0, completed=None, **fields: None
        return
    if not console.is_terminal:
        lines = _PlainLines(console, label, total, completed, unit, describe, log_every_seconds())
        try:
            yield lines.update
        finally:
            lines.close()
        return

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    started = time.perf_counter()
    columns = (TextColumn(label), BarColumn(bar_width=24), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=transient) as bar:
        task = bar.add_task(label, total=total, completed=completed, info="")
        latest: dict = {}

        def update(advance: int = 0, completed: int | None = None, **fields) -> None:
            latest.update(fields)
            info = describe(latest, time.perf_counter() - started) if describe and latest else ""
            if completed is not None:
                bar.update(task, completed=completed, info=info)
            else:
                bar.update(task, advance=advance, info=info)

        yield update
