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
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

Message = dict[str, str]


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
    n_rows: int = 0
    n_groups: int = 0
    n_responses: int = 0
    k_hist: dict[int, int] = field(default_factory=dict)
    dropped_k1_groups: int = 0
    groups_with_duplicates: int = 0
    duplicate_responses: int = 0
    all_equal_reward_groups: int = 0


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


def load_groups(config: DataConfig) -> GroupedData:  # implemented in issue 2
    raise NotImplementedError
