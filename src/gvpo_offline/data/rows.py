"""JSON rows: .jsonl, .jsonl.gz and .json files parsed in Python one row at a time.

Each row is validated value by value (prompt, responses, rewards, id) so that an error names the
exact 1-based line and field; valid rows are buffered into Arrow record batches of the _RAW layout.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from collections.abc import Iterator
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

import pyarrow as pa

from gvpo_offline.data.layout import _RAW, _detect_layout, _Names, _names, _Part, _RowError, check_columns
from gvpo_offline.data.records import ColumnMap, DataConfig
from gvpo_offline.data.sources import _Source
from gvpo_offline.runtime.errors import TOO_DEEP, DataError

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
    except RecursionError:
        raise DataError(path, TOO_DEEP, line=line) from None


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
        except RecursionError:
            raise DataError(src.path, TOO_DEEP, line=line) from None
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
                    layout = _detect_layout(row.__contains__, lambda c: isinstance(row[c], list), config.columns,
                                            list(row))
                names = _names(layout, config.columns)
                check_columns(list(row), names, config.columns)  # the first row's fields are the file's columns
                buffer = _RowBuffer(layout, src, index)
                parse = _grouped_row if layout == "grouped" else _flat_row
            buffer.add(line, parse(row, names, config.columns))
        except _RowError as err:
            raise DataError(src.path, err.message, line=line, field=err.field) from None
    if buffer is None:
        raise DataError(src.path, "empty file: no rows")
    return _Part(buffer.table(), layout, n_rows)
