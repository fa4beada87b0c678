"""The reference log-prob cache: its format, its manifest, and reading it (train and eval read it here).

Written by :mod:`gvpo_offline.stages.reference.compute`.

CACHE FORMAT (``WORKDIR``, default ``gvpo-run/``):
    manifest.json     what produced the cache (see :class:`Manifest`); ``complete`` is true only once
                      every shard is written.
    ref/shard-NNNNN.parquet
                      one row per response, columns of :data:`REF_SCHEMA`:
        group_id        string   the data layer's group id
        split           string   "train" or "eval" (whole groups, by a stable hash of the prompt)
        response_index  int32    position of the response within its group
        prompt_ids      list<int32>  prompt token ids (after truncation)
        response_ids    list<int32>  response token ids (after truncation; EOS, or a chat template's
                                     end of turn, included: tokenize.RESPONSE_RULE)
        reward          float64  R(x, y)
        ref_logp        float64  Σ over response tokens of log πref(token | prompt, earlier tokens)
        n_tokens        int32    len(response_ids)
    .gvpo-offline     the workdir marker (workdir.py): the tool writes only into folders it made.
All files are written atomically (temp file, then rename). The manifest records each shard's size and
sha256 (``shard_sizes``, ``shard_sha256``): sizes are checked whenever the manifest is read, checksums
whenever a shard is loaded; shard paths must lie inside WORKDIR/ref/.

CACHE SEMANTICS (:func:`precompute`):
    Manifest.inputs holds everything that decides the content (data files' sha256, layout, columns, model
    and tokenizer fingerprints, tokenize settings after clamping, the response rule, weights dtype, eval_fraction, shard_groups, shard_bytes, packing,
    tool version); Manifest.key = sha256 of it. Same key and complete -> cache hit (no model loaded). Same key,
    incomplete -> resume: shards already on disk (each carries the key in its Parquet metadata) are kept.
    Other key -> recompute (or refuse with overwrite=False, naming what changed). Everything (data,
    tokenization and templates of every group) is validated before an existing cache is touched. A
    complete cache with a missing or corrupt shard is repaired (that shard is recomputed).
    Split: a group is 'eval' iff split_value(prompt JSON) < eval_fraction, split_value = the first 53
    bits of sha256(prompt JSON from the data table) / 2**53, uniform in [0, 1);
    with --eval-data, DATA is all 'train' and the --eval-data groups all 'eval'.
    Shards hold consecutive groups in data order (DATA, then --eval-data); shard s starts at group
    shard_starts[s]. A shard closes at shard_groups groups or shard_bytes of text (each response with its
    prompt, UTF-8), whichever comes first: both are in the key, so the same inputs give the same shards.
    Other files' reference log-probs for eval: :func:`precompute_extra` -> WORKDIR/extra/<hash>/.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gvpo_offline.data.tokenize import TokenizeConfig
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.runtime.files import sha256_file

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
    dtype: str  # the weights dtype the reference ran in (loaded directly in it; train must use the same)
    eval_fraction: float
    counts: dict[str, SplitCounts] = field(default_factory=dict)
    truncated_prompts: int = 0
    truncated_responses: int = 0
    shards: list[str] = field(default_factory=list)
    complete: bool = False
    shard_groups: int = 0
    shard_starts: list[int] = field(default_factory=list)  # the first group of each shard (data order)
    inputs: dict = field(default_factory=dict)  # everything that decides the content (hashed into key)
    key: str = ""  # sha256 of ``inputs``: same key -> same cache, so a rerun is a hit or a resume
    shard_sizes: list[int] = field(default_factory=list)  # bytes of each finished shard (complete only)
    shard_sha256: list[str] = field(default_factory=list)  # hex sha256 of each finished shard
    model_id: str | None = None  # the hub id --model was given as (None: a local folder)
    model_revision: str | None = None  # the hub snapshot's commit hash
    request_key: str | None = None  # sha256 of the options as given (stages/reference/hit.py): a hit without torch

    @property
    def tokenize_config(self) -> TokenizeConfig:
        return TokenizeConfig(**self.tokenize)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj) -> Manifest:
        """Parse ``manifest.json``'s object; ValueError (one line) when it is not a manifest of ours."""
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(f"unknown keys {', '.join(map(repr, unknown))}")
        obj = dict(obj)
        try:
            obj["counts"] = {str(k): SplitCounts(**v) for k, v in (obj.get("counts") or {}).items()}
            manifest = cls(**obj)
        except (TypeError, AttributeError) as err:
            raise ValueError(str(err)) from None
        lists = (manifest.shards, manifest.shard_sizes, manifest.shard_sha256, manifest.data_files)
        if not all(isinstance(x, list) for x in lists) or not all(isinstance(s, str) for s in manifest.shards):
            raise ValueError("shards, shard_sizes, shard_sha256 and data_files must be lists")
        for name in manifest.shards:  # never trust a path from a file: shards live in WORKDIR/ref/
            if not SHARD_NAME.fullmatch(name):
                raise ValueError(f"shard path {name!r} is not {REF_DIR}/shard-NNNNN.parquet")
        return manifest


SHARD_NAME = re.compile(rf"{REF_DIR}/shard-[0-9]{{5,}}\.parquet")
RERUN = "rerun `gvpo-offline precompute-ref` with the same arguments to repair it"


def parse_manifest(path: Path) -> Manifest:
    """``path`` (a manifest.json) parsed and validated, or GvpoError in one line."""
    try:
        return Manifest.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError) as err:
        message = " ".join(str(err).split())
        raise GvpoError(f"{path}: not a valid gvpo-offline manifest ({message})") from None


def read_manifest(workdir: str | Path) -> Manifest:
    """The manifest of a workdir; a clear error when there is none, it is incomplete, or a shard is
    missing or has another size than recorded (cheap: no content is read)."""
    path = Path(workdir) / MANIFEST
    if not path.is_file():
        raise GvpoError(f"{path}: no reference cache here; run `gvpo-offline precompute-ref` first")
    manifest = parse_manifest(path)
    if not manifest.complete:
        raise GvpoError(f"{path}: the reference cache is incomplete; rerun `gvpo-offline precompute-ref` to finish it")
    if len(manifest.shard_sizes) != len(manifest.shards) or len(manifest.shard_sha256) != len(manifest.shards):
        raise GvpoError(f"{path}: the manifest records no shard sizes/checksums (an older version made it); {RERUN}")
    for name, size in zip(manifest.shards, manifest.shard_sizes):
        shard = Path(workdir) / name
        if not shard.is_file():
            raise GvpoError(f"{shard}: cache shard missing; {RERUN}")
        if shard.stat().st_size != size:
            raise GvpoError(f"{shard}: cache shard has {shard.stat().st_size} bytes, the manifest says {size}; {RERUN}")
    return manifest


def verify_shard(workdir: Path, manifest: Manifest, s: int) -> str | None:
    """Why shard ``s`` does not match the manifest ("missing", "size", "checksum"), or None when it does."""
    path = Path(workdir) / manifest.shards[s]
    if not path.is_file():
        return "missing"
    if path.stat().st_size != manifest.shard_sizes[s]:
        return "size"
    if sha256_file(path) != manifest.shard_sha256[s]:
        return "checksum"
    return None


def load_split(workdir: str | Path, split: str) -> pa.Table:
    """All cached rows of one split (REF_SCHEMA), sorted by (group_id, response_index). Memory-mapped;
    every shard's sha256 is checked against the manifest first."""
    manifest = read_manifest(workdir)
    paths = [Path(workdir) / s for s in manifest.shards]
    for s, path in enumerate(paths):
        if (problem := verify_shard(Path(workdir), manifest, s)) is not None:
            raise GvpoError(f"{path}: cache shard is corrupt ({problem} differs from the manifest); {RERUN}")
    tables = [pq.read_table(p, memory_map=True, filters=[("split", "=", split)]) for p in paths]
    table = pa.concat_tables(tables) if tables else REF_SCHEMA.empty_table()
    return table.sort_by([("group_id", "ascending"), ("response_index", "ascending")])



def check_reward_range(table: pa.Table, where) -> None:
    """Rewards that are finite but so large that the loss overflows (R − mean R squared beyond float64,
    e.g. 1e200) are refused at load, naming the group, instead of surfacing as an inf loss later.
    ``table``: REF_SCHEMA rows sorted by group_id (load_split's order)."""
    import numpy as np

    if table.num_rows == 0:
        return
    ids = table.column("group_id").to_pylist()
    offsets = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]
    rewards = table.column("reward").to_numpy()
    starts = np.asarray(offsets[:-1])
    sizes = np.diff(offsets)
    with np.errstate(over="ignore", invalid="ignore"):
        means = np.add.reduceat(rewards, starts) / sizes
        spread = np.add.reduceat((rewards - np.repeat(means, sizes)) ** 2, starts)
    finite = np.logical_and.reduceat(np.isfinite(rewards), starts)  # non-finite rewards: the step check's job
    bad = np.flatnonzero(finite & ~np.isfinite(spread))
    if bad.size:
        g = int(bad[0])
        group = table.column("group_id")[offsets[g]].as_py()
        raise GvpoError(f"{where}: group {group!r}: rewards too large for the loss (their squared differences "
                        f"overflow float64; max |R| {np.abs(rewards[offsets[g]:offsets[g + 1]]).max():.3g}); "
                        "rescale the rewards")


_KEY_META = b"gvpo.key"  # shard Parquet metadata: the cache key it was computed under, truncation counts
_TRUNC_META = (b"gvpo.truncated_prompts", b"gvpo.truncated_responses")


_LABELS = {
    "tool_version": "tool version",
    "data_files": "data file content",
    "eval_data_files": "--eval-data file content",
    "layout": "--layout",
    "columns": "column mapping",
    "model_fingerprint": "model fingerprint",
    "tokenizer_fingerprint": "tokenizer fingerprint",
    "dtype": "dtype",
    "weights_dtype": "weights dtype",
    "response_rule": "rule that tokenizes responses",
    "eval_fraction": "eval fraction",
    "shard_groups": "--shard-groups",
    "shard_bytes": "shard size (--shard-bytes)",
    "packing": "--packing",
    "load_in_4bit": "--load-in-4bit",
}


def describe_changes(old: dict, new: dict) -> list[str]:
    """What differs between two manifests' ``inputs``, in words: ["model fingerprint changed", ...]."""
    changes = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if name == "tokenize" and isinstance(a, dict) and isinstance(b, dict):
            changes += [
                f"tokenize setting {k} changed ({a.get(k)!r} -> {b.get(k)!r})"
                for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            ]
        elif name.endswith("fingerprint") or name.endswith("files"):
            changes.append(f"{_LABELS[name]} changed")
        else:
            changes.append(f"{_LABELS.get(name, name)} changed ({a!r} -> {b!r})")
    return changes


def _read_any_manifest(workdir: Path) -> Manifest | None:
    """The workdir's manifest even if incomplete; None when absent or unreadable (e.g. an old format)."""
    try:
        return Manifest.from_json(json.loads((workdir / MANIFEST).read_text()))
    except (OSError, ValueError):
        return None


def _shard_meta(path: Path) -> dict[bytes, bytes]:
    """A finished shard's Parquet key/value metadata ({} when the file is missing or unreadable)."""
    try:
        return pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return {}


def bad_shards(workdir: Path, manifest: Manifest) -> dict[int, str]:
    """{shard number: what is wrong} for the shards of a complete manifest that fail verify_shard."""
    if len(manifest.shard_sizes) != len(manifest.shards) or len(manifest.shard_sha256) != len(manifest.shards):
        return dict.fromkeys(range(len(manifest.shards)), "unverifiable (no checksum recorded)")
    bad = {}
    for s in range(len(manifest.shards)):
        if (problem := verify_shard(workdir, manifest, s)) is not None:
            bad[s] = problem if problem == "missing" else f"corrupt ({problem} differs)"
    return bad


def cache_summary(m: Manifest) -> str:
    """One line: groups, responses and tokens per split, and the truncation counts."""
    parts = [f"{s} {c.groups} groups / {c.responses} responses / {c.tokens} response tokens" for s, c in m.counts.items()]
    t = m.tokenize_config
    return (
        f"{'; '.join(parts)}; truncated {m.truncated_prompts} prompts (> {t.max_prompt_length} tokens) "
        f"and {m.truncated_responses} responses (prompt + response > {t.max_length} tokens)"
    )
