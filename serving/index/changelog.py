"""A write-ahead log beside an index, so that every acknowledged change survives a crash.

An index directory (`remap_tf.serving.index`) is a snapshot: saving it rewrites every file,
which is far too slow to do for each added or deleted image. `DurableIndex` keeps the
snapshot plus an append-only log of the changes made since, in a file beside the index::

    photos.index/        the snapshot (Index.save: built aside, renamed into place)
    photos.index.wal     the change log (this module)

The log lives outside the index directory so that ``Index.save``'s directory swap never
touches it. A change is written to the log and fsync'ed before it is applied in memory and
before the caller is told it is done; on start the snapshot is loaded and the log replayed.
*Compaction* folds the log into a new snapshot: save the index (atomic directory swap, then
every file fsync'ed), then empty the log. Each step is crash-safe:

- every record carries a sequence number, and the snapshot records in its metadata
  (``change_log_seq``) the last sequence number it contains; replay skips records at or below
  it, so a crash after the save but before the log is emptied applies nothing twice;
- the log's header names the snapshot it extends (a fingerprint of its dimension and ids);
  records that are not yet in the snapshot are replayed only onto that snapshot, so an index
  rebuilt or changed behind the log's back is refused instead of silently mixed;
- a crash inside ``Index.save``'s swap (between renaming the old directory away and the new
  one in) is repaired on open: the complete new directory, or else the old one, is put back.

Log format (version 1): the header line ``REMAP-WAL 1 <32 hex fingerprint>\\n``, then records
``<uint32 length><uint32 CRC-32 of the payload><payload>`` (little-endian), each payload a
UTF-8 JSON object ``{"seq": n, "op": "add", "id": ..., "descriptor": <base64 float32>}`` or
``{"seq": n, "op": "delete", "id": ...}``. Records are appended one at a time and fsync'ed,
so only the last one can be torn by a crash: a bad record (short, zero-filled, wrong
checksum, unreadable) that reaches the end of the file is dropped with a warning and cut off;
a bad record followed by more data is corruption, and the log is refused.

The lock: a process holds an exclusive ``flock`` on the log while it has the index open, so
a second service, or ``remap index compact`` / ``add`` / ``delete`` while a service runs, is
refused instead of racing it.

Concurrency: searches share a reader-writer lock, a change holds it alone. An ``Index.add``
or ``delete`` is several steps (for ScaNN: the searcher's upsert or delete, then the id list),
so a search must never run between them; ScaNN's searches release the GIL and run in
parallel with each other, so readers are not serialised.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from remap_tf.errors import FileFormatError, InvalidInputError, UnknownIdError
from remap_tf.io import fsync_directory
from remap_tf.serving.index.base import Index, load_index
from remap_tf.serving.index.files import (
    REPLACED,
    WRITING,
    staged_copies,
    staging_path,
    staging_token,
    verify_index,
)

LOG_SUFFIX = ".wal"
SEQ_KEY = "change_log_seq"  # index.metadata: the last log record the snapshot contains
_MAGIC = b"REMAP-WAL 1 "
_HEADER_BYTES = len(_MAGIC) + 32 + 1
_RECORD = struct.Struct("<II")  # payload length, CRC-32 of the payload
MAX_RECORD_BYTES = 64 << 20

logger = logging.getLogger("remap_tf.serving.index.changelog")


class LogInUseError(FileFormatError):
    """Another process has the index (and its change log) open."""


def log_path(index_dir) -> Path:
    """The change log of an index directory: ``<parent>/<name>.wal``."""
    directory = Path(index_dir)
    return directory.parent / f"{directory.name}{LOG_SUFFIX}"


def fingerprint(index: Index) -> str:
    """32 hex digits naming an index's content by its dimension and ids (in order)."""
    digest = hashlib.sha256(f"{index.dim}\n{len(index)}\n".encode())
    for item in index.ids:
        digest.update(item.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()[:32]


# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One logged change: ``op`` "add" (with its descriptor, float32 (dim,)) or "delete"."""

    seq: int
    op: str
    id: str
    descriptor: np.ndarray | None = None


def encode_change(change: Change) -> bytes:
    """The record bytes (length, CRC-32, JSON payload) of a change."""
    body = {"seq": change.seq, "op": change.op, "id": change.id}
    if change.op == "add":
        vector = np.ascontiguousarray(change.descriptor, dtype="<f4")
        body["descriptor"] = base64.b64encode(vector.tobytes()).decode("ascii")
    payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
    return _RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def decode_change(payload: bytes) -> Change:
    """A change from a record's payload; ValueError if it is not one."""
    body = json.loads(payload.decode("utf-8"))
    if not isinstance(body, dict) or body.get("op") not in ("add", "delete"):
        raise ValueError("not a change record")
    seq, item = body.get("seq"), body.get("id")
    if not isinstance(seq, int) or seq <= 0 or not isinstance(item, str):
        raise ValueError("bad seq or id")
    if body["op"] == "delete":
        return Change(seq, "delete", item)
    raw = base64.b64decode(body.get("descriptor", ""), validate=True)
    if not raw or len(raw) % 4:
        raise ValueError("bad descriptor")
    return Change(seq, "add", item, np.frombuffer(raw, dtype="<f4").astype(np.float32))


@dataclass
class LogScan:
    """What `scan_log` read: the base fingerprint, the good changes, where they end, and a
    description of a torn last record that was dropped (None if there was none)."""

    base: str
    changes: list[Change]
    good_bytes: int
    torn: str | None = None


def _header(base: str) -> bytes:
    if len(base) != 32:
        raise ValueError("the base fingerprint has 32 hex digits")
    return _MAGIC + base.encode("ascii") + b"\n"


def scan_log(path, data: bytes | None = None) -> LogScan:
    """Reads a change log, checking every record.

    Raises:
        FileFormatError: not a change log, or a bad record followed by more data (corruption,
            not a torn write).
    """
    path = Path(path)
    data = path.read_bytes() if data is None else data
    header = data[:_HEADER_BYTES]
    if not header.startswith(_MAGIC) or header[-1:] != b"\n" or len(header) < _HEADER_BYTES:
        raise FileFormatError(f"{path} is not a remap-tf change log (bad header)")
    base = header[len(_MAGIC) : -1].decode("ascii", "replace")
    offset, size, changes, last_seq = _HEADER_BYTES, len(data), [], 0
    while offset < size:
        change, end, problem = _read_record(data, offset, last_seq)
        if problem is None:
            changes.append(change)
            last_seq = change.seq
            offset = end
            continue
        if end >= size or not data[offset:].strip(b"\0"):
            torn = f"{problem} at byte {offset} ({size - offset} bytes)"
            return LogScan(base, changes, offset, torn)
        raise FileFormatError(
            f"{path}: {problem} at byte {offset}, followed by {size - end} more bytes: the log "
            "is corrupt, not just cut short by a crash; restore it from a backup or move it "
            "away (its changes since the last compaction are then lost)"
        )
    return LogScan(base, changes, offset)


def _read_record(data: bytes, offset: int, last_seq: int):
    """``(change, end, problem)`` for the record at ``offset``; problem None when it is good."""
    size = len(data)
    if size - offset < _RECORD.size:
        return None, size, "incomplete record header"
    length, crc = _RECORD.unpack_from(data, offset)
    end = offset + _RECORD.size + length
    if length == 0 or length > MAX_RECORD_BYTES:
        return None, max(end, offset + _RECORD.size), f"invalid record length {length}"
    if end > size:
        return None, end, f"record cut short ({size - offset - _RECORD.size} of {length} bytes)"
    payload = data[offset + _RECORD.size : end]
    if zlib.crc32(payload) != crc:
        return None, end, "record checksum mismatch"
    try:
        change = decode_change(payload)
    except (ValueError, UnicodeDecodeError, binascii.Error) as error:
        return None, end, f"unreadable record ({error})"
    if change.seq <= last_seq:
        return None, end, f"sequence number {change.seq} after {last_seq}"
    return change, end, None


# ---------------------------------------------------------------------------------------
# The open log
# ---------------------------------------------------------------------------------------


class ChangeLog:
    """An open, locked change log: `append` (fsync'ed) and `reset` (emptied in place)."""

    def __init__(self, path: Path, fd: int, scan: LogScan):
        self.path = path
        self._fd = fd
        self.base = scan.base
        self.records = len(scan.changes)
        self.bytes = scan.good_bytes
        self.broken = ""  # why appends are refused: a failed one could not be cut back

    @classmethod
    def open(cls, path, base: str) -> tuple[ChangeLog, LogScan]:
        """Opens (creating it with ``base`` when absent) and locks a log, and reads it.

        A torn last record is cut off here, after a warning, so appends follow good data.

        Raises:
            LogInUseError: another process holds the log.
            FileFormatError: see `scan_log`.
        """
        path = Path(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LogInUseError(
                    f"{path} is locked by another process: a `remap serve` (or another remap "
                    "command) has this index open; stop it first"
                ) from None
            data = _read_all(fd)
            if not data:  # new, or created but never written (a crash right at creation)
                _rewrite(fd, _header(base), 0)
                fsync_directory(path.parent)  # the new file's name is durable too
                data = _header(base)
            scan = scan_log(path, data)
            if scan.torn:
                logger.warning(
                    "%s: dropped a torn last record (%s); it was never acknowledged",
                    path,
                    scan.torn,
                )
                os.ftruncate(fd, scan.good_bytes)
                os.fsync(fd)
            return cls(path, fd, scan), scan
        except BaseException:
            os.close(fd)
            raise

    def append(self, change: Change) -> None:
        """Writes one record and fsyncs it: once this returns, the change survives a crash.

        A write or fsync that fails (a full disk) is cut back to the previous end, fsync'ed,
        before the error is raised, so a later append can follow good data once there is room
        again. Should cutting back fail too, ``broken`` says why and every later append is
        refused (the partial record stays at the end, where a restart drops it).

        Raises:
            OSError: the record could not be written (nothing of it is left in the log), or
                the log is ``broken``.
        """
        if self.broken:
            raise OSError(errno.EIO, self.broken)
        record = encode_change(change)
        try:
            written = 0
            while written < len(record):
                written += os.pwrite(self._fd, record[written:], self.bytes + written)
            os.fsync(self._fd)
        except OSError:
            self._cut_back()
            raise
        self.bytes += len(record)
        self.records += 1

    def _cut_back(self) -> None:
        """Truncates the log to its last good record after a failed append."""
        try:
            os.ftruncate(self._fd, self.bytes)
            os.fsync(self._fd)
        except OSError as error:
            self.broken = (
                f"a failed write left a partial record at the end of {self.path} that could "
                f"not be cut off ({error.strerror or error}); restart to drop it"
            )
            logger.error("%s", self.broken)

    def reset(self, base: str) -> None:
        """Empties the log in place (the lock stays held) and names a new base snapshot.

        Crash-safe in any order: the records it drops are all in the saved snapshot, which
        replay recognises by their sequence numbers.
        """
        _rewrite(self._fd, _header(base), _HEADER_BYTES)
        self.broken = ""  # a partial record a failed append left is gone with the rest
        self.base = base
        self.records = 0
        self.bytes = _HEADER_BYTES

    def close(self) -> None:
        """Releases the lock and the file."""
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = -1


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _rewrite(fd: int, header: bytes, size: int) -> None:
    """Truncates to ``size`` bytes, writes ``header`` at the start, fsyncs."""
    os.ftruncate(fd, size)
    os.pwrite(fd, header, 0)
    os.fsync(fd)


# ---------------------------------------------------------------------------------------
# Reader-writer lock
# ---------------------------------------------------------------------------------------


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no starvation)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ---------------------------------------------------------------------------------------
# The durable index
# ---------------------------------------------------------------------------------------


def recover_interrupted_save(directory) -> str | None:
    """Puts an index directory back after a crash inside ``Index.save``'s swap.

    ``Index.save`` (`remap_tf.serving.index.files.staged_index_dir`) renames the old directory
    to ``.<name>.old-<token>`` and then the complete new one from ``.<name>.tmp-<token>``; a
    crash between the two leaves no ``directory``.
    The new one is restored when it verifies, else the old one.

    Returns:
        What was restored (a description), or None when nothing needed it.
    """
    directory = Path(directory)
    if directory.exists() or not directory.parent.is_dir():
        return None
    for stage in (WRITING, REPLACED):
        for candidate in staged_copies(directory, stage):
            try:
                verify_index(candidate)
            except (OSError, FileFormatError):
                continue
            os.replace(candidate, directory)
            fsync_directory(directory.parent)
            logger.warning(
                "%s was missing after an interrupted save; restored %s", directory, candidate.name
            )
            if stage == WRITING:  # the save had finished writing: its predecessor can go
                old = staging_path(directory, REPLACED, staging_token(candidate))
                shutil.rmtree(old, ignore_errors=True)
            return candidate.name
    return None


def _fsync_tree(directory: Path) -> None:
    """Flushes every file of a saved index, the directory and its parent to disk."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir():
            fsync_directory(path)
    fsync_directory(directory)
    fsync_directory(directory.parent)


def _pending(path: Path, index: Index, scan: LogScan) -> list[Change]:
    """The logged changes the snapshot ``index`` does not contain yet.

    Raises:
        FileFormatError: there are some, but the log extends another snapshot.
    """
    pending = [c for c in scan.changes if c.seq > int(index.metadata.get(SEQ_KEY, 0))]
    if pending and scan.base != fingerprint(index):
        raise FileFormatError(
            f"{path} holds {len(pending)} change(s) made to another version of the index "
            "beside it (it was rebuilt or changed outside this log); move the log away to use "
            "the index as it is on disk"
        )
    return pending


def load_current(index_dir) -> Index:
    """An index as a service would see it: the snapshot with its change log replayed.

    Read-only: no lock is taken and nothing is written, so it works beside a running
    service (a record being written at that moment counts as not there yet).
    """
    directory = Path(index_dir)
    index = load_index(directory)
    path = log_path(directory)
    if path.is_file():
        _apply(index, _pending(path, index, scan_log(path)))
    return index


def pending_changes(index_dir, snapshot: Index) -> int:
    """How many logged changes ``snapshot`` (the index loaded from ``index_dir``) does not
    contain yet (0 without a log)."""
    path = log_path(index_dir)
    if not path.is_file():
        return 0
    seq = int(snapshot.metadata.get(SEQ_KEY, 0))
    return sum(1 for c in scan_log(path).changes if c.seq > seq)


def _apply(index: Index, changes: Sequence[Change]) -> None:
    """Replays changes in order, consecutive additions (or deletions) in one call."""
    start = 0
    while start < len(changes):
        op = changes[start].op
        stop = start
        while stop < len(changes) and changes[stop].op == op:
            stop += 1
        group = changes[start:stop]
        ids = [c.id for c in group]
        if op == "add":
            index.add(ids, np.stack([c.descriptor for c in group]))
        else:
            index.delete(ids)
        start = stop


class DurableIndex:
    """An `Index` plus its change log: changes are logged (fsync'ed) before they apply.

    Open with `DurableIndex.open`; search with `search` (concurrent searches share a lock);
    change with `add` and `delete` (each returns once the change is on disk and visible);
    fold the log into the snapshot with `compact`; `close` releases the log's lock.

    Args:
        directory: the index directory.
        index: the loaded index, with the log already replayed.
        log: the open change log.
        seq: the last sequence number applied.
        compact_after: compact automatically (in a background thread) once the log holds
            this many records (0: never).
    """

    def __init__(self, directory, index: Index, log: ChangeLog, seq: int, compact_after: int = 0):
        self.directory = Path(directory)
        self.index = index
        self.log = log
        self.seq = seq
        self.compact_after = int(compact_after)
        self.lock = ReadWriteLock()  # searches share it; applying a change holds it alone
        self._changes = threading.Lock()  # one change (or compaction) at a time
        self._compacting = False
        self._retry_at = 0  # after a failed automatic compaction: wait for more changes
        self.compactions = 0
        self.replayed = 0

    @classmethod
    def open(cls, directory, compact_after: int = 0) -> DurableIndex:
        """Loads the snapshot, locks and replays its log.

        Raises:
            LogInUseError: another process has the index open.
            FileFormatError: a corrupt log, or unapplied changes logged against another
                snapshot than the one on disk.
        """
        directory = Path(directory)
        recover_interrupted_save(directory)
        index = load_index(directory)
        snapshot_seq = int(index.metadata.get(SEQ_KEY, 0))
        base = fingerprint(index)
        log, scan = ChangeLog.open(log_path(directory), base)
        try:
            pending = _pending(log.path, index, scan)
            _apply(index, pending)
            seq = max([snapshot_seq] + [c.seq for c in scan.changes])
            if not pending and (scan.changes or scan.base != base):
                log.reset(base)  # everything logged is in the snapshot already
        except BaseException:
            log.close()
            raise
        store = cls(directory, index, log, seq, compact_after)
        store.replayed = len(pending)
        return store

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, item: str) -> bool:
        return item in self.index

    @property
    def dim(self) -> int:
        return self.index.dim

    @property
    def metadata(self) -> dict:
        return self.index.metadata

    def search(self, queries, k: int):
        """``Index.search`` under the shared lock: never sees a change half applied."""
        with self.lock.read():
            return self.index.search(queries, k=k)

    def add(self, item: str, descriptor) -> int:
        """Logs, then applies, one addition; returns the index size after it.

        Raises:
            InvalidInputError: the id is already indexed, or the descriptor does not fit.
        """
        if not isinstance(item, str) or not item:
            raise InvalidInputError(f"an id must be a non-empty string, got {item!r}")
        vector = np.asarray(descriptor, dtype=np.float32).reshape(-1)
        if vector.shape != (self.index.dim,) or not np.all(np.isfinite(vector)):
            raise InvalidInputError(
                f"descriptor for {item!r} has shape {vector.shape} (finite float "
                f"({self.index.dim},) expected)"
            )
        with self._changes:
            if item in self.index:
                raise InvalidInputError(f"{item!r} is already in the index (delete it first)")
            self.seq += 1
            self.log.append(Change(self.seq, "add", item, vector))
            with self.lock.write():
                self.index.add([item], vector[None, :])
            size = len(self.index)
        self._maybe_compact()
        return size

    def delete(self, item: str) -> int:
        """Logs, then applies, one deletion; returns the index size after it.

        Raises:
            UnknownIdError: the id is not indexed.
        """
        with self._changes:
            if item not in self.index:
                raise UnknownIdError(f"{item!r} is not in the index")
            self.seq += 1
            self.log.append(Change(self.seq, "delete", item))
            with self.lock.write():
                self.index.delete([item])
            size = len(self.index)
        self._maybe_compact()
        return size

    def compact(self) -> dict:
        """Folds the log into a new snapshot: save (atomic, fsync'ed), then empty the log.

        Searches go on meanwhile; changes wait until it is done.

        Returns:
            ``{"index", "count", "folded": records folded, "seq"}``.
        """
        with self._changes:
            folded = self.log.records
            with self.lock.read():
                self.index.metadata[SEQ_KEY] = self.seq
                self.index.save(self.directory)
                _fsync_tree(self.directory)
                base = fingerprint(self.index)
            self.log.reset(base)
            self.compactions += 1
            return {
                "index": str(self.directory),
                "count": len(self.index),
                "folded": folded,
                "seq": self.seq,
            }

    @property
    def compacting(self) -> bool:
        """Whether an automatic compaction is running in the background."""
        return self._compacting

    def _maybe_compact(self) -> None:
        threshold = max(self.compact_after, self._retry_at)
        if not self.compact_after or self.log.records < threshold:
            return
        with self._changes:
            if self._compacting:
                return
            self._compacting = True
        threading.Thread(target=self._compact_in_background, daemon=True).start()

    def _compact_in_background(self) -> None:
        try:
            result = self.compact()
            self._retry_at = 0
            logger.info("compacted %s: %d change(s) folded", self.directory, result["folded"])
        except Exception:  # logged; the log keeps every change, nothing is lost
            self._retry_at = self.log.records + self.compact_after
            logger.exception("automatic compaction of %s failed", self.directory)
        finally:
            self._compacting = False

    def close(self) -> None:
        """Waits for a change or compaction in progress, then releases the log (and its
        lock); the index stays usable in memory."""
        with self._changes:
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------
# A rebuild over a change log
# ---------------------------------------------------------------------------------------


def _carried_over(path: Path, index_dir: Path, scan: LogScan) -> tuple[list[Change], dict]:
    """``(changes, metadata)``: the changes of a log a rebuild of ``index_dir`` must keep, and
    the metadata of the snapshot on disk. The changes are every record (those a compaction
    already put into the snapshot are acknowledged changes too, which a rebuild from the
    images would undo), provided the log extends the snapshot on disk.

    Raises:
        FileFormatError: the log holds changes not in the snapshot but extends another one
            (or the snapshot is gone): they cannot be placed.
    """
    if not scan.changes:
        return [], {}
    recover_interrupted_save(index_dir)
    if not index_dir.is_dir():
        raise FileFormatError(
            f"{path} holds {len(scan.changes)} change(s) a `remap serve` acknowledged to an "
            f"index that is no longer at {index_dir}; put it back, or move the log away to "
            "drop them"
        )
    old = load_index(index_dir)
    try:
        _pending(path, old, scan)
    except FileFormatError as error:
        raise FileFormatError(f"cannot rebuild {index_dir} over it: {error}") from None
    return scan.changes, dict(old.metadata)


def _fold(index: Index, changes: Sequence[Change], same_model: bool = True) -> None:
    """Puts the net effect of ``changes`` on ``index``: an id whose last change is a delete
    is removed; one whose last change is an add is kept as rebuilt when the rebuild has it
    (its descriptor is fresh), else added with the logged descriptor, which must come from
    the rebuild's model (``same_model``, and the same size)."""
    last = {change.id: change for change in changes}
    deleted = [item for item, change in last.items() if change.op == "delete" and item in index]
    added = [change for change in last.values() if change.op == "add" and change.id not in index]
    if deleted:
        index.delete(deleted)
    if not added:
        return
    vectors = np.stack([change.descriptor for change in added])
    if vectors.shape[1] != index.dim or not same_model:
        raise FileFormatError(
            f"{len(added)} addition(s) a `remap serve` acknowledged (such as "
            f"{added[0].id!r}) hold descriptors of the model the index was served with, not "
            "of the rebuild's: rebuild with that model, or move the log away to drop them"
        )
    index.add([change.id for change in added], vectors)


def check_rebuild(index_dir, foldable: bool = True) -> int:
    """Refuses early a rebuild that could not keep the changes logged beside ``index_dir``;
    returns how many there are (0 without a log).

    Raises:
        LogInUseError: a service has the index open.
        FileFormatError: the changes cannot be placed (see `save_rebuilt`), or there are
            some and ``foldable`` is False (a build that publishes itself, such as a sharded
            one, cannot fold them in).
    """
    directory = Path(index_dir)
    path = log_path(directory)
    if not path.is_file():
        return 0
    log, scan = ChangeLog.open(path, "0" * 32)
    try:
        changes, _ = _carried_over(path, directory, scan)
    finally:
        log.close()
    if changes and not foldable:
        raise FileFormatError(
            f"{path} holds {len(changes)} change(s) a `remap serve` acknowledged, which a "
            "sharded build cannot fold in yet: build without --shards / --shard-memory (that "
            "folds them in), or move the log away to drop them"
        )
    return len(changes)


def save_rebuilt(index: Index, index_dir, same_model=None) -> int:
    """Publishes a rebuilt ``index`` at ``index_dir`` keeping every change a service logged.

    Without a change log this is ``index.save``. With one, the log is locked (a running
    service is refused), its changes are folded into ``index`` (`_fold`: an acknowledged
    delete stays deleted, an acknowledged add stays), the snapshot records the log's last
    sequence number (``SEQ_KEY``), is saved and fsync'ed, and only then is the log emptied
    for the new snapshot. A crash before the save leaves the old snapshot and its log; one
    after it, a snapshot that contains every record, which replay then skips.

    ``same_model(old_metadata, new_metadata)``: whether the old snapshot's model (whose
    descriptors the logged additions hold) is the rebuild's; None: assumed.

    Returns:
        How many logged changes were folded in.

    Raises:
        LogInUseError: a service has the index open.
        FileFormatError: the log cannot be placed: corrupt, or changes logged against
            another snapshot, or additions embedded with another model.
    """
    directory = Path(index_dir)
    path = log_path(directory)
    if not path.is_file():
        index.save(directory)
        return 0
    log, scan = ChangeLog.open(path, fingerprint(index))
    try:
        changes, old = _carried_over(path, directory, scan)
        fits = not changes or same_model is None or same_model(old, index.metadata)
        _fold(index, changes, fits)
        index.metadata[SEQ_KEY] = max([int(old.get(SEQ_KEY, 0))] + [c.seq for c in scan.changes])
        index.save(directory)
        _fsync_tree(directory)
        log.reset(fingerprint(index))
    finally:
        log.close()
    if changes:
        logger.info("%s: folded %d logged change(s) into the rebuild", directory, len(changes))
    return len(changes)


def compact_index(index_dir) -> dict:
    """Folds an index's change log into its snapshot (``remap index compact``).

    Returns:
        ``{"index", "count", "folded", "seq"}``; ``folded`` is 0 when the log was empty (the
        snapshot is then left as it is).

    Raises:
        LogInUseError: a service has the index open.
    """
    with DurableIndex.open(index_dir) as store:
        if not store.log.records:
            return {
                "index": str(store.directory),
                "count": len(store),
                "folded": 0,
                "seq": store.seq,
            }
        return store.compact()
