"""Inputs: which files a list of paths means, and their fingerprints.

Expands files, folders (recursively, sorted, hidden files and gvpo-offline workdirs skipped) and
globs into sources by file kind (.jsonl, .jsonl.gz, .json, .parquet) or ``datasets.save_to_disk``
folders (their .arrow files), and fingerprints them (size, sha256) for cache checks.
"""

from __future__ import annotations

import glob
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from gvpo_offline.data.records import FileInfo
from gvpo_offline.runtime.errors import DataError, GvpoError
from gvpo_offline.runtime.files import sha256_file

SUPPORTED = ".jsonl, .jsonl.gz, .json, .parquet or a datasets.save_to_disk folder"


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


def _what_is(path: str) -> str | None:
    """"dir", "file" or None (nothing there). Unlike os.path.isdir/isfile, which answer False for a path
    they may not look at, a PermissionError (an OSError: "Permission denied: PATH", exit 1) goes on."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    return "dir" if stat.S_ISDIR(mode) else "file"


def _raise(err: OSError) -> None:
    """os.walk's onerror: an unreadable folder is an error, not an empty one."""
    raise err


def _check_pattern_folder(pattern: str) -> None:
    """A glob that matched nothing: if the folder it lists cannot be read, say so (glob hides it)."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    folder = str(Path(*parts[:fixed])) if fixed else "."
    if _what_is(folder) == "dir":
        os.listdir(folder)  # PermissionError names the folder


def _folder_sources(folder: str) -> list[_Source]:
    """A save_to_disk folder, or every supported file below ``folder`` (sorted, hidden files skipped).
    A folder below it that cannot be read is an error (os.walk would skip it silently)."""
    if _is_saved_dataset(folder) or os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        return [_dataset_source(folder)]
    found: list[_Source] = []
    for root, dirs, names in os.walk(folder, onerror=_raise):
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
        what = _what_is(path)
        if any(c in path for c in "*?[") and what is None:
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                _check_pattern_folder(path)
            found = [
                s
                for m in matches
                for s in (_folder_sources(m) if os.path.isdir(m) else [_Source(m, _file_kind(m) or "", (m,))])
                if s.kind
            ]
            if not found:
                raise DataError(path, f"the pattern matches no data files ({SUPPORTED})")
            sources.extend(found)
        elif what == "dir":
            sources.extend(_folder_sources(path))
        elif what == "file":
            kind = _file_kind(path)
            if kind is None:
                raise DataError(path, f"unsupported file type: expected {SUPPORTED}")
            sources.append(_Source(path, kind, (path,)))
        else:
            raise DataError(path, "no such file or directory")
    return sources


def fingerprint(path: str | Path) -> FileInfo:
    """Size (bytes) and sha256 of a file's content."""
    return FileInfo(str(path), os.path.getsize(path), sha256_file(path))


def input_paths(paths: tuple[str, ...]) -> list[str]:
    """The files that :func:`load_groups` reads for ``paths``, in order, without reading them."""
    return [path for src in _resolve(tuple(paths)) for path in src.files] if paths else []


def input_files(paths: tuple[str, ...]) -> list[FileInfo]:
    """The files that :func:`load_groups` reads for ``paths`` (files, folders, globs, save_to_disk
    folders), in order, fingerprinted. Cheap next to parsing: used to decide cache hits."""
    return [fingerprint(path) for src in _resolve(tuple(paths)) for path in src.files] if paths else []
