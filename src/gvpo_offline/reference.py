"""Reference log-prob cache: computed once by `precompute-ref`, read by train and eval.

CACHE FORMAT (``WORKDIR``, default ``gvpo-run/``):
    manifest.json     what produced the cache (see :class:`Manifest`); ``complete`` is true only once
                      every shard is written.
    ref/shard-NNNNN.parquet
                      one row per response, columns of :data:`REF_SCHEMA`:
        group_id        string   the data layer's group id
        split           string   "train" or "eval" (whole groups, by a stable hash of the prompt)
        response_index  int32    position of the response within its group
        prompt_ids      list<int32>  prompt token ids (after truncation)
        response_ids    list<int32>  response token ids (after truncation, EOS included)
        reward          float64  R(x, y)
        ref_logp        float64  Σ over response tokens of log πref(token | prompt, earlier tokens)
        n_tokens        int32    len(response_ids)
All files are written atomically (temp file, then rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gvpo_offline.errors import GvpoError
from gvpo_offline.tokenize import TokenizeConfig

MANIFEST = "manifest.json"
REF_DIR = "ref"
SPLITS = ("train", "eval")

REF_SCHEMA = pa.schema(
    [
        ("group_id", pa.string()),
        ("split", pa.string()),
        ("response_index", pa.int32()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("reward", pa.float64()),
        ("ref_logp", pa.float64()),
        ("n_tokens", pa.int32()),
    ]
)


@dataclass
class SplitCounts:
    groups: int = 0
    responses: int = 0
    tokens: int = 0


@dataclass
class Manifest:
    """``WORKDIR/manifest.json``: everything that decides the cache's content, plus progress."""

    tool_version: str
    data_files: list[dict]  # [{"path", "size", "sha256"}]
    eval_data_files: list[dict]
    layout: str
    columns: dict  # ColumnMap as a dict
    model_path: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    tokenize: dict  # TokenizeConfig as a dict
    dtype: str
    eval_fraction: float
    counts: dict[str, SplitCounts] = field(default_factory=dict)
    truncated_prompts: int = 0
    truncated_responses: int = 0
    shards: list[str] = field(default_factory=list)
    complete: bool = False

    @property
    def tokenize_config(self) -> TokenizeConfig:
        return TokenizeConfig(**self.tokenize)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> Manifest:
        obj = dict(obj)
        obj["counts"] = {k: SplitCounts(**v) for k, v in obj.get("counts", {}).items()}
        return cls(**obj)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_table(path: Path, table: pa.Table) -> None:
    """Write a Parquet file atomically (temp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(workdir: str | Path) -> Manifest:
    """The manifest of a workdir; a clear error when there is none or it is incomplete."""
    path = Path(workdir) / MANIFEST
    if not path.is_file():
        raise GvpoError(f"{path}: no reference cache here; run `gvpo-offline precompute-ref` first")
    manifest = Manifest.from_json(json.loads(path.read_text()))
    if not manifest.complete:
        raise GvpoError(f"{path}: the reference cache is incomplete; rerun `gvpo-offline precompute-ref` to finish it")
    return manifest


def load_split(workdir: str | Path, split: str) -> pa.Table:
    """All cached rows of one split (REF_SCHEMA), sorted by (group_id, response_index). Memory-mapped."""
    manifest = read_manifest(workdir)
    paths = [Path(workdir) / s for s in manifest.shards]
    tables = [pq.read_table(p, memory_map=True, filters=[("split", "=", split)]) for p in paths]
    table = pa.concat_tables(tables) if tables else REF_SCHEMA.empty_table()
    return table.sort_by([("group_id", "ascending"), ("response_index", "ascending")])
