"""Ownership of a workdir: the ``.gvpo-offline`` marker and the per-stage locks.

The tool only writes into a folder it can prove is its own: a folder that did not exist, was empty, or
holds the marker ``WORKDIR/.gvpo-offline`` (JSON ``{"layout": LAYOUT_VERSION, ...}``) written when the
tool first claimed it. A non-empty folder without the marker (the user's own files, ``.`` by mistake)
is refused, so nothing in it is ever deleted or replaced. Temp files and folders the tool writes carry
the prefix ``.gvpo-tmp-``/``.gvpo-old-`` (files.py): only those are ever cleaned up.

Locks (Linux/macOS ``fcntl.flock`` on ``WORKDIR/.gvpo-lock-<name>``, released when the process ends,
however it ends): ``precompute-ref`` holds ``ref`` exclusively; ``train`` holds ``train`` exclusively
and ``ref`` shared (the cache must not change under it); ``eval`` holds ``ref`` shared, and ``train``
shared in the workdir its model lies in (WORKDIR/model, a checkpoint), so that no precompute-ref
rewrites the cache and no train replaces the model while it reads them; evals run side by side. A
second writer stops at once with a message naming the holder's pid (written into the lock file by an
exclusive holder; a shared one is a train or an eval).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from gvpo_offline.runtime.errors import GvpoError

MARKER = ".gvpo-offline"
LAYOUT_VERSION = 1
LOCK_PREFIX = ".gvpo-lock-"
# What each stage writes inside its workdir (none of them may be a link: refuse_links).
STAGE_OUTPUTS = {
    "precompute": ("manifest.json", "ref"),
    "train": ("checkpoints", "metrics.jsonl", "model", "model-merged", "tb", "wandb", "train_config.json"),
    "eval": ("extra",),
}


def is_marked(folder: str | Path) -> bool:
    """Does ``folder`` carry the tool's marker (i.e. is it a gvpo-offline workdir)?"""
    return (Path(folder) / MARKER).is_file()


def claim(folder: str | Path) -> Path:
    """Make ``folder`` a workdir of this tool, or refuse: create it (and the marker) when it is missing
    or empty; accept it when it has the marker of a layout we know; else raise GvpoError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GvpoError(f"--workdir {folder}: exists and is not a folder")
    if is_marked(folder):
        check_layout(folder)
        return folder
    if folder.is_dir() and any(folder.iterdir()):
        raise GvpoError(
            f"--workdir {folder}: the folder is not empty and is not a gvpo-offline workdir (no {MARKER} "
            "marker); the tool never writes into a folder of yours: pass a new or empty --workdir"
        )
    folder.mkdir(parents=True, exist_ok=True)
    from gvpo_offline import __version__
    from gvpo_offline.runtime.files import atomic_write_json

    atomic_write_json(folder / MARKER, {"layout": LAYOUT_VERSION, "tool": "gvpo-offline", "tool_version": __version__})
    return folder


def require(folder: str | Path) -> Path:
    """A workdir made by precompute-ref (it has the marker), else GvpoError: train and eval write only there.
    A folder without the marker is "no workdir here", unless it holds a reference cache (manifest.json)
    without one: then an older version of the tool made it."""
    folder = Path(folder)
    if not is_marked(folder):
        if not folder.is_dir():
            raise GvpoError(f"{folder}: no such workdir; run `gvpo-offline precompute-ref --workdir {folder}` first")
        if (folder / "manifest.json").is_file() and (folder / "ref").is_dir():
            raise GvpoError(
                f"{folder}: not a gvpo-offline workdir (no {MARKER} marker; a workdir of an older version: rerun "
                "precompute-ref into a new --workdir)"
            )
        raise GvpoError(
            f"{folder}: no workdir here (not a gvpo-offline workdir: no {MARKER} marker); pass the --workdir "
            f"precompute-ref wrote, or run `gvpo-offline precompute-ref --workdir NEW_FOLDER` first"
        )
    check_layout(folder)
    return folder


def check_layout(folder: Path) -> None:
    path = folder / MARKER
    try:
        layout = json.loads(path.read_text()).get("layout")
    except (ValueError, AttributeError):
        layout = None
    if layout != LAYOUT_VERSION:
        raise GvpoError(f"{path}: workdir layout {layout!r} is not the one this version writes ({LAYOUT_VERSION})")


def inside_workdir(path: str | Path) -> Path | None:
    """The gvpo-offline workdir that ``path`` lies in (itself or a parent carrying the marker), or None."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if is_marked(folder):
            return folder
    return None


# ---- locks ---------------------------------------------------------------------------------------


_PID_WIDTH = 20  # bytes of the pid record at the start of a lock file (padded: never truncated)


def refuse_links(folder: str | Path, names: tuple[str, ...] | list[str]) -> None:
    """GvpoError when ``folder/name`` is a symbolic link (or a file with a second name, a hard link), for
    each of the names the tool writes there: a link planted in a (shared) workdir would make the tool write
    or delete through it, in a folder or a file of someone else's. A workdir itself may be a link (e.g. to
    scratch space); what is in it may not."""
    for name in names:
        path = Path(folder) / name
        if path.is_symlink():
            raise GvpoError(f"{path}: is a symbolic link; the tool never writes through a link inside its "
                            "workdir (it may point at a file of yours): remove the link")
        if path.is_file() and path.stat().st_nlink > 1:  # appended to in place (metrics.jsonl)
            raise GvpoError(f"{path}: is a hard link (another name of a file that may be yours); the tool "
                            "never writes into it: remove it")


def _open_lock(path: Path) -> int:
    """Open (create) a lock file without following a link; refuse anything but a regular file with one
    name (a symlink, a folder, a FIFO, a hard link to another file are someone else's)."""
    import errno
    import stat

    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EMLINK):
            raise GvpoError(f"{path}: the lock path is a link or not a regular file; the tool never writes "
                            "through it: remove it") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > _PID_WIDTH:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else (
            "a hard link to another file" if st.st_nlink != 1 else "not a lock file of this tool (too large)")
        raise GvpoError(f"{path}: the lock path is {what}; the tool never writes into it: remove it")
    return fd


@contextmanager
def lock(folder: str | Path, name: str, *, shared: bool = False) -> Iterator[None]:
    """Hold ``WORKDIR/.gvpo-lock-<name>`` (exclusive, or shared) for the block, or raise GvpoError at once
    naming the process that holds it. The file is opened with O_NOFOLLOW and never truncated: an exclusive
    holder writes its pid, padded to a fixed width, over the first bytes. Without fcntl (Windows) this is
    a no-op."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS
        yield
        return
    path = Path(folder) / f"{LOCK_PREFIX}{name}"
    fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GvpoError(f"{folder}: {_holder(Path(folder), name)}; wait for it to finish or stop it") from None
        if not shared:
            os.pwrite(fd, f"{os.getpid()}".ljust(_PID_WIDTH - 1).encode() + b"\n", 0)
        try:
            yield
        finally:
            if not shared:
                os.pwrite(fd, b" " * (_PID_WIDTH - 1) + b"\n", 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(folder: Path, name: str) -> str:
    """Who holds lock ``name``: the pid an exclusive holder wrote, else a train (shared ``ref`` holder),
    else an eval (the only other shared holder, which writes no pid)."""
    for lock_name, stage in ((name, name), ("train", "train")):
        try:
            pid = (folder / f"{LOCK_PREFIX}{lock_name}").read_text()[:_PID_WIDTH].strip()
        except (OSError, ValueError):
            pid = ""
        if pid:
            what = "precompute-ref" if stage == "ref" else stage
            return f"another gvpo-offline process (pid {pid}, {what}) is using this workdir"
    return "another gvpo-offline process (an eval) is using this workdir"


def run_folder(model: str | Path) -> Path | None:
    """The run folder a model lies in: WORKDIR/runs/NAME for a named run's model or checkpoint, else
    the workdir itself; None outside every workdir."""
    owner = inside_workdir(model)
    if owner is None:
        return None
    parts = Path(model).resolve().relative_to(owner).parts
    return owner / parts[0] / parts[1] if len(parts) > 2 and parts[0] == "runs" else owner


@contextmanager
def stage_locks(folder: str | Path, stage: str, model: str | Path | None = None,
                run_dir: str | Path | None = None) -> Iterator[None]:
    """The locks of one stage: ``precompute`` -> ref (exclusive); ``train`` -> train of its run folder
    (``run_dir``: WORKDIR, or WORKDIR/runs/NAME; exclusive) + ref (shared); ``eval`` -> ref (shared) +
    train (shared) of the run folder that ``model`` lies in, if any (:func:`run_folder`; none for the
    reference or a model outside every workdir)."""
    with ExitStack() as stack:
        refuse_links(folder, STAGE_OUTPUTS.get(stage, ()))
        if stage == "precompute":
            stack.enter_context(lock(folder, "ref"))
        elif stage == "train":
            stack.enter_context(lock(run_dir or folder, "train"))
            stack.enter_context(lock(folder, "ref", shared=True))
        elif stage == "eval":
            stack.enter_context(lock(folder, "ref", shared=True))
            owner = run_folder(model) if model is not None else None
            if owner is not None:
                stack.enter_context(lock(owner, "train", shared=True))
        else:
            raise ValueError(stage)
        yield
