"""The change log beside an index (`remap_tf.serving.index.changelog`): replay, torn records,
compaction at every crash point, the lock, and searches racing changes."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time

import numpy as np
import pytest

from remap_cli import main as cli
from remap_tf.errors import FileFormatError, InvalidInputError, UnknownIdError
from remap_tf.serving.index import ExactIndex, ScannIndex, changelog, load_index
from remap_tf.serving.index.changelog import (
    ChangeLog,
    DurableIndex,
    LogInUseError,
    ReadWriteLock,
    compact_index,
    load_current,
    log_path,
    scan_log,
)


def _vectors(n, dim=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _saved(tmp_path, n=6, dim=8, name="idx"):
    index = ExactIndex(dim)
    index.add([f"base{i}" for i in range(n)], _vectors(n, dim))
    index.metadata = {"image_root": str(tmp_path)}
    return index.save(tmp_path / name)


def _changed(directory, adds=2, deletes=("base1",), dim=8):
    """Opens, logs ``adds`` additions and the deletions, closes without compacting."""
    new = _vectors(adds, dim, seed=7)
    with DurableIndex.open(directory) as store:
        for i in range(adds):
            store.add(f"new{i}", new[i])
        for item in deletes:
            store.delete(item)
    return new


def test_changes_survive_a_reopen_and_replay_in_order(tmp_path):
    directory = _saved(tmp_path)
    new = _changed(directory)
    assert load_index(directory).ids == [f"base{i}" for i in range(6)]  # snapshot untouched
    with DurableIndex.open(directory) as store:
        assert store.replayed == 3 and store.log.records == 3
        assert set(store.index.ids) == {"base0", "base2", "base3", "base4", "base5", "new0", "new1"}
        ids, scores = store.search(new[1:2], k=1)
        assert ids[0, 0] == "new1" and scores[0, 0] == pytest.approx(1.0, abs=1e-6)
        with pytest.raises(InvalidInputError, match="already in the index"):
            store.add("new0", new[0])
        with pytest.raises(UnknownIdError, match="base1"):
            store.delete("base1")
        with pytest.raises(InvalidInputError, match="shape"):
            store.add("bad", np.zeros(3, np.float32))
        assert store.log.records == 3  # refused changes are not logged
    # Without taking the lock, `remap search` sees the same thing.
    assert sorted(load_current(directory).ids) == sorted(store.index.ids)


def test_delete_then_add_again_replays_to_the_latest_vector(tmp_path):
    directory = _saved(tmp_path)
    replacement = _vectors(1, seed=99)[0]
    with DurableIndex.open(directory) as store:
        store.delete("base2")
        store.add("base2", replacement)
    current = load_current(directory)
    ids, scores = current.search(replacement[None], k=1)
    assert ids[0, 0] == "base2" and scores[0, 0] == pytest.approx(1.0, abs=1e-6)


def _torn(kind, record: bytes) -> bytes:
    if kind == "partial header":
        return record[:5]
    if kind == "cut payload":
        return record[: len(record) // 2]
    if kind == "bad checksum":
        return record[:-1] + bytes([record[-1] ^ 0xFF])
    return b"\0" * len(record)  # "zero filled": the size grew, the data never landed


@pytest.mark.parametrize("kind", ["partial header", "cut payload", "bad checksum", "zero filled"])
def test_a_torn_last_record_is_dropped_with_a_warning(tmp_path, caplog, kind):
    directory = _saved(tmp_path)
    _changed(directory, adds=1, deletes=())
    path = log_path(directory)
    good = path.read_bytes()
    record = changelog.encode_change(changelog.Change(2, "add", "torn.png", _vectors(1)[0]))
    path.write_bytes(good + _torn(kind, record))
    with caplog.at_level(logging.WARNING, logger="remap_tf.serving.index.changelog"):
        store = DurableIndex.open(directory)
    with store:
        assert "torn last record" in caplog.text
        assert "torn.png" not in store and "new0" in store  # never half applied
        assert path.read_bytes() == good  # cut off, so the next record follows good data
        store.add("after.png", _vectors(1, seed=3)[0])
    assert [c.id for c in scan_log(path).changes] == ["new0", "after.png"]


def test_a_bad_record_followed_by_more_data_is_refused(tmp_path):
    directory = _saved(tmp_path)
    _changed(directory, adds=2, deletes=())
    path = log_path(directory)
    data = bytearray(path.read_bytes())
    data[changelog._HEADER_BYTES + 20] ^= 0xFF  # inside the first record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="corrupt, not just cut short"):
        DurableIndex.open(directory)
    path.write_bytes(b"something else entirely\n")
    with pytest.raises(FileFormatError, match="not a remap-tf change log"):
        DurableIndex.open(directory)


def test_compaction_folds_the_log_into_the_snapshot(tmp_path, capsys):
    directory = _saved(tmp_path)
    _changed(directory)
    assert cli.main(["index", "info", "--index", str(directory)]) == 0
    assert "3 change(s) not compacted yet" in capsys.readouterr().out
    assert cli.main(["index", "compact", "--index", str(directory)]) == 0
    assert "3 change(s) folded, 7 images" in capsys.readouterr().out
    snapshot = load_index(directory)
    assert "new1" in snapshot and "base1" not in snapshot
    assert snapshot.metadata[changelog.SEQ_KEY] == 3
    assert snapshot.metadata["image_root"] == str(tmp_path)  # the rest of the metadata kept
    assert scan_log(log_path(directory)).changes == []
    assert compact_index(directory)["folded"] == 0


def test_a_crash_between_the_save_and_emptying_the_log_applies_nothing_twice(tmp_path, monkeypatch):
    directory = _saved(tmp_path)
    _changed(directory)
    store = DurableIndex.open(directory)

    def crash(self, base):
        raise KeyboardInterrupt("killed after the save")

    monkeypatch.setattr(ChangeLog, "reset", crash)
    with pytest.raises(KeyboardInterrupt):
        store.compact()
    store.close()
    monkeypatch.undo()
    assert len(scan_log(log_path(directory)).changes) == 3  # still there, and in the snapshot
    with DurableIndex.open(directory) as reopened:  # a double add would raise here
        assert reopened.replayed == 0 and reopened.log.records == 0
        assert sorted(reopened.index.ids) == sorted(store.index.ids)
        reopened.add("later", _vectors(1, seed=5)[0])
        assert reopened.seq == 4  # numbering continues after the folded records


@pytest.mark.parametrize("left", ["new and old", "old only"])
def test_a_crash_inside_the_directory_swap_is_repaired(tmp_path, left):
    """Index.save renames the old directory away, then the new one in; a crash between the
    two leaves no index directory. Opening puts the complete one back."""
    directory = _saved(tmp_path)
    _changed(directory)
    with DurableIndex.open(directory) as store:
        store.compact()
        expected = sorted(store.index.ids)
    if left == "new and old":
        shutil.copytree(directory, tmp_path / ".idx.tmp-1234abcd")
        old = _saved(tmp_path, name="previous")
        os.replace(old, tmp_path / ".idx.old-1234abcd")
        shutil.rmtree(directory)
    else:
        os.replace(directory, tmp_path / ".idx.old-1234abcd")
    with DurableIndex.open(directory) as store:
        assert sorted(store.index.ids) == expected
    assert not list(tmp_path.glob(".idx.tmp-*")) and not list(tmp_path.glob(".idx.old-*"))


def test_changes_logged_against_another_snapshot_are_refused(tmp_path):
    directory = _saved(tmp_path)
    _changed(directory)
    shutil.rmtree(directory)
    _saved(tmp_path, n=4)  # rebuilt with other contents behind the log's back
    with pytest.raises(FileFormatError, match="another version of the index"):
        DurableIndex.open(directory)
    with pytest.raises(FileFormatError, match="another version of the index"):
        load_current(directory)


def test_the_log_is_locked_while_open(tmp_path, capsys):
    directory = _saved(tmp_path)
    with DurableIndex.open(directory):
        with pytest.raises(LogInUseError, match="locked by another process"):
            DurableIndex.open(directory)
        assert cli.main(["index", "compact", "--index", str(directory)]) == 2
        assert "remap serve" in capsys.readouterr().err
    assert compact_index(directory)["count"] == 6  # free again once closed


def test_read_write_lock_shares_reads_and_excludes_writes():
    lock = ReadWriteLock()
    inside, events = threading.Barrier(2, timeout=5), []

    def reader():
        with lock.read():
            inside.wait()  # both readers are inside at once, or this times out

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join()
    with lock.write():
        blocked = threading.Thread(target=lambda: (lock.read().__enter__(), events.append("r")))
        blocked.start()
        blocked.join(timeout=0.2)
        assert events == []  # a reader waits while the writer holds the lock
    blocked.join(timeout=5)
    assert events == ["r"]


def test_searches_racing_changes_never_see_one_half_applied(tmp_path):
    """The ScaNN thread-safety check: 4 threads search while a writer adds and deletes.

    Every returned (id, score) must match that id's true vector, an id whose addition was
    acknowledged before a search started (and not being deleted) must come first for its own
    vector, and an id whose deletion was acknowledged before must never come back. The
    interpreter switches threads every 10 us to give interleavings a chance. (Without the
    lock, this test caught a wrong id-score pairing in 1 of 6 runs.)
    """
    dim, base, extra = 16, 2000, 300
    x = _vectors(base + extra, dim, seed=1)
    truth = {f"v{i}": x[i] for i in range(base + extra)}
    index = ScannIndex(dim, mode="brute_force")
    index.add([f"v{i}" for i in range(base)], x[:base])
    index.save(tmp_path / "idx")
    store = DurableIndex.open(tmp_path / "idx")
    acked_added, deleting, acked_deleted = set(), set(), set()
    failures, done = [], threading.Event()

    def searcher(seed):
        rng = np.random.default_rng(seed)
        while not done.is_set():
            i = int(rng.integers(base, base + extra))
            deleted = set(acked_deleted)  # read before the others: a subset of deleting
            added, leaving = set(acked_added), set(deleting)
            ids, scores = store.search(x[i : i + 1], k=3)
            for item, score in zip(ids[0], scores[0], strict=True):
                if item is not None and abs(float(truth[item] @ x[i]) - float(score)) > 1e-4:
                    failures.append(f"{item} scored {score}")
                if item in deleted:
                    failures.append(f"deleted {item} returned")
            name = f"v{i}"
            if name in added and name not in leaving and ids[0, 0] != name:
                failures.append(f"added {name} not found first: {ids[0]}")

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(4)]
    try:
        for thread in threads:
            thread.start()
        for i in range(base, base + extra):
            store.add(f"v{i}", x[i])
            acked_added.add(f"v{i}")
            if i % 3 == 0:
                deleting.add(f"v{i}")
                store.delete(f"v{i}")
                acked_deleted.add(f"v{i}")
    finally:
        done.set()
        for thread in threads:
            thread.join()
        sys.setswitchinterval(previous)
        store.close()
    assert failures == []
    assert len(store) == base + extra - len(acked_deleted)


@pytest.mark.slow
def test_compaction_under_concurrent_searches_and_changes_on_a_tree_index(tmp_path):
    """ScaNN tree + AH + re-ordering (the 100k+ configuration, forced on 20k vectors): 3
    threads search while 600 changes are made and the log compacts every 150 of them in the
    background (save under the shared lock). Every result must score as its id's true vector
    (re-ordering makes AH scores exact), no acknowledged deletion may come back, and reopening
    the saved snapshot plus log must give the same index."""
    dim, base, extra = 32, 20_000, 600
    x = _vectors(base + extra, dim, seed=4)
    truth = {f"v{i}": x[i] for i in range(base + extra)}
    index = ScannIndex(dim, mode="tree_ah", num_leaves=100, num_leaves_to_search=100)
    index.add([f"v{i}" for i in range(base)], x[:base])
    index.save(tmp_path / "idx")
    store = DurableIndex.open(tmp_path / "idx", compact_after=150)
    deleted, failures, done, searches = set(), [], threading.Event(), [0]

    def searcher(seed):
        rng = np.random.default_rng(seed)
        while not done.is_set():
            i = int(rng.integers(0, base + extra))
            gone = set(deleted)
            ids, scores = store.search(x[i : i + 1], k=5)
            searches[0] += 1
            for item, score in zip(ids[0], scores[0], strict=True):
                if item is not None and abs(float(truth[item] @ x[i]) - float(score)) > 1e-3:
                    failures.append(f"{item} scored {score}")
                if item in gone:
                    failures.append(f"deleted {item} returned")

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    try:
        for thread in threads:
            thread.start()
        for i in range(base, base + extra):
            store.add(f"v{i}", x[i])
            if i % 2:
                store.delete(f"v{i - base}")
                deleted.add(f"v{i - base}")
        deadline = time.time() + 120
        while store.compacting and time.time() < deadline:
            time.sleep(0.1)
    finally:
        done.set()
        for thread in threads:
            thread.join()
        store.close()
    assert failures == [] and searches[0] > 100
    assert store.compactions >= 3
    reopened = load_current(tmp_path / "idx")
    assert sorted(reopened.ids) == sorted(store.index.ids)
    assert load_index(tmp_path / "idx").metadata[changelog.SEQ_KEY] >= 450


def test_a_failed_append_is_cut_back_so_later_appends_follow_good_data(tmp_path, monkeypatch):
    """Issue 21 leftover: an append that failed half-way (a full disk) left its partial
    record at the end of the log, so no later record could follow it. The log is truncated
    back to the previous end (fsync'ed) before the error is raised; when even that fails,
    the log says it is ``broken`` and refuses appends."""
    directory = _saved(tmp_path)
    real = os.pwrite

    def half_then_full(fd, data, offset):
        real(fd, data[: len(data) // 2], offset)
        raise OSError(28, "No space left on device")

    def failing_truncate(fd, size):
        raise OSError(5, "Input/output error")

    with DurableIndex.open(directory) as store:
        store.add("new0", _vectors(1, seed=3)[0])
        good = log_path(directory).read_bytes()
        monkeypatch.setattr(os, "pwrite", half_then_full)
        with pytest.raises(OSError, match="No space left"):
            store.add("lost", _vectors(1, seed=4)[0])
        assert log_path(directory).read_bytes() == good and "lost" not in store
        monkeypatch.setattr(os, "pwrite", real)
        store.add("new1", _vectors(1, seed=5)[0])
        store.delete("base0")
        assert not store.log.broken
        monkeypatch.setattr(os, "pwrite", half_then_full)
        monkeypatch.setattr(os, "ftruncate", failing_truncate)
        with pytest.raises(OSError, match="No space left"):
            store.add("lost", _vectors(1, seed=4)[0])
        assert "could not be cut off" in store.log.broken
        monkeypatch.setattr(os, "pwrite", real)
        with pytest.raises(OSError, match="could not be cut off"):
            store.delete("base2")
        assert "base2" in store
    monkeypatch.undo()
    scan = scan_log(log_path(directory))
    assert [(c.op, c.id) for c in scan.changes] == [
        ("add", "new0"),
        ("add", "new1"),
        ("delete", "base0"),
    ]
    assert scan.torn is not None  # the partial record a restart drops
    assert sorted(load_current(directory).ids) == sorted(
        ["base1", "base2", "base3", "base4", "base5", "new0", "new1"]
    )


def _rebuild(tmp_path, directory, n=6, dim=8, name="emb", **kwargs):
    """``remap index build`` over ``directory`` from descriptors of base0..base<n-1> (the
    images in the folder, with the same vectors as `_saved`)."""
    from remap_tf.serving.embeddings import write_embeddings
    from remap_tf.serving.search import build_index_from_embeddings

    folder = tmp_path / name
    write_embeddings(folder, [f"base{i}" for i in range(n)], _vectors(n, dim))
    return build_index_from_embeddings([folder], directory, kind="exact", **kwargs)


def test_a_rebuild_folds_in_the_changes_a_service_logged(tmp_path):
    """Issue 21.3: a rebuild over an index with an uncompacted change log succeeded, then
    search and serve refused the log; moved away, an acknowledged delete came back and
    additions (ids such as 'x.txt', 'noext', '.hidden.jpg', which a rebuild from the folder
    skips) were gone. The rebuild folds the log in: deletes stay deleted, additions stay."""
    directory = _saved(tmp_path)
    odd = ["x.txt", "noext", ".hidden.jpg"]  # logged by a service of before the id rule
    new = _vectors(len(odd), seed=11)
    with DurableIndex.open(directory) as store:
        for item, vector in zip(odd, new, strict=True):
            store.add(item, vector)
        store.delete("base1")
        store.delete("base2")
        store.add("base2", new[0])  # deleted, then added again: the rebuild's copy stays
    summary = _rebuild(tmp_path, directory)
    assert summary["folded_changes"] == 6 and summary["count"] == 8
    expected = {"base0", "base2", "base3", "base4", "base5", *odd}
    assert set(load_index(directory).ids) == expected  # in the snapshot itself
    assert set(load_current(directory).ids) == expected
    assert scan_log(log_path(directory)).changes == []  # a fresh log for the new snapshot
    assert load_index(directory).metadata[changelog.SEQ_KEY] == 6
    ids, scores = load_current(directory).search(new[1:2], k=1)
    assert ids[0, 0] == "noext" and scores[0, 0] == pytest.approx(1.0, abs=1e-6)
    with DurableIndex.open(directory) as store:
        assert store.replayed == 0 and set(store.index.ids) == expected
        store.add("later.jpg", new[2])  # the service goes on logging onto the new snapshot
    assert "later.jpg" in load_current(directory)


def test_a_crash_after_the_rebuild_is_saved_loses_nothing(tmp_path, monkeypatch):
    """The log is emptied only after the rebuilt snapshot (with the changes) is on disk; a
    crash in between leaves a snapshot that holds every record, which replay skips, and a
    second rebuild folds them in again."""
    directory = _saved(tmp_path)
    _changed(directory)  # adds new0, new1; deletes base1

    def crash(self, base):
        raise KeyboardInterrupt("killed before the log was emptied")

    with monkeypatch.context() as patch:
        patch.setattr(ChangeLog, "reset", crash)
        with pytest.raises(KeyboardInterrupt):
            _rebuild(tmp_path, directory)
    expected = {"base0", "base2", "base3", "base4", "base5", "new0", "new1"}
    assert len(scan_log(log_path(directory)).changes) == 3  # still there
    assert set(load_index(directory).ids) == expected
    assert set(load_current(directory).ids) == expected
    _rebuild(tmp_path, directory, name="emb2")
    assert set(load_current(directory).ids) == expected
    with DurableIndex.open(directory) as store:
        assert store.replayed == 0 and set(store.index.ids) == expected


def test_a_rebuild_that_cannot_keep_the_log_is_refused_and_changes_nothing(tmp_path):
    """A rebuild never drops logged changes: while a service holds the log, when the log
    extends another snapshot, and for a sharded build (which cannot fold them in), it is
    refused in one line and the index and its log stay as they were."""
    directory = _saved(tmp_path)
    _changed(directory)
    log = log_path(directory)
    before = (log.read_bytes(), sorted(load_current(directory).ids))
    with DurableIndex.open(directory), pytest.raises(LogInUseError, match="locked by another"):
        _rebuild(tmp_path, directory)
    with pytest.raises(FileFormatError, match="sharded build cannot fold in yet"):
        _rebuild(tmp_path, directory, name="emb2", shards=2)
    assert (log.read_bytes(), sorted(load_current(directory).ids)) == before
    other = _saved(tmp_path, n=4, name="other")  # changed behind the log's back
    shutil.rmtree(directory)
    shutil.copytree(other, directory)
    with pytest.raises(FileFormatError, match="cannot rebuild .* another version of the index"):
        _rebuild(tmp_path, directory, name="emb3")
    assert log.read_bytes() == before[0]
    assert load_index(directory).ids == [f"base{i}" for i in range(4)]


def test_a_rebuild_with_another_model_keeps_deletes_and_refuses_old_descriptors(tmp_path):
    """Additions a service logged hold descriptors of the model the index was served with;
    a rebuild with another model (another fingerprint, issue 21.9) cannot mix them in, so it
    refuses them in one line and changes nothing; deletions alone fold in."""
    from remap_tf.serving.search import MODEL_PROBE

    directory = _saved(tmp_path)
    index = load_index(directory)
    index.metadata[MODEL_PROBE] = [0.1] * 32
    index.save(directory)
    _changed(directory, adds=1, deletes=())
    log = log_path(directory).read_bytes()
    other = {MODEL_PROBE: [0.9] * 32}
    with pytest.raises(FileFormatError, match="'new0'.* not of the rebuild's"):
        _rebuild(tmp_path, directory, model_fields=other)
    assert log_path(directory).read_bytes() == log and "new0" in load_current(directory)
    same = {MODEL_PROBE: [0.1] * 32}
    assert _rebuild(tmp_path, directory, name="emb2", model_fields=same)["folded_changes"] == 1
    assert "new0" in load_current(directory)
    _changed(directory, adds=0, deletes=("base3",))
    assert _rebuild(tmp_path, directory, name="emb3", model_fields=other)["folded_changes"] == 1
    assert "base3" not in load_current(directory)


def test_a_compaction_empties_a_log_whose_failed_append_could_not_be_cut(tmp_path, monkeypatch):
    """A partial record that could not be cut off goes with the rest when the log is emptied
    after a compaction (the snapshot holds every acknowledged change), so appends resume."""
    directory = _saved(tmp_path)
    real_write, real_truncate = os.pwrite, os.ftruncate

    def half_then_full(fd, data, offset):
        real_write(fd, data[: len(data) // 2], offset)
        raise OSError(28, "No space left on device")

    def failing_truncate(fd, size):
        raise OSError(5, "Input/output error")

    with DurableIndex.open(directory) as store:
        store.delete("base0")
        with monkeypatch.context() as patch:
            patch.setattr(os, "pwrite", half_then_full)
            patch.setattr(os, "ftruncate", failing_truncate)
            with pytest.raises(OSError, match="No space left"):
                store.delete("base1")
        assert store.log.broken and os.ftruncate is real_truncate
        store.compact()
        assert not store.log.broken
        store.delete("base2")
    scan = scan_log(log_path(directory))
    assert [(c.op, c.id) for c in scan.changes] == [("delete", "base2")] and scan.torn is None
    assert sorted(load_current(directory).ids) == ["base1", "base3", "base4", "base5"]
