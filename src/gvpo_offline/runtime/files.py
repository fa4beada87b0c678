"""File plumbing shared by the stages: content hashes and atomic writes (temp file, then rename).

A reader never sees a half-written file: every writer goes through :func:`atomic_path`, which hands out
a temp name in the target's folder (``.gvpo-tmp-NAME.XXXX``), fsyncs it and renames it over the target.
Temp names always start with ``.gvpo-tmp-`` or ``.gvpo-old-`` (:data:`TMP_PREFIX`, :data:`OLD_PREFIX`),
so cleaning up after a crash never touches a file the tool did not write. Files get the mode any other
tool would give them (0666 minus the umask; folders 0777 minus the umask), not mkstemp's 0600: also the
files that libraries write into an :func:`atomic_dir` through their own temp files (transformers'
``save_pretrained`` writes ``model.safetensors`` 0600), which are set right before the folder is swapped in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TMP_PREFIX = ".gvpo-tmp-"
OLD_PREFIX = ".gvpo-old-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (under the umask at import)


def file_mode() -> int:
    """What open() gives a new file under the current umask."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """What mkdir() gives a new folder under the current umask."""
    return 0o777 & ~_umask()


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, streamed in ``chunk_bytes`` chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and rename it over ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    os.close(fd)
    os.chmod(tmp, file_mode())
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename in (None, tmp, Path(tmp)):
            err.filename = str(path)  # name the file the user asked for, not our temp name
        raise


def _writer_errors() -> tuple[type[BaseException], ...]:
    """What weight writers raise for a failed write without it being an OSError: torch.save's RuntimeError
    and safetensors' SafetensorError (a plain Exception carrying the OS error in its text)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # safetensors too old to export it
        return (RuntimeError,)
    return (RuntimeError, SafetensorError)


_OS_ERRNO = re.compile(r"\(os error (\d+)\)|\bcode: (\d+)\b")  # safetensors: "(os error 28)" / "Os { code: 28"


@contextmanager
def write_errors_as_os_errors(path: str | Path) -> Iterator[None]:
    """Turn the errors that torch.save (RuntimeError, no errno) and safetensors (SafetensorError, the OS
    error in its text) raise for a failed write, e.g. a full disk, into an OSError naming ``path``: ENOSPC
    when the error names it or the disk is visibly full, else the error number it names, else EIO. The
    CLI prints one line instead of a traceback. The writer's temp files are already gone when this runs."""
    import errno

    try:
        yield
    except _writer_errors() as err:
        from gvpo_offline.runtime.launcher import is_lost_peer

        if is_lost_peer(err):  # a collective inside the save failed: another rank died, not the disk
            raise
        found = _OS_ERRNO.search(str(err))
        code = int(found.group(1) or found.group(2)) if found else None
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            full = shutil.disk_usage(folder).free < (1 << 20)
        except OSError:
            full = False
        if code == errno.ENOSPC or full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        if code is not None:
            raise OSError(code, os.strerror(code), str(path)) from None
        reason = " ".join(str(err).split())[:200]
        raise OSError(errno.EIO, f"could not write (is the disk full? {type(err).__name__}: {reason})",
                      str(path)) from None


def append_durably(fh, text: str) -> None:
    """Append ``text`` (UTF-8) to ``fh``, a file opened for appending, and fsync it, bypassing ``fh``'s
    buffer. When that fails (a full disk: OSError ENOSPC) the file is cut back to its size before, so it
    never ends in half a record; the OSError goes on (the CLI prints it as one line, exit 1)."""
    fh.flush()
    fd = fh.fileno()
    size = os.fstat(fd).st_size
    data = memoryview(text.encode("utf-8"))
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except OSError:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj) -> None:
    """Pretty JSON (sorted keys, trailing newline), atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped), streamed, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def atomic_write_table(path: str | Path, table: pa.Table) -> None:
    """A Parquet file, atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a folder
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder ``.gvpo-tmp-NAME-PID`` beside ``path`` to fill; on success fsync it and
    swap it in by renames (an existing ``path`` is first renamed to ``.gvpo-old-NAME-PID``, then deleted), so
    ``path`` is always either the old folder or the complete new one. On failure the temp folder goes.
    Every file and folder in it gets the umask's usual mode (:func:`file_mode`, :func:`folder_mode`),
    whatever mode the writer's own temp files had."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}"
    old = path.parent / f"{OLD_PREFIX}{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        modes = file_mode(), folder_mode()
        for file in [tmp, *tmp.rglob("*")]:
            if file.is_symlink():
                continue
            if file.is_file():
                os.chmod(file, modes[0])
                with open(file, "rb+") as fh:
                    os.fsync(fh.fileno())
            elif file.is_dir():
                os.chmod(file, modes[1])
        _fsync_dir(tmp)
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_stale(folder: str | Path) -> None:
    """Delete what an interrupted writer left in ``folder`` (``.gvpo-tmp-*`` and ``.gvpo-old-*`` only)."""
    for pattern in (f"{TMP_PREFIX}*", f"{OLD_PREFIX}*"):
        for stale in Path(folder).glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
