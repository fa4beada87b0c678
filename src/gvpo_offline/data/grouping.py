"""Grouping and ids: flat rows into groups, and one unique id per group.

Groups flat rows by their group id or, without one, by identical prompt (vectorised, first-seen
order); fills missing ids from the prompt's content hash and rejects duplicate ids, naming the file
and line or row of both occurrences.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gvpo_offline.data.layout import _RAW, _Names
from gvpo_offline.data.sources import _JSON_KINDS, _Source


def _group_flat(table: pa.Table, sources: list[_Source], names: _Names) -> pa.Table:
    """Flat rows -> _RAW["grouped"] rows: by group_id where given, else by identical prompt.

    Groups come in first-seen order (rows with ids first), their responses in row order.
    """
    has_id = pc.is_valid(table["gid"])
    n_with_id = pc.sum(has_id).as_py() or 0
    parts = []
    if n_with_id:
        rows = table if n_with_id == table.num_rows else table.filter(has_id)
        parts.append(_group_by_key(rows, "gid", sources, names))
    if n_with_id < table.num_rows:
        rows = table if n_with_id == 0 else table.filter(pc.invert(has_id))
        parts.append(_group_by_key(rows, "prompt", sources, names))
    return pa.concat_tables(parts)


def _group_by_key(rows: pa.Table, key: str, sources: list[_Source], names: _Names) -> pa.Table:
    """One row per distinct value of column ``key`` (first-seen order) with the lists of its responses and rewards.

    Sorts row numbers with numpy and slices (no Python object per row); rows already stored group
    after group are not even reordered. Rows of one group id must share one prompt.
    """
    codes = pc.index_in(rows[key], pc.unique(rows[key])).to_numpy()  # group number per row, first-seen order
    counts = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(counts)])
    ordered = rows
    if np.any(codes[1:] < codes[:-1]):
        order = np.argsort(codes, kind="stable")
        ordered, codes = rows.take(pa.array(order)), codes[order]
    first = ordered.select(["gid", "prompt", "_src", "_pos"]).take(pa.array(starts[:-1]))
    if key == "gid":
        prompts = pc.index_in(ordered["prompt"], pc.unique(ordered["prompt"])).to_numpy()
        bad = np.flatnonzero(prompts != np.repeat(prompts[starts[:-1]], counts))
        if len(bad):
            here, there = ordered.slice(bad[0], 1), first.slice(codes[bad[0]], 1)
            raise sources[here["_src"][0].as_py()].error(
                here["_pos"][0].as_py(),
                f"group {here['gid'][0].as_py()!r} has a different prompt than its first row "
                f"({_where(sources, there)})",
                names.group,
            )
    offsets = pa.array(starts, pa.int32())
    return pa.table(
        [
            first["gid"],
            first["prompt"],
            pa.ListArray.from_arrays(offsets, ordered["response"].combine_chunks()),
            pa.ListArray.from_arrays(offsets, ordered["reward"].combine_chunks()),
            first["_src"],
            first["_pos"],
        ],
        schema=_RAW["grouped"],
    )


def _where(sources: list[_Source], row: pa.Table) -> str:
    """'file: line N' (or 'row N') of a one-row _RAW table."""
    src = sources[row["_src"][0].as_py()]
    unit = "line" if src.kind in _JSON_KINDS else "row"
    return f"{src.path}: {unit} {row['_pos'][0].as_py()}"


def content_group_id(prompt_json: str) -> str:
    """The group id derived from a prompt: the first 16 hex digits of sha1(prompt JSON, UTF-8)."""
    return hashlib.sha1(prompt_json.encode("utf-8")).hexdigest()[:16]


def _assign_group_ids(table: pa.Table, sources: list[_Source], names: _Names) -> pa.Table:
    """Fill missing ids from content (suffix -1, -2, ... on repeated prompts) and reject duplicates."""
    gid = table["gid"]
    missing = pc.is_null(gid)
    if pc.any(missing).as_py():
        seen: Counter[str] = Counter()
        ids = gid.to_pylist()
        for i, prompt in enumerate(table["prompt"].to_pylist()):  # one string per group
            if ids[i] is None:
                base = content_group_id(prompt)
                ids[i] = base if seen[base] == 0 else f"{base}-{seen[base]}"
                seen[base] += 1
        gid = pa.chunked_array([pa.array(ids, pa.string())])
        table = table.set_column(0, "gid", gid)
    if pc.count_distinct(gid).as_py() != table.num_rows:  # rare: find the first repeat in Python
        first: dict[str, int] = {}
        for i, value in enumerate(gid.to_pylist()):
            if value in first:
                here = table.slice(i, 1)
                raise sources[here["_src"][0].as_py()].error(
                    here["_pos"][0].as_py(),
                    f"duplicate group id {value!r} (first at {_where(sources, table.slice(first[value], 1))})",
                    names.group,
                )
            first[value] = i
    return table
