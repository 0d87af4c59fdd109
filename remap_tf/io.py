"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every file the project writes (configs, reports, figures, manifests, index files, embedding
shards, Keras checkpoints, benchmark sections) goes through `atomic_write` or `atomic_save`,
so a crash, a kill or Ctrl-C never leaves a truncated file behind:

- `atomic_write(path, write)`: ``write(handle)`` fills a temporary file beside ``path``;
  `atomic_write_bytes`, `atomic_write_text` and `atomic_write_json` are built on it;
- `atomic_save(path, save)`: for writers that want a file name (``model.save``,
  ``np.save``): ``save(temporary_name)`` writes it.

The temporary file is created with mode ``0o666`` minus the process umask, as ``open()``
would, so results are readable by others under the usual umask 022 (0644), not 0600.
Standard library only: importing this module does not import TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "atomic_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "defer_interrupt",
    "fsync_directory",
    "give_folders_the_umask",
    "remove_stale",
    "staging_name",
    "uninterruptible",
]

# Commit steps that must not be cut in half by Ctrl-C (see `uninterruptible`).
_commit = threading.local()


def _temporary_name(path: Path, suffix: str = ".tmp") -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"


def staging_name(prefix: str) -> str:
    """``<prefix><pid>@<host>~<random>``: a name for work written aside before a rename.

    The name says which process on which machine writes it, so that `remove_stale` can tell
    a leftover of a killed process (``kill -9``, a power loss) from work in progress.
    """
    return f"{prefix}{os.getpid()}@{socket.gethostname()}~{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale(folder, prefix: str) -> list[Path]:
    """Removes the `staging_name` entries of ``prefix`` in ``folder`` whose writer is gone.

    Only entries written on this machine by a process that no longer runs are removed; those
    of running processes, of other machines (a shared file system) and any other name are
    left alone.

    Returns:
        The entries removed.
    """
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)@(.+)~[0-9a-f]+")
    host, removed = socket.gethostname(), []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or match.group(2) != host or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _blame(error: BaseException, path: Path, tmp: Path) -> None:
    """Names ``path`` in an OSError raised while writing it: a write() that hits a full disk
    names no file, and the temporary name means nothing to the user."""
    if isinstance(error, OSError) and error.filename in (None, os.fspath(tmp)):
        error.filename = os.fspath(path)


def current_umask() -> int:
    """The process umask, read without changing it where Linux's /proc tells it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read (set, then put back at once)
    os.umask(mask)
    return mask


def give_folders_the_umask(root) -> None:
    """Sets ``root`` and every folder under it to ``0o777`` minus the umask, as ``mkdir`` does.

    TensorFlow's file system creates folders with mode 0755 whatever the umask, so a
    SavedModel written under a group-shared umask 002 got 755 folders in 775 ones; the files
    it writes already honour the umask.
    """
    mode = 0o777 & ~current_umask()
    for folder, _, _ in os.walk(root):
        os.chmod(folder, mode)


def fsync_directory(directory) -> None:
    """Flushes a folder's entries (a rename into it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def uninterruptible():
    """A commit step (a few renames) that an interrupt must not cut in half.

    A signal handler that calls `defer_interrupt` while the block runs has its exception
    raised when the block ends, so the step completes first. Without such a handler (plain
    Python's Ctrl-C), this does nothing. Used around the renames that publish a result: an
    export's version folder, an index's directory swap.
    """
    _commit.depth = getattr(_commit, "depth", 0) + 1
    try:
        yield
    finally:
        _commit.depth -= 1
        pending = getattr(_commit, "pending", None)
        if _commit.depth == 0 and pending is not None:
            _commit.pending = None
            raise pending


def defer_interrupt(exception: BaseException) -> bool:
    """True if an `uninterruptible` step is running: ``exception`` is raised when it ends."""
    if getattr(_commit, "depth", 0) > 0:
        _commit.pending = exception
        return True
    return False


def atomic_write(path, write: Callable[[BinaryIO], object], fsync: bool = True) -> Path:
    """Writes ``path`` through ``write(handle)`` on a temporary file, then renames it.

    The parent folder is created if missing. On any failure (an exception in ``write``, a
    full disk, KeyboardInterrupt) the temporary file is removed and ``path`` is left as it
    was.

    Args:
        path: the file to write.
        write: called with a binary file handle open for writing.
        fsync: flush the data and the rename to disk before returning (durable after a
            power loss, not just after a crash of this process).

    Returns:
        ``path`` as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    # O_EXCL: never write through a file (or link) someone else put at the temporary name.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        _blame(error, path, tmp)
        raise
    if fsync:
        fsync_directory(path.parent)
    return path


def atomic_save(path, save: Callable[[str], object]) -> Path:
    """Calls ``save(temporary_name)`` beside ``path``, then renames the result to ``path``.

    For writers that open the file themselves (``model.save``, ``model.save_weights``,
    ``np.save``). The temporary name ends like ``path`` (``.keras``, ``.weights.h5``, ``.npy``)
    so the writer recognises the format; it does not exist when ``save`` is called.

    Returns:
        ``path`` as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    suffix = ".weights.h5" if name.endswith(".weights.h5") else path.suffix
    tmp = _temporary_name(path, suffix=suffix)
    try:
        save(os.fspath(tmp))
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        _blame(error, path, tmp)
        raise
    fsync_directory(path.parent)
    return path


def atomic_write_bytes(path, data: bytes, fsync: bool = True) -> Path:
    """`atomic_write` of ``data``."""
    return atomic_write(path, lambda handle: handle.write(data), fsync=fsync)


def atomic_write_text(path, text: str, fsync: bool = True) -> Path:
    """`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path, value, indent: int | None = 2, fsync: bool = True) -> Path:
    """`atomic_write_text` of ``value`` as JSON (UTF-8, non-ASCII kept) with a final newline."""
    text = json.dumps(value, indent=indent, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text, fsync=fsync)
