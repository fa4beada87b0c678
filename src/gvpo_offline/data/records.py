"""The records the data stage hands on: user options in, the canonical grouped table out.

ColumnMap and DataConfig say what to read; Group, FileInfo, DataStats and GroupedData are what
load_groups returns; TABLE_SCHEMA is the canonical table's Arrow schema (see the package CONTRACT).
Plain typed dataclasses with no I/O, so every other module of the package can import them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

Message = dict[str, str]

LAYOUTS = ("auto", "grouped", "flat")

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
