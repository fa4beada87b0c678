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

Where things are (the public names below are importable from ``gvpo_offline.data``):
    records.py   ColumnMap, DataConfig, Group, FileInfo, DataStats, GroupedData, TABLE_SCHEMA
    sources.py   inputs: file kinds, folders, globs, save_to_disk folders; fingerprint, input_files
    layout.py    grouped/flat layouts, column names, layout detection, the per-source _RAW tables
    rows.py      JSON rows read one at a time: exact line numbers, per-value validation
    tables.py    Parquet/Arrow tables: vectorised validation
    grouping.py  flat rows into groups; group ids (content_group_id), duplicate ids
    load.py      load_groups (reads every source, groups, drops k = 1) and compute_stats
    summary.py   the inspect summary: token_stats, summarize, summary_tables
    locate.py    where a kind of prompt first occurs in the inputs (file and line), for errors after loading
"""

from gvpo_offline.data.grouping import content_group_id
from gvpo_offline.data.load import check_inputs, compute_stats, load_groups
from gvpo_offline.data.records import (
    LAYOUTS,
    TABLE_SCHEMA,
    ColumnMap,
    DataConfig,
    DataStats,
    FileInfo,
    Group,
    GroupedData,
    Message,
)
from gvpo_offline.data.sources import SUPPORTED, fingerprint, input_files, input_paths
from gvpo_offline.data.summary import LengthStats, Summary, TokenStats, summarize, summary_tables, token_stats

__all__ = [
    "LAYOUTS",
    "SUPPORTED",
    "TABLE_SCHEMA",
    "ColumnMap",
    "DataConfig",
    "DataStats",
    "FileInfo",
    "Group",
    "GroupedData",
    "LengthStats",
    "Message",
    "Summary",
    "TokenStats",
    "check_inputs",
    "compute_stats",
    "content_group_id",
    "fingerprint",
    "input_files",
    "input_paths",
    "load_groups",
    "summarize",
    "summary_tables",
    "token_stats",
]
