"""Read, validate and group the user's data: files in, one canonical grouped Arrow table out.

CONTRACT (other stages rely on it):
    load_groups(DataConfig) -> GroupedData
    GroupedData.table columns:
        group_id: string        unique per group across the whole dataset, deterministic
        prompt:   string        JSON encoding of the prompt: a JSON string, or a list of {"role","content"}
        responses: list<string> k >= 2 non-empty strings
        rewards:  list<float64> k finite floats, same length as responses
    Groups with k = 1 are dropped (and counted); an empty result is a DataError.
    GroupedData.iter_groups() yields Group records lazily (no Python object per row held at once).

Inputs: .jsonl, .jsonl.gz, .json (an array of rows, or one row per line), .parquet, a folder or glob
of these, or a ``datasets.Dataset.save_to_disk`` folder. Two layouts, detected from the columns:
    grouped: one row per prompt:   prompt, responses (list), rewards (list of numbers), optional id
    flat:    one row per response: prompt, response, reward, optional group_id
             (rows without a group id are grouped by identical prompt)
JSON rows are parsed one by one (errors name the 1-based line); Parquet/Arrow tables are validated
with vectorised pyarrow compute (errors name the 0-based row), without a Python object per row.

group_id: the id/group_id value as a string when given, else the first 16 hex digits of the sha1 of
the prompt JSON, with "-1", "-2", ... appended to later grouped rows that repeat a prompt.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gvpo_offline.files import sha256_file
from gvpo_offline.errors import DataError, GvpoError

Message = dict[str, str]

LAYOUTS = ("auto", "grouped", "flat")
SUPPORTED = ".jsonl, .jsonl.gz, .json, .parquet or a datasets.save_to_disk folder"

TABLE_SCHEMA = pa.schema(
    [
        ("group_id", pa.string()),
        ("prompt", pa.string()),
        ("responses", pa.list_(pa.string())),
        ("rewards", pa.list_(pa.float64())),
    ]
)


@dataclass(frozen=True)
class ColumnMap:
    """User column names; None = the layout's default (grouped: prompt/responses/rewards/id,
    flat: prompt/response/reward/group_id)."""

    prompt: str | None = None
    response: str | None = None
    reward: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class DataConfig:
    paths: tuple[str, ...]
    layout: str = "auto"  # auto | grouped | flat
    columns: ColumnMap = field(default_factory=ColumnMap)


@dataclass(frozen=True)
class Group:
    """One prompt with its k >= 2 scored responses."""

    group_id: str
    prompt: str | list[Message]
    responses: list[str]
    rewards: list[float]


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    sha256: str


@dataclass
class DataStats:
    """Counts over the loaded data. Everything but n_rows and dropped_k1_groups is about the kept groups.

    n_rows: input rows read (a group in the grouped layout, a response in the flat layout).
    k_hist: k (responses per group) -> number of groups.
    duplicate_responses: responses identical to an earlier one of the same group (kept).
    reward_*: over all kept responses; mean_group_reward_std (population std) and
    mean_group_reward_spread (max - min) are averaged over groups.
    """

    n_rows: int = 0
    n_groups: int = 0
    n_responses: int = 0
    k_hist: dict[int, int] = field(default_factory=dict)
    dropped_k1_groups: int = 0
    groups_with_duplicates: int = 0
    duplicate_responses: int = 0
    all_equal_reward_groups: int = 0
    reward_mean: float = 0.0
    reward_std: float = 0.0
    reward_min: float = 0.0
    reward_max: float = 0.0
    mean_group_reward_std: float = 0.0
    mean_group_reward_spread: float = 0.0


@dataclass
class GroupedData:
    table: pa.Table
    files: list[FileInfo]
    layout: str
    stats: DataStats

    def iter_groups(self, batch_size: int = 1024) -> Iterator[Group]:
        for batch in self.table.to_batches(max_chunksize=batch_size):
            cols = batch.to_pydict()
            for gid, prompt, responses, rewards in zip(
                cols["group_id"], cols["prompt"], cols["responses"], cols["rewards"]
            ):
                yield Group(gid, json.loads(prompt), responses, rewards)


def load_groups(config: DataConfig) -> GroupedData:
    """Read every input, validate it, group it and return the canonical table (see CONTRACT)."""
    if config.layout not in LAYOUTS:
        raise GvpoError(f"unknown layout {config.layout!r}: expected one of {', '.join(LAYOUTS)}")
    sources = _resolve(config.paths)
    files = [fingerprint(path) for src in sources for path in src.files]
    parts: list[_Part] = []
    for index, src in enumerate(sources):
        part = _read_source(src, index, config)
        if parts and part.layout != parts[0].layout:
            raise DataError(
                src.path,
                f"this file is in the {part.layout} layout but {sources[0].path} is in the "
                f"{parts[0].layout} layout; all inputs must share one layout",
            )
        parts.append(part)
    layout = parts[0].layout
    table = pa.concat_tables([p.table for p in parts])
    names = _names(layout, config.columns)
    if layout == "flat":
        table = _group_flat(table, sources, names)
    table = _assign_group_ids(table, sources, names)

    k = pc.list_value_length(table["responses"])
    keep = pc.greater_equal(k, 2)
    n_kept = pc.sum(keep).as_py() or 0
    dropped = table.num_rows - n_kept
    if n_kept == 0:
        raise DataError(
            ", ".join(str(p) for p in config.paths),
            f"no usable groups: all {table.num_rows} groups have a single response (k = 1); "
            "GVPO needs k >= 2 scored responses per prompt",
        )
    if dropped:
        table = table.filter(keep)
    out = pa.table(
        [table["gid"], table["prompt"], table["responses"], table["rewards"]], names=TABLE_SCHEMA.names
    ).cast(TABLE_SCHEMA)
    stats = compute_stats(out)
    stats.n_rows = sum(p.n_rows for p in parts)
    stats.dropped_k1_groups = dropped
    return GroupedData(out, files, layout, stats)


def fingerprint(path: str | Path) -> FileInfo:
    """Size (bytes) and sha256 of a file's content."""
    return FileInfo(str(path), os.path.getsize(path), sha256_file(path))


def input_files(paths: tuple[str, ...]) -> list[FileInfo]:
    """The files that :func:`load_groups` reads for ``paths`` (files, folders, globs, save_to_disk
    folders), in order, fingerprinted. Cheap next to parsing: used to decide cache hits."""
    return [fingerprint(path) for src in _resolve(tuple(paths)) for path in src.files] if paths else []


def compute_stats(table: pa.Table) -> DataStats:
    """DataStats of a canonical table (TABLE_SCHEMA), vectorised: no Python object per response."""
    k = pc.list_value_length(table["responses"])
    counts = pc.value_counts(k)
    k_hist = dict(sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
    parents = pc.list_parent_indices(table["rewards"])
    rewards = pc.list_flatten(table["rewards"])
    per_group = (
        pa.table({"g": parents, "r": rewards})
        .group_by("g")
        .aggregate([("r", "min"), ("r", "max"), ("r", "stddev", pc.VarianceOptions(ddof=0))])
    )
    spread = pc.subtract(per_group["r_max"], per_group["r_min"])
    pairs = (
        pa.table({"g": parents, "s": pc.list_flatten(table["responses"])})
        .group_by(["g", "s"])
        .aggregate([("s", "count")])
    )
    repeated = pairs.filter(pc.greater(pairs["s_count"], 1))
    return DataStats(
        n_rows=table.num_rows,
        n_groups=table.num_rows,
        n_responses=len(rewards),
        k_hist=k_hist,
        groups_with_duplicates=len(pc.unique(repeated["g"])),
        duplicate_responses=len(rewards) - pairs.num_rows,
        all_equal_reward_groups=pc.sum(pc.equal(spread, 0.0)).as_py() or 0,
        reward_mean=pc.mean(rewards).as_py(),
        reward_std=pc.stddev(rewards, ddof=0).as_py(),
        reward_min=pc.min(rewards).as_py(),
        reward_max=pc.max(rewards).as_py(),
        mean_group_reward_std=pc.mean(per_group["r_stddev"]).as_py(),
        mean_group_reward_spread=pc.mean(spread).as_py(),
    )


# ---- inputs ----------------------------------------------------------------------------------------

_JSON_KINDS = ("jsonl", "jsonl.gz", "json")


@dataclass(frozen=True)
class _Source:
    """One input: a data file, or a save_to_disk folder (``files`` = its Arrow files, fingerprinted)."""

    path: str
    kind: str  # jsonl | jsonl.gz | json | parquet | arrow
    files: tuple[str, ...]

    def error(self, pos: int | None, message: str, field: str | None = None) -> DataError:
        """DataError at ``pos``: a 1-based line for JSON files, a 0-based row for tables."""
        if self.kind in _JSON_KINDS:
            return DataError(self.path, message, line=pos, field=field)
        return DataError(self.path, message, row=pos, field=field)


def _file_kind(path: str) -> str | None:
    name = path.lower()
    for kind in ("jsonl.gz", "jsonl", "json", "parquet"):
        if name.endswith("." + kind):
            return kind
    return None


def _is_saved_dataset(folder: str) -> bool:
    """A datasets.save_to_disk folder: state.json, or dataset_info.json next to .arrow files."""
    if os.path.isfile(os.path.join(folder, "state.json")):
        return True
    return os.path.isfile(os.path.join(folder, "dataset_info.json")) and bool(
        glob.glob(os.path.join(glob.escape(folder), "*.arrow"))
    )


def _dataset_source(folder: str) -> _Source:
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        raise DataError(folder, "this is a datasets DatasetDict folder: pass one split's folder (e.g. .../train)")
    arrows = tuple(sorted(glob.glob(os.path.join(glob.escape(folder), "*.arrow"))))
    if not arrows:
        raise DataError(folder, "a datasets.save_to_disk folder without .arrow files")
    return _Source(folder, "arrow", arrows)


def _folder_sources(folder: str) -> list[_Source]:
    """A save_to_disk folder, or every supported file below ``folder`` (sorted, hidden files skipped)."""
    if _is_saved_dataset(folder) or os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        return [_dataset_source(folder)]
    found: list[_Source] = []
    for root, dirs, names in os.walk(folder):
        # hidden folders and gvpo-offline workdirs (their manifest and shards are never data) are skipped
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not os.path.isfile(os.path.join(root, d, ".gvpo-offline"))
        )
        for name in sorted(names):
            path = os.path.join(root, name)
            kind = _file_kind(name)
            if kind and not name.startswith("."):
                found.append(_Source(path, kind, (path,)))
        for d in list(dirs):
            sub = os.path.join(root, d)
            if _is_saved_dataset(sub):
                found.append(_dataset_source(sub))
                dirs.remove(d)
    found.sort(key=lambda s: s.path)
    if not found:
        raise DataError(folder, f"empty folder: no data files ({SUPPORTED})")
    return found


def _resolve(paths: tuple[str, ...]) -> list[_Source]:
    """Expand files, folders and globs into sources, in the given order (folder/glob matches sorted)."""
    if not paths:
        raise GvpoError("no data given: pass at least one file, folder or glob")
    sources: list[_Source] = []
    for raw in paths:
        path = str(raw)
        if any(c in path for c in "*?[") and not os.path.exists(path):
            matches = sorted(glob.glob(path, recursive=True))
            found = [
                s
                for m in matches
                for s in (_folder_sources(m) if os.path.isdir(m) else [_Source(m, _file_kind(m) or "", (m,))])
                if s.kind
            ]
            if not found:
                raise DataError(path, f"the pattern matches no data files ({SUPPORTED})")
            sources.extend(found)
        elif os.path.isdir(path):
            sources.extend(_folder_sources(path))
        elif os.path.isfile(path):
            kind = _file_kind(path)
            if kind is None:
                raise DataError(path, f"unsupported file type: expected {SUPPORTED}")
            sources.append(_Source(path, kind, (path,)))
        else:
            raise DataError(path, "no such file or directory")
    return sources


# ---- layouts and column names ----------------------------------------------------------------------


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


def _read_source(src: _Source, index: int, config: DataConfig) -> _Part:
    if src.kind in _JSON_KINDS:
        return _read_json_source(src, index, config)
    if src.kind == "parquet":
        try:
            schema = pq.read_schema(src.path, memory_map=True)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(src.path, f"not a Parquet file ({str(exc).splitlines()[0]})") from None
        layout, names = _table_layout(schema, src, config)
        # Flat files repeat each prompt k times: read it as a dictionary (one string per prompt).
        as_dict = [names.prompt] if layout == "flat" and _is_str(schema.field(names.prompt).type) else []
        table = _read_parquet(src, [c for c in _needed(names) if c in schema.names], as_dict)
    else:
        table = _read_saved_dataset(src)
        layout, names = _table_layout(table.schema, src, config)
    if table.num_rows == 0:
        raise src.error(None, "empty file: no rows")
    return _Part(_normalise_table(table, layout, names, src, index), layout, table.num_rows)


def _needed(names: _Names) -> tuple[str, ...]:
    return (names.prompt, names.response, names.reward, names.group)


def _table_layout(schema: pa.Schema, src: _Source, config: DataConfig) -> tuple[str, _Names]:
    """The layout of a table (forced or detected) and its column names; DataError if one is missing."""
    layout = config.layout
    if layout == "auto":
        is_list = lambda c: _is_list(schema.field(c).type)  # noqa: E731
        try:
            layout = _detect_layout(schema.names.__contains__, is_list, config.columns)
        except _RowError as err:
            raise DataError(src.path, err.message, field=err.field) from None
    names = _names(layout, config.columns)
    for name in _needed(names)[:3]:
        if name not in schema.names:
            raise DataError(src.path, f"missing column (columns: {', '.join(schema.names)})", field=name)
    return layout, names


# ---- JSON rows (Python, one row at a time, exact line numbers) -------------------------------------


class _RowError(Exception):
    """A problem with one row; the reader adds the file and line."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


_WS = re.compile(r"[ \t\n\r]*")


def _parse_line(path: str, raw: bytes | str, line: int) -> Any:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                path, f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", line=line
            ) from None
    if line == 1:
        raw = raw.lstrip("\ufeff")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"malformed JSON: {exc.msg} (column {exc.colno})", line=line) from None


def _json_lines(src: _Source) -> Iterator[tuple[int, Any]]:
    opener = gzip.open if src.kind == "jsonl.gz" else open
    line = 0
    with opener(src.path, "rb") as fh:
        while True:
            try:
                raw = fh.readline()
            except (EOFError, OSError, zlib.error) as exc:
                what = "truncated or corrupt gzip file" if src.kind == "jsonl.gz" else "cannot read the file"
                raise DataError(src.path, f"{what} after {line} lines ({exc})") from None
            if not raw:
                return
            line += 1
            if raw.strip():
                yield line, _parse_line(src.path, raw, line)


def _json_array(src: _Source) -> Iterator[tuple[int, Any]]:
    """Rows of a .json file: a JSON array of objects (or, leniently, one object per line)."""
    data = Path(src.path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(src.path, f"invalid UTF-8 (byte 0x{data[exc.start]:02x})", line=line) from None
    pos = _WS.match(text, 0).end()
    if pos == len(text):
        return
    if text[pos] == "{":  # JSON Lines in a .json file
        for line, raw in enumerate(text.split("\n"), 1):
            if raw.strip():
                yield line, _parse_line(src.path, raw, line)
        return
    if text[pos] != "[":
        raise DataError(src.path, "expected a JSON array of row objects", line=text.count("\n", 0, pos) + 1)
    decoder = json.JSONDecoder()
    line, counted = 1, 0
    pos = _WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(src.path, f"malformed JSON: {exc.msg} (column {exc.colno})", line=exc.lineno) from None
        yield line, obj
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            rest = _WS.match(text, pos + 1).end()
            if rest != len(text):
                raise DataError(src.path, "malformed JSON: extra data after the array", line=text.count("\n", 0, rest) + 1)
            return
        else:
            raise DataError(
                src.path, "malformed JSON: expected ',' or ']' after a row", line=text.count("\n", 0, pos) + 1
            )


def _describe(value: Any) -> str:
    """A short JSON-ish rendering of a bad value for error messages."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _prompt_json(value: Any, name: str) -> str:
    """A prompt (string or chat messages) -> its canonical JSON (messages keep only role and content)."""
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(name, "the prompt is empty")
        return encode_basestring(value)  # == json.dumps(value, ensure_ascii=False)
    if not isinstance(value, list) or not value:
        raise _RowError(
            name, f'expected a string or a non-empty list of {{"role", "content"}} messages, got {_describe(value)}'
        )
    messages = []
    for j, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise _RowError(f"{name}[{j}]", f'expected a message {{"role", "content"}}, got {_describe(msg)}')
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise _RowError(f"{name}[{j}].role", f"expected a non-empty string, got {_describe(role)}")
        if not isinstance(content, str):
            raise _RowError(f"{name}[{j}].content", f"expected a string, got {_describe(content)}")
        messages.append({"role": role, "content": content})
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


def _response(value: Any, name: str) -> str:
    """A response string, or the content of one {"role": "assistant", "content": ...} message."""
    if isinstance(value, dict):
        if value.get("role") != "assistant":
            raise _RowError(f"{name}.role", f"a response message must have role 'assistant', got {_describe(value.get('role'))}")
        value = value.get("content")
        name = f"{name}.content"
    if not isinstance(value, str):
        raise _RowError(name, f"expected a response string or an assistant message, got {_describe(value)}")
    if not value:
        raise _RowError(name, "empty response")
    return value


def _reward(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise _RowError(name, f"expected a number, got a boolean ({_describe(value)}); write 1 or 0 if you mean that")
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            raise _RowError(name, "expected a finite number, got an integer too large for a float64") from None
    if not isinstance(value, float):
        raise _RowError(name, f"expected a finite number, got {_describe(value)}")
    if not math.isfinite(value):
        hint = " (numbers beyond ±1.8e308, e.g. 1e400, overflow to infinity)" if math.isinf(value) else ""
        raise _RowError(name, f"expected a finite number, got {_describe(value)}{hint}")
    return value


def _group_id(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _RowError(name, f"expected a non-empty string or integer id, got {_describe(value)}")


def _get(row: dict, name: str, names: _Names, cols: ColumnMap) -> Any:
    if name in row:
        return row[name]
    other = _names("flat" if names.layout == "grouped" else "grouped", cols)
    if other.response != names.response and other.response in row:
        raise _RowError(
            name,
            f"missing field; this row has '{other.response}' instead: a {other.layout}-layout row "
            f"in a {names.layout}-layout file",
        )
    raise _RowError(name, "missing field")


def _grouped_row(row: dict, names: _Names, cols: ColumnMap) -> tuple:
    prompt = _prompt_json(_get(row, names.prompt, names, cols), names.prompt)
    responses = _get(row, names.response, names, cols)
    rewards = _get(row, names.reward, names, cols)
    if not isinstance(responses, list):
        raise _RowError(names.response, f"expected a list of responses (grouped layout), got {_describe(responses)}")
    if not responses:
        raise _RowError(names.response, "expected at least one response, got an empty list")
    if not isinstance(rewards, list):
        raise _RowError(names.reward, f"expected a list of rewards (grouped layout), got {_describe(rewards)}")
    if len(rewards) != len(responses):
        raise _RowError(
            names.reward, f"has {len(rewards)} values but '{names.response}' has {len(responses)}: they must match"
        )
    return (
        _group_id(row.get(names.group), names.group),
        prompt,
        [_response(v, f"{names.response}[{j}]") for j, v in enumerate(responses)],
        [_reward(v, f"{names.reward}[{j}]") for j, v in enumerate(rewards)],
    )


def _flat_row(row: dict, names: _Names, cols: ColumnMap) -> tuple:
    prompt = _prompt_json(_get(row, names.prompt, names, cols), names.prompt)
    response = _get(row, names.response, names, cols)
    if isinstance(response, list):
        raise _RowError(names.response, "expected one response (flat layout), got a list; is this the grouped layout?")
    return (
        _group_id(row.get(names.group), names.group),
        prompt,
        _response(response, names.response),
        _reward(_get(row, names.reward, names, cols), names.reward),
    )


class _RowBuffer:
    """Collects parsed rows and turns them into Arrow record batches every ``chunk_rows`` rows."""

    def __init__(self, layout: str, src: _Source, index: int, chunk_rows: int = 50_000):
        self.schema, self.src, self.index, self.chunk_rows = _RAW[layout], src, index, chunk_rows
        self.rows: list[tuple] = []
        self.batches: list[pa.RecordBatch] = []

    def add(self, line: int, values: tuple) -> None:
        self.rows.append((*values, self.index, line))
        if len(self.rows) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        columns = list(zip(*self.rows))
        try:
            arrays = [pa.array(c, type=f.type) for c, f in zip(columns, self.schema)]
        except (UnicodeEncodeError, pa.ArrowInvalid):
            raise self._unencodable() from None
        self.batches.append(pa.record_batch(arrays, schema=self.schema))
        self.rows = []

    def _unencodable(self) -> DataError:
        """A string Arrow cannot store (a lone surrogate from a \\ud800-style JSON escape): find its line."""
        for row in self.rows:
            for value in row[:4]:
                for text in value if isinstance(value, list) else [value]:
                    if isinstance(text, str):
                        try:
                            text.encode("utf-8")
                        except UnicodeEncodeError:
                            return self.src.error(row[-1], "invalid Unicode: a lone surrogate escape (\\ud800-\\udfff)")
        return self.src.error(None, "cannot convert the rows to Arrow")

    def table(self) -> pa.Table:
        self.flush()
        return pa.Table.from_batches(self.batches, schema=self.schema)


def _read_json_source(src: _Source, index: int, config: DataConfig) -> _Part:
    rows = _json_array(src) if src.kind == "json" else _json_lines(src)
    layout = None if config.layout == "auto" else config.layout
    buffer: _RowBuffer | None = None
    n_rows = 0
    for line, row in rows:
        n_rows += 1
        try:
            if not isinstance(row, dict):
                raise _RowError(None, f"expected a JSON object (one row), got {_describe(row)}")
            if buffer is None:  # the first row decides the layout (unless forced)
                if layout is None:
                    layout = _detect_layout(row.__contains__, lambda c: isinstance(row[c], list), config.columns)
                buffer = _RowBuffer(layout, src, index)
                parse = _grouped_row if layout == "grouped" else _flat_row
                names = _names(layout, config.columns)
            buffer.add(line, parse(row, names, config.columns))
        except _RowError as err:
            raise DataError(src.path, err.message, line=line, field=err.field) from None
    if buffer is None:
        raise DataError(src.path, "empty file: no rows")
    return _Part(buffer.table(), layout, n_rows)


# ---- Arrow tables (Parquet, save_to_disk): vectorised validation -----------------------------------


def _read_parquet(src: _Source, columns: list[str], as_dictionary: list[str]) -> pa.Table:
    try:
        return pq.read_table(src.path, columns=columns, memory_map=True, read_dictionary=as_dictionary)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(src.path, f"not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def _read_saved_dataset(src: _Source) -> pa.Table:
    import datasets  # slow to import: only when needed

    try:
        ds = datasets.load_from_disk(src.path)
    except Exception as exc:  # noqa: BLE001 - any failure is a bad folder
        raise DataError(src.path, f"cannot load this datasets.save_to_disk folder ({exc})") from None
    if not isinstance(ds, datasets.Dataset):
        raise DataError(src.path, "this is a datasets DatasetDict folder: pass one split's folder")
    return ds.data.table  # memory-mapped Arrow files


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


@dataclass(frozen=True)
class _Column:
    """Where a column's values come from, for error messages. ``rows`` maps list items to table rows."""

    src: _Source
    name: str
    rows: pa.ChunkedArray | None = None  # list_parent_indices of the list column; None = values are rows

    def fail(self, index: int | None, message: str) -> DataError:
        if index is None or self.rows is None:
            return self.src.error(index, message, self.name)
        row = self.rows[index].as_py()
        item = index - pc.index(self.rows, row).as_py()
        return self.src.error(row, message, f"{self.name}[{item}]")

    def check(self, bad: pa.ChunkedArray, message: str | Callable[[int], str]) -> None:
        """Raise at the first True of ``bad`` (nulls count as fine); ``message`` may format the index."""
        index = pc.index(bad, True).as_py()
        if index >= 0:
            raise self.fail(index, message(index) if callable(message) else message)

    def items(self, lists: pa.ChunkedArray) -> tuple[pa.ChunkedArray, _Column]:
        """The flattened items of a list column, and where they come from."""
        return pc.list_flatten(lists), replace(self, rows=pc.list_parent_indices(lists))


def _column(table: pa.Table, name: str) -> pa.ChunkedArray:
    """A column with dictionary encoding undone (the prompt column keeps it: see _prompt_column)."""
    col = table[name]
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col


def _json_quote(strings: pa.ChunkedArray) -> pa.ChunkedArray:
    """Vectorised ``json.dumps(s, ensure_ascii=False)`` of every string."""
    out = strings
    for char, escaped in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        out = pc.replace_substring(out, char, escaped)
    if pc.any(pc.match_substring_regex(out, "[\\x00-\\x1f]")).as_py():
        for code in range(0x20):
            char = chr(code)
            if char not in "\n\r\t":
                escaped = {"\b": "\\b", "\f": "\\f"}.get(char, f"\\u{code:04x}")
                out = pc.replace_substring(out, char, escaped)
    return pc.binary_join_element_wise('"', out, '"', "")


def _relist(lists: pa.ChunkedArray, values: pa.ChunkedArray) -> pa.Array:
    """A list array with the shape of ``lists`` (no nulls) holding ``values`` (as many as its items)."""
    offsets = pc.cumulative_sum(pc.list_value_length(lists).cast(pa.int64()))
    offsets = pa.concat_arrays([pa.array([0], pa.int64()), offsets.combine_chunks()])
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return pa.LargeListArray.from_arrays(offsets, values)


def _struct_strings(structs: pa.ChunkedArray, name: str, where: _Column) -> pa.ChunkedArray:
    if structs.type.get_field_index(name) < 0:
        raise where.fail(None, f"a message needs a '{name}' field; the column's type is {structs.type}")
    values = pc.struct_field(structs, name)
    if not _is_str(values.type):
        raise where.fail(None, f"a message's '{name}' must be a string; the column's type is {structs.type}")
    where.check(pc.is_null(values), f"a message without '{name}' (null)")
    return values


def _prompt_column(col: pa.ChunkedArray, where: _Column) -> pa.ChunkedArray:
    """A string or list<struct<role, content>> column -> the canonical prompt JSON strings."""
    if pa.types.is_dictionary(col.type) and _is_str(col.type.value_type):  # quote each prompt once
        where.check(pc.is_null(col), "expected a prompt, got null")
        where.check(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col.cast(pa.string()))), 0), "the prompt is empty")
        col = col.unify_dictionaries()
        quoted = _json_quote(col.chunk(0).dictionary) if col.num_chunks else pa.array([], pa.string())
        chunks = [pa.DictionaryArray.from_arrays(c.indices, quoted) for c in col.chunks]
        return pa.chunked_array(chunks, pa.dictionary(col.type.index_type, pa.string())).cast(pa.string())
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if _is_str(col.type):
        where.check(pc.is_null(col), "expected a prompt, got null")
        where.check(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0), "the prompt is empty")
        return _json_quote(col)
    if _is_list(col.type) and pa.types.is_struct(col.type.value_type):
        where.check(pc.is_null(col), "expected a prompt, got null")
        where.check(pc.equal(pc.list_value_length(col), 0), "expected a string or a non-empty list of messages, got []")
        messages, item = where.items(col)
        item.check(pc.is_null(messages), 'expected a message {"role", "content"}, got null')
        role = _struct_strings(messages, "role", item)
        item.check(pc.equal(pc.binary_length(role), 0), "a message with an empty role")
        content = _struct_strings(messages, "content", item)
        as_json = pc.binary_join_element_wise(
            '{"role":', _json_quote(role), ',"content":', _json_quote(content), "}", ""
        )
        return pc.binary_join_element_wise("[", pc.binary_join(_relist(col, as_json), ","), "]", "")
    raise where.fail(
        None, f'expected strings or lists of {{"role", "content"}} messages, got column type {col.type}'
    )


def _response_values(values: pa.ChunkedArray, where: _Column) -> pa.ChunkedArray:
    """Strings, or structs {role: "assistant", content} -> the non-empty response strings."""
    if pa.types.is_struct(values.type):
        where.check(pc.is_null(values), "expected a response, got null")
        role = _struct_strings(values, "role", where)
        where.check(
            pc.not_equal(role, "assistant"),
            lambda i: f"a response message must have role 'assistant', got {role[i].as_py()!r}",
        )
        values = _struct_strings(values, "content", where)
    elif not _is_str(values.type):
        hint = "; is this the grouped layout?" if _is_list(values.type) and where.rows is None else ""
        raise where.fail(None, f"expected response strings, got column type {values.type}{hint}")
    where.check(pc.is_null(values), "expected a response, got null")
    where.check(pc.equal(pc.binary_length(values), 0), "empty response")
    return values


def _reward_values(values: pa.ChunkedArray, where: _Column) -> pa.ChunkedArray:
    """Numbers -> float64, rejecting booleans, nulls, NaN and ±inf."""
    if pa.types.is_boolean(values.type):
        raise where.fail(None, "expected numbers, got booleans (column type bool); cast them to 1/0 if you mean that")
    if pa.types.is_null(values.type):
        raise where.fail(0, "expected a finite number, got null")
    if not _is_number(values.type):
        raise where.fail(None, f"expected numbers, got column type {values.type}")
    floats = pc.cast(values, pa.float64(), safe=False)
    where.check(pc.is_null(floats), "expected a finite number, got null")
    where.check(
        pc.invert(pc.is_finite(floats)), lambda i: f"expected a finite number, got {floats[i].as_py()}"
    )
    return floats


def _lists(col: pa.ChunkedArray, where: _Column, what: str) -> None:
    if not _is_list(col.type):
        hint = "; is this the flat layout?" if not pa.types.is_null(col.type) else ""
        raise where.fail(None, f"expected a list of {what} per row (grouped layout), got column type {col.type}{hint}")
    where.check(pc.is_null(col), f"expected a list of {what}, got null")


def _id_column(table: pa.Table, name: str, src: _Source) -> pa.ChunkedArray:
    if name not in table.column_names:
        return pa.chunked_array([pa.nulls(table.num_rows, pa.string())])
    col = _column(table, name)
    if pa.types.is_null(col.type):
        return col.cast(pa.string())
    if not (_is_str(col.type) or pa.types.is_integer(col.type)):
        raise DataError(src.path, f"expected string or integer ids, got column type {col.type}", field=name)
    col = col.cast(pa.string())
    _Column(src, name).check(pc.equal(pc.binary_length(col), 0), "empty id")
    return col


def _normalise_table(table: pa.Table, layout: str, names: _Names, src: _Source, index: int) -> pa.Table:
    """Validate a user table and convert it to _RAW[layout], vectorised (errors name the first bad row)."""
    prompt = _prompt_column(table[names.prompt], _Column(src, names.prompt))
    where_resp, where_rew = _Column(src, names.response), _Column(src, names.reward)
    responses, rewards = _column(table, names.response), _column(table, names.reward)
    if layout == "grouped":
        _lists(responses, where_resp, "responses")
        where_resp.check(pc.equal(pc.list_value_length(responses), 0), "expected at least one response, got an empty list")
        _lists(rewards, where_rew, "rewards")
        where_rew.check(
            pc.not_equal(pc.list_value_length(rewards), pc.list_value_length(responses)),
            lambda i: f"has {len(rewards[i])} values but '{names.response}' has {len(responses[i])}: they must match",
        )
        texts = _response_values(*where_resp.items(responses))
        values = _reward_values(*where_rew.items(rewards))
        body = [
            _relist(responses, texts).cast(pa.list_(pa.string())),
            _relist(rewards, values).cast(pa.list_(pa.float64())),
        ]
    else:
        body = [_response_values(responses, where_resp), _reward_values(rewards, where_rew)]
    n = table.num_rows
    columns = [
        _id_column(table, names.group, src),
        prompt,
        *body,
        pa.array(np.full(n, index, dtype=np.int32)),
        pa.array(np.arange(n, dtype=np.int64)),
    ]
    return pa.table(columns, schema=_RAW[layout])


# ---- grouping and ids ------------------------------------------------------------------------------


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


# ---- summary (inspect) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthStats:
    """Token lengths of ``n`` texts, before truncation; ``truncated`` = how many exceed their limit."""

    n: int
    p50: int
    p90: int
    p99: int
    max: int
    truncated: int


@dataclass(frozen=True)
class TokenStats:
    """prompts: truncated if longer than max_prompt_length; responses: truncated if longer than
    max_length minus the (kept) prompt length."""

    max_length: int
    max_prompt_length: int
    prompts: LengthStats
    responses: LengthStats


@dataclass(frozen=True)
class Summary:
    """What ``gvpo-offline inspect`` reports."""

    layout: str
    files: list[FileInfo]
    stats: DataStats
    tokens: TokenStats | None = None

    def to_json(self) -> dict:
        """Stable keys: layout, files[{path,size,sha256}], stats{DataStats fields}, tokens (or null)."""
        return {
            "layout": self.layout,
            "files": [asdict(f) for f in self.files],
            "stats": asdict(self.stats),
            "tokens": None if self.tokens is None else asdict(self.tokens),
        }


def _percentile(sorted_values: np.ndarray, q: float) -> int:
    """Nearest-rank percentile of an ascending array (q in [0, 100])."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return int(sorted_values[rank - 1])


def _length_stats(lengths: list[int], truncated: int) -> LengthStats:
    values = np.sort(np.asarray(lengths, dtype=np.int64))
    return LengthStats(
        len(values),
        _percentile(values, 50),
        _percentile(values, 90),
        _percentile(values, 99),
        int(values[-1]),
        truncated,
    )


def token_stats(
    data: GroupedData, tokenizer, cfg, progress: Callable[[int], None] | None = None
) -> TokenStats:
    """Token lengths of every prompt and response with the shared tokenization (tokenize.py).

    cfg: a tokenize.TokenizeConfig. progress(n) is called after each group with its k responses.
    """
    from transformers.utils import logging as hf_logging

    from gvpo_offline.tokenize import TokenizeConfig, encode_prompt, encode_response

    unbounded = TokenizeConfig(2**62, 2**62 - 1, cfg.add_eos, cfg.prompt_template)
    prompt_lengths, response_lengths = [], []
    prompts_cut = responses_cut = 0
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence length is longer than the maximum": we measure exactly that
    try:
        for group in data.iter_groups():
            n_prompt = len(encode_prompt(tokenizer, group.prompt, unbounded)[0])
            prompt_lengths.append(n_prompt)
            prompts_cut += n_prompt > cfg.max_prompt_length
            room = cfg.max_length - min(n_prompt, cfg.max_prompt_length)
            for response in group.responses:
                n_response = len(encode_response(tokenizer, response, unbounded))
                response_lengths.append(n_response)
                responses_cut += n_response > room
            if progress is not None:
                progress(len(group.responses))
    finally:
        hf_logging.set_verbosity(verbosity)
    return TokenStats(
        cfg.max_length,
        cfg.max_prompt_length,
        _length_stats(prompt_lengths, prompts_cut),
        _length_stats(response_lengths, responses_cut),
    )


def summarize(data: GroupedData, tokens: TokenStats | None = None) -> Summary:
    return Summary(data.layout, data.files, data.stats, tokens)


def summary_tables(summary: Summary) -> list:
    """The summary as rich tables (files, groups, rewards, tokens) for ``gvpo-offline inspect``."""
    from rich.table import Table

    s = summary.stats
    files = Table(title="files", title_justify="left")
    for col in ("path", "size", "sha256"):
        files.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    for f in summary.files:
        files.add_row(f.path, f"{f.size:,}", f.sha256[:16])

    groups = Table(title=f"groups ({summary.layout} layout)", title_justify="left", show_header=False)
    groups.add_column("what")
    groups.add_column("value")
    k_values = list(s.k_hist)
    for what, value in (
        ("rows read", s.n_rows),
        ("groups", s.n_groups),
        ("responses", s.n_responses),
        ("k (responses per group)", f"{min(k_values)}..{max(k_values)}, mean {s.n_responses / s.n_groups:.2f}"),
        ("k distribution", ", ".join(f"{k}: {n}" for k, n in s.k_hist.items())),
        ("dropped groups with k = 1", s.dropped_k1_groups),
        ("groups with duplicate responses", f"{s.groups_with_duplicates} ({s.duplicate_responses} duplicates, kept)"),
        ("groups with all-equal rewards (no signal)", s.all_equal_reward_groups),
    ):
        groups.add_row(what, f"{value:,}" if isinstance(value, int) else value)

    rewards = Table(title="rewards", title_justify="left")
    for col in ("mean", "std", "min", "max", "mean group std", "mean group spread"):
        rewards.add_column(col, justify="right")
    rewards.add_row(*(f"{v:.4g}" for v in (s.reward_mean, s.reward_std, s.reward_min, s.reward_max,
                                            s.mean_group_reward_std, s.mean_group_reward_spread)))
    tables = [files, groups, rewards]
    if summary.tokens is not None:
        t = summary.tokens
        tokens = Table(title="tokens (before truncation)", title_justify="left")
        for col in ("", "count", "p50", "p90", "p99", "max", "truncated", "limit (tokens)"):
            tokens.add_column(col, justify="right" if col not in ("", "limit") else "left")
        for name, stats, limit in (
            ("prompts", t.prompts, f"{t.max_prompt_length}"),
            ("responses", t.responses, f"{t.max_length} - prompt"),
        ):
            share = stats.truncated / stats.n if stats.n else 0.0
            numbers = (stats.n, stats.p50, stats.p90, stats.p99, stats.max)
            tokens.add_row(name, *(f"{v:,}" for v in numbers), f"{stats.truncated:,} ({share:.1%})", limit)
        tables.append(tokens)
    return tables
