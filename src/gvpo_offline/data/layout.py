"""Layouts and column names: grouped (one row per prompt) or flat (one row per response).

Resolves the user's ColumnMap into one layout's column names, detects the layout from the columns a
source has, and defines the intermediate per-source Arrow tables (_RAW) that the row and table
readers both produce, and _RowError, the row-level problem their checks raise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from gvpo_offline.data.records import ColumnMap


class _RowError(Exception):
    """A problem with one row; the reader adds the file and line."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


@dataclass(frozen=True)
class _Names:
    """The column names of one layout after applying the user's ColumnMap."""

    layout: str
    prompt: str
    response: str
    reward: str
    group: str


def _names(layout: str, cols: ColumnMap) -> _Names:
    defaults = ("responses", "rewards", "id") if layout == "grouped" else ("response", "reward", "group_id")
    return _Names(
        layout,
        cols.prompt or "prompt",
        cols.response or defaults[0],
        cols.reward or defaults[1],
        cols.group or defaults[2],
    )


def _detect_layout(has: Callable[[str], bool], is_list: Callable[[str], bool], cols: ColumnMap) -> str:
    """grouped if the responses column is present (or, when mapped, holds lists), else flat."""
    grouped, flat = _names("grouped", cols), _names("flat", cols)
    if grouped.response == flat.response:  # --response-col given: look at what it holds
        if not has(grouped.response):
            raise _RowError(grouped.response, "missing column")
        return "grouped" if is_list(grouped.response) else "flat"
    if has(grouped.response) and has(flat.response):
        raise _RowError(
            None,
            f"both '{grouped.response}' and '{flat.response}' columns: pass --layout grouped or --layout flat",
        )
    if has(grouped.response):
        return "grouped"
    if has(flat.response):
        return "flat"
    raise _RowError(
        None,
        f"cannot detect the layout: no '{grouped.response}' column (grouped layout) and no "
        f"'{flat.response}' column (flat layout); map yours with --response-col",
    )


# Intermediate per-source tables. gid is null where the input has no id; _src/_pos locate each row.
_RAW = {
    "grouped": pa.schema(
        [
            ("gid", pa.string()),
            ("prompt", pa.string()),
            ("responses", pa.list_(pa.string())),
            ("rewards", pa.list_(pa.float64())),
            ("_src", pa.int32()),
            ("_pos", pa.int64()),
        ]
    ),
    "flat": pa.schema(
        [
            ("gid", pa.string()),
            ("prompt", pa.string()),
            ("response", pa.string()),
            ("reward", pa.float64()),
            ("_src", pa.int32()),
            ("_pos", pa.int64()),
        ]
    ),
}


@dataclass
class _Part:
    table: pa.Table  # _RAW[layout]
    layout: str
    n_rows: int


def _needed(names: _Names) -> tuple[str, ...]:
    return (names.prompt, names.response, names.reward, names.group)
