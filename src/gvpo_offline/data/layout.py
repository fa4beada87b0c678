"""Layouts and column names: grouped (one row per prompt) or flat (one row per response).

Resolves the user's ColumnMap into one layout's column names, detects the layout from the columns a
source has, and defines the intermediate per-source Arrow tables (_RAW) that the row and table
readers both produce, and _RowError, the row-level problem their checks raise.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
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


# The option that maps each field of a row to a column of the user's file.
COLUMN_FLAGS = {"prompt": "--prompt-col", "response": "--response-col", "reward": "--reward-col", "group": "--group-col"}


def missing_columns_message(present: Sequence[str], missing: Sequence[tuple[str, tuple[str, ...]]],
                            layout: str | None) -> str:
    """One message for every missing column: each one's flag, a did-you-mean among ``present``, and the
    columns the file has. ``missing``: (field, its possible column names) pairs (two names, grouped and
    flat, when the layout is undetected: ``layout`` None)."""
    parts = []
    for role, names in missing:
        close = [c for name in names for c in difflib.get_close_matches(name, list(present), n=1, cutoff=0.6)]
        hint = f"; did you mean '{close[0]}'?" if close else ""
        quoted = " or ".join(f"'{n}'" for n in dict.fromkeys(names))
        parts.append(f"{quoted} ({COLUMN_FLAGS[role]} maps the {role}{hint})")
    what = f"{layout} layout: " if layout else "cannot detect the layout (grouped: a list of responses per row; flat: one response per row): "
    noun = "column" if len(parts) == 1 else "columns"
    return (f"{what}missing {noun} {', '.join(parts)}; this file's columns: "
            f"{', '.join(present) if present else '(none)'}")


def _missing(present: Sequence[str], names: Sequence[_Names], cols: ColumnMap) -> list[tuple[str, tuple[str, ...]]]:
    """(field, its column names under ``names``) for each field none of whose names is in ``present``:
    prompt, response and reward, and the group when the user named its column (ids are optional)."""
    return [(role, tuple(getattr(n, role) for n in names)) for role in ("prompt", "response", "reward", "group")
            if not any(getattr(n, role) in present for n in names) and (role != "group" or cols.group is not None)]


def check_columns(present: Sequence[str], names: _Names, cols: ColumnMap) -> None:
    """Raise _RowError naming every missing column at once: the prompt, response and reward columns, and
    the group column when the user named it (--group-col)."""
    other = _names("flat" if names.layout == "grouped" else "grouped", cols)
    if names.response not in present and other.response != names.response and other.response in present:
        raise _RowError(names.response, f"missing field; this row has '{other.response}' instead: a "
                                        f"{other.layout}-layout row in a {names.layout}-layout file")
    if missing := _missing(present, [names], cols):
        raise _RowError(None, missing_columns_message(present, missing, names.layout))


def _detect_layout(has: Callable[[str], bool], is_list: Callable[[str], bool], cols: ColumnMap,
                   present: Sequence[str] = ()) -> str:
    """grouped if the responses column is present (or, when mapped, holds lists), else flat.
    ``present``: the source's columns, for the error message when the response column is missing."""
    grouped, flat = _names("grouped", cols), _names("flat", cols)
    if grouped.response == flat.response:  # --response-col given: look at what it holds
        if not has(grouped.response):
            raise _RowError(None, missing_columns_message(present, _missing(present, [grouped, flat], cols), None))
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
    raise _RowError(None, missing_columns_message(present, _missing(present, [grouped, flat], cols), None))


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
