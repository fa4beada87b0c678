"""Where a model comes from: a local folder or a Hugging Face hub id, and what its weights hash to.

``--model`` (precompute-ref, train ``--init-model``, eval, sample, inspect) is a local folder or a hub id
``org/name[@revision]``. :func:`resolve_model` turns a hub id into a snapshot folder of the Hugging Face
cache with ``huggingface_hub.snapshot_download`` (which honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and
the user's token): the cache is tried first with ``local_files_only=True``, so a model already there
needs no network; only when it is missing (or the snapshot has no weights yet) is the hub asked.

Weight hashes (:func:`file_sha256`), used by the model fingerprint, cost a full read of a multi-GB file,
so they are never computed twice for the same file:

- a file of a hub snapshot is a symlink to ``blobs/<sha256 of its content>`` (LFS files: the hub's own
  content hash, checked by huggingface_hub when it downloaded the file), so its hash is read off the
  link — free, and equal to the content hash of a plain copy of the same file;
- any other file is hashed once and remembered in ``$XDG_CACHE_HOME/gvpo-offline/file-sha256.json``
  (default ``~/.cache``; ``GVPO_OFFLINE_CACHE`` overrides the folder) under its real path, keyed by its
  size, mtime, ctime and inode: a file that is rewritten, replaced or touched is hashed again. This lives
  in the user's cache folder, not in the model folder (which may be read-only or shared) nor in a
  workdir (one model serves many workdirs).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.runtime.files import atomic_write_json, sha256_file

# org/name or name, then an optional @revision (branch, tag or commit hash); no path-like pieces
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<revision>[\w./-]+))?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# files a causal LM does not need from a hub repo (other frameworks' weights, originals, quantised copies)
_IGNORE = ["*.pth", "*.pt", "*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.tflite", "*.ot",
           "original/*", "onnx/*", "*.ckpt"]


@dataclass(frozen=True)
class ModelSource:
    """A model folder on disk, and the hub id and commit it was resolved from (None for a local folder)."""

    path: Path
    hub_id: str | None = None  # "org/name" as given (without @revision)
    revision: str | None = None  # the snapshot's commit hash


def is_hub_id(spec: str) -> bool:
    """Could ``spec`` be a hub id (``org/name[@rev]``)? Existing paths never are."""
    return not Path(spec).exists() and _HUB_ID.match(spec) is not None


def resolve_model(spec: str | Path) -> ModelSource:
    """A local folder as is, or a hub id resolved to its snapshot folder in the Hugging Face cache.

    Raises a one-line GvpoError when ``spec`` is neither an existing folder nor a hub id that is cached
    or downloadable (hub unreachable, HF_HUB_OFFLINE=1, unknown repo or revision). A local folder that is
    a snapshot of the Hugging Face cache (``.../models--ORG--NAME/snapshots/COMMIT``) keeps its hub id and
    commit, so what train writes names the model by its id, never by that local path."""
    spec = str(spec)
    if Path(spec).exists() or not is_hub_id(spec):
        snapshot = snapshot_id(Path(spec))
        return ModelSource(Path(spec), *snapshot) if snapshot else ModelSource(Path(spec))
    match = _HUB_ID.match(spec)
    repo, revision = match["repo"], match["revision"]
    path = _snapshot(spec, repo, revision)
    return ModelSource(path, hub_id=repo, revision=path.name)


def _has_weights(folder: Path) -> bool:
    return any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir())


def _snapshot(spec: str, repo: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:  # the cache first: a model already there needs no network, whatever the hub's state. Only the
        # config files are asked for: a snapshot that transformers filled (safetensors, not the .bin copies
        # the hub also lists) is complete for us; the weights are checked just below.
        cached = Path(snapshot_download(repo, revision=revision, local_files_only=True,
                                        allow_patterns=["config.json", "adapter_config.json"]))
        if _has_weights(cached) or (cached / "adapter_config.json").is_file() or constants.HF_HUB_OFFLINE:
            return cached
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise GvpoError(f"{spec}: not a local folder, and not in {where}; HF_HUB_OFFLINE is set, so it "
                        "cannot be downloaded (download it on a connected machine, or unset HF_HUB_OFFLINE)")
    try:
        return Path(snapshot_download(repo, revision=revision, ignore_patterns=_IGNORE))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        cause = err.__cause__ or err  # e.g. the ConnectError behind "cannot find ... on the local disk"
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise GvpoError(f"{spec}: not a local folder, not in {where}, and the hub could not provide it "
                        f"({type(cause).__name__}: {first})") from None


def snapshot_id(path: Path) -> tuple[str, str] | None:
    """(hub id, commit) when ``path`` is a snapshot folder of the Hugging Face cache, else None."""
    commit = snapshot_commit(path)
    if commit is None or not Path(path).is_dir():
        return None
    repo = Path(path).absolute().parent.parent.name.removeprefix("models--").replace("--", "/", 1)
    return (repo, commit) if _HUB_ID.match(repo) else None


def snapshot_commit(path: Path) -> str | None:
    """The commit hash when ``path`` is a snapshot folder of the Hugging Face cache, else None."""
    path = Path(path).absolute()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.name
    return None


# ---- weight hashes ---------------------------------------------------------------------------------


def hash_cache_path() -> Path:
    """The on-disk cache of file hashes (see the module docstring)."""
    root = os.environ.get("GVPO_OFFLINE_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "gvpo-offline"
    return Path(root) / "file-sha256.json"


def _blob_sha256(path: Path) -> str | None:
    """The sha256 a hub snapshot's symlink names (``../../blobs/<sha256>``), when it is one."""
    if not path.is_symlink():
        return None
    target = Path(os.readlink(path))
    if target.parent.name == "blobs" and _SHA256.match(target.name):
        return target.name
    return None


_memo: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's content, read off a hub blob link or hashed once and cached on disk."""
    path = Path(path)
    from_blob = _blob_sha256(path)
    if from_blob is not None:
        return from_blob
    real = path.resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key in _memo:
        return _memo[key]
    cache_file = hash_cache_path()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    try:
        entries = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        entries = {}
    entry = entries.get(str(real)) if isinstance(entries, dict) else None
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        _memo[key] = entry["sha256"]
        return entry["sha256"]
    digest = sha256_file(real)
    _memo[key] = digest
    if not isinstance(entries, dict):
        entries = {}
    entries = {k: v for k, v in entries.items() if Path(k).exists()}  # forget deleted files
    entries[str(real)] = {"stamp": stamp, "sha256": digest}
    try:
        atomic_write_json(cache_file, entries)
    except OSError:
        pass  # a read-only home: the hash is still right, only not remembered
    return digest
