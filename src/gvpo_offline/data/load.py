"""load_groups: every source read, validated, grouped and checked into the canonical table.

Dispatches each source to the JSON row reader (rows.py) or the Arrow table reader (tables.py),
requires one layout across inputs, groups flat rows and assigns ids (grouping.py), drops groups
with k = 1 and computes DataStats, vectorised.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gvpo_offline.data.grouping import _assign_group_ids, _group_flat
from gvpo_offline.data.layout import _detect_layout, _names, _needed, _Part, _RowError, check_columns
from gvpo_offline.data.records import LAYOUTS, TABLE_SCHEMA, DataConfig, DataStats, FileInfo, GroupedData
from gvpo_offline.data.rows import _json_array, _json_lines, _read_json_source
from gvpo_offline.data.sources import _JSON_KINDS, _resolve, _Source, fingerprint
from gvpo_offline.data.tables import _is_list, _is_str, _normalise_table, _read_parquet, _read_saved_dataset, _table_layout
from gvpo_offline.runtime.errors import DataError, GvpoError


def load_groups(config: DataConfig, files: list[FileInfo] | None = None) -> GroupedData:
    """Read every input, validate it, group it and return the canonical table (see CONTRACT).
    ``files``: the inputs' fingerprints (sources.input_files of ``config.paths``) when the caller has
    them already, so that no file is hashed twice; None: computed here."""
    if config.layout not in LAYOUTS:
        raise GvpoError(f"unknown layout {config.layout!r}: expected one of {', '.join(LAYOUTS)}")
    sources = _resolve(config.paths)
    if files is None:
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
    check_reward_spread(out, ", ".join(str(p) for p in config.paths))
    stats = compute_stats(out)
    stats.n_rows = sum(p.n_rows for p in parts)
    stats.dropped_k1_groups = dropped
    return GroupedData(out, files, layout, stats)


def check_reward_spread(table: pa.Table, where: str) -> None:
    """DataError naming the group when its rewards are finite but so large that the loss overflows
    (Σ (R − mean R)² beyond float64, e.g. ±1e200): refused when the data is read, by the first stage
    (precompute-ref, inspect), not later by train. ``table``: TABLE_SCHEMA rows."""
    import numpy as np

    sizes = pc.list_value_length(table["rewards"]).to_numpy(zero_copy_only=False)  # k >= 2 each
    rewards = pc.list_flatten(table["rewards"]).to_numpy(zero_copy_only=False)
    if rewards.size == 0:
        return
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    starts = offsets[:-1]
    with np.errstate(over="ignore", invalid="ignore"):
        means = np.add.reduceat(rewards, starts) / sizes
        spread = np.add.reduceat((rewards - np.repeat(means, sizes)) ** 2, starts)
    bad = np.flatnonzero(~np.isfinite(spread))
    if bad.size:
        g = int(bad[0])
        group = table["group_id"][g].as_py()
        biggest = np.abs(rewards[offsets[g]:offsets[g + 1]]).max()
        raise DataError(where, f"group {group!r}: rewards too large for the loss (their squared differences "
                               f"overflow float64; max |R| {biggest:.3g}); rescale the rewards", field="rewards")
def check_inputs(config: DataConfig) -> None:
    """Cheap checks a stage runs before any model work: every path exists and every file has the columns
    ``config`` needs (a Parquet file's schema, a JSON file's first row; DataError naming them all, with
    did-you-means). The full validation is load_groups's, which raises the same errors."""
    if config.layout not in LAYOUTS:
        raise GvpoError(f"unknown layout {config.layout!r}: expected one of {', '.join(LAYOUTS)}")
    for src in _resolve(config.paths):
        if src.kind in _JSON_KINDS:
            rows = _json_array(src) if src.kind == "json" else _json_lines(src)
            first = next(rows, None)
            rows.close()  # only the first row is read
            if first is None or not isinstance(first[1], dict):
                continue  # load_groups reports an empty file or a row that is no object, with its line
            line, row = first
            present = list(row)
            has, is_list = row.__contains__, lambda c: isinstance(row[c], list)
        elif src.kind == "parquet":
            try:
                schema = pq.read_schema(src.path, memory_map=True)
            except (pa.ArrowException, OSError) as exc:
                raise DataError(src.path, f"not a Parquet file ({str(exc).splitlines()[0]})") from None
            line, present = None, schema.names
            has, is_list = schema.names.__contains__, lambda c: _is_list(schema.field(c).type)
        else:
            continue  # a save_to_disk folder: read whole by load_groups (import datasets is the slow part)
        try:
            layout = config.layout if config.layout != "auto" else _detect_layout(has, is_list, config.columns, present)
            check_columns(present, _names(layout, config.columns), config.columns)
        except _RowError as err:
            raise DataError(src.path, err.message, line=line, field=err.field) from None


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
