"""Arrow tables: Parquet files and save_to_disk folders, validated with vectorised pyarrow compute.

Reads the needed columns (memory-mapped), checks types and values column by column without a
Python object per row, and converts the table to the _RAW layout; errors name the first bad
0-based row (and list item) and the field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gvpo_offline.data.layout import _RAW, _detect_layout, _Names, _names, _RowError, check_columns
from gvpo_offline.data.records import DataConfig
from gvpo_offline.data.sources import _Source
from gvpo_offline.runtime.errors import DataError


def _table_layout(schema: pa.Schema, src: _Source, config: DataConfig) -> tuple[str, _Names]:
    """The layout of a table (forced or detected) and its column names; DataError if one is missing."""
    layout = config.layout
    if layout == "auto":
        is_list = lambda c: _is_list(schema.field(c).type)  # noqa: E731
        try:
            layout = _detect_layout(schema.names.__contains__, is_list, config.columns, schema.names)
        except _RowError as err:
            raise DataError(src.path, err.message, field=err.field) from None
    names = _names(layout, config.columns)
    try:
        check_columns(schema.names, names, config.columns)
    except _RowError as err:
        raise DataError(src.path, err.message, field=err.field) from None
    return layout, names


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
