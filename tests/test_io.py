"""The one atomic writer (remap_tf.io): old-or-new files, the user's umask, commit steps."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from remap_tf import io
from remap_tf.serving.index import ExactIndex
from remap_tf.serving.report import write_report


@pytest.fixture
def umask():
    previous = os.umask(0o022)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_users_umask(tmp_path, umask):
    umask(0o022)
    io.atomic_write_text(tmp_path / "a.txt", "x")
    io.atomic_save(tmp_path / "b.npy", lambda name: np.save(name, np.zeros(2)))
    assert _mode(tmp_path / "a.txt") == 0o644 and _mode(tmp_path / "b.npy") == 0o644
    umask(0o077)
    io.atomic_write_json(tmp_path / "c.json", {"a": 1})
    assert _mode(tmp_path / "c.json") == 0o600


def test_what_users_share_is_readable_by_others(tmp_path, umask):
    """Under umask 022 an index and a report are 0644, so another user's process reads them."""
    umask(0o022)
    index = ExactIndex(dim=3)
    index.add(["a"], np.ones((1, 3), np.float32))
    index.save(tmp_path / "index")
    image = tmp_path / "q.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    write_report(tmp_path / "r.html", queries=[image], results=[[image]])
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != image]
    assert len(written) >= 7
    assert {oct(_mode(p)) for p in written} == {oct(0o644)}, [(p, oct(_mode(p))) for p in written]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def fail(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io.atomic_write(target, fail)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_save(target, _write_then_interrupt)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def _write_then_interrupt(name):
    with open(name, "w") as handle:
        handle.write("x")
    raise KeyboardInterrupt


def test_an_interrupt_during_a_commit_step_waits_for_its_end():
    steps = []
    with pytest.raises(KeyboardInterrupt, match="later"), io.uninterruptible():
        steps.append("first rename")
        assert io.defer_interrupt(KeyboardInterrupt("later"))
        steps.append("second rename")  # still runs
    assert steps == ["first rename", "second rename"]
    assert not io.defer_interrupt(KeyboardInterrupt("now"))  # outside a step: not deferred


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_remove_stale_removes_only_dead_writers_of_this_host(tmp_path):
    """A kill -9 leaves ``<prefix><pid>@<host>~<token>``: removed once that pid is gone;
    this process's own entry, another host's and any other name stay."""
    import socket

    host = socket.gethostname()
    dead = tmp_path / f".export-{_dead_pid()}@{host}~0a1b2c3d"
    (dead / "saved_model").mkdir(parents=True)
    (dead / "saved_model" / "saved_model.pb").write_bytes(b"x" * 100)
    mine = tmp_path / io.staging_name(".export-")
    mine.mkdir()
    other_host = tmp_path / f".export-{_dead_pid()}@not-{host}~0a1b2c3d"
    other_host.mkdir()
    users = [tmp_path / ".export-notes", tmp_path / "1"]
    for path in users:
        path.mkdir()
    assert io.remove_stale(tmp_path, ".export-") == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (mine, other_host, *users)
    )
