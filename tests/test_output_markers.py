"""Output markers (issue 21): remap clears or reuses a folder only when its marker says remap
wrote it for that command and output, and then removes only the files the marker lists.

The table `LOOK_ALIKES` runs every command that writes a folder against a folder holding a
user's file plus a look-alike of that command's own output (a stray ``config.yaml``, a
``data/`` of photos, ``models.config`` + ``1/``, ``<name>_files/``): without ``--overwrite``
it is refused in one line and every user byte is kept; with ``--overwrite`` the command runs
and the user's files are still there. The unit tests of `remap_tf.outputs` come first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remap_tf import __version__
from remap_tf.errors import InvalidInputError, OutputExistsError
from remap_tf.outputs import (
    MARKER,
    check_claim,
    claim,
    listed,
    owned,
    publish_report,
    read_marker,
    record,
    remove_listed,
    report_files_dir,
)

ROOT = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but the marker, relative path -> bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


# --- remap_tf.outputs ------------------------------------------------------------------------


def test_claim_creates_an_absent_folder_with_a_marker(tmp_path):
    out = claim(tmp_path / "a" / "b", "train", "training run")
    assert out == tmp_path / "a" / "b"
    marker = json.loads((out / MARKER).read_text())
    assert marker == {
        "tool": "remap-tf",
        "version": __version__,
        "command": "train",
        "output": "training run",
        "files": [],
        "folders": [],
    }
    assert owned(out, "train", "training run")
    assert not owned(out, "train", "index")
    assert not owned(out, "index build", "training run")


def test_claim_takes_an_empty_folder_and_reuses_its_own(tmp_path):
    claim(tmp_path, "demo", "photo set")
    record(tmp_path, ["a.jpg"])
    claim(tmp_path, "demo", "photo set")  # reused: the list is kept
    assert listed(tmp_path) == ["a.jpg"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: (d / "config.yaml").write_text("mine"), "older remap\\? add --overwrite"),
        (lambda d: (d / "data").mkdir(), "did not write"),
        (lambda d: claim(d, "export", "model base folder"), "model base folder of remap export"),
        (lambda d: (d / MARKER).write_text("{not json"), "did not write"),
    ],
    ids=["user file", "user folder", "other command", "corrupt marker"],
)
def test_claim_refuses_a_folder_it_did_not_write(tmp_path, setup, message):
    setup(tmp_path)
    before = _files(tmp_path)
    for attempt in (check_claim, claim):
        with pytest.raises(OutputExistsError, match=message) as error:
            attempt(tmp_path, "train", "training run")
        assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)
        assert "--overwrite" in str(error.value)
    assert _files(tmp_path) == before


def test_claim_with_overwrite_keeps_the_users_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    claim(tmp_path, "train", "training run", overwrite=True)
    assert owned(tmp_path, "train", "training run")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert listed(tmp_path) == []  # the user's file is not remap's
    assert remove_listed(tmp_path) == []
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_claim_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file, not a folder"):
        claim(tmp_path / "f", "train", "training run", overwrite=True)


def test_record_lists_before_writing_and_refuses_a_users_file(tmp_path):
    claim(tmp_path, "demo", "photo set")
    assert record(tmp_path, ["train/cat/cat_000.jpg", "train.csv", "logs/"]) == [
        "train/cat/cat_000.jpg",
        "train.csv",
        "logs/",
    ]
    assert not (tmp_path / "train").exists()  # intent only: nothing written yet
    marker = read_marker(tmp_path)
    assert marker["files"] == ["logs/", "train.csv", "train/cat/cat_000.jpg"]
    assert marker["folders"] == ["train", "train/cat"]
    assert record(tmp_path, ["train.csv"]) == []  # listed already
    (tmp_path / "mine.csv").write_text("user")
    with pytest.raises(OutputExistsError, match="mine.csv.*remap did not write it"):
        record(tmp_path, ["mine.csv"])
    assert "mine.csv" not in listed(tmp_path)
    assert (tmp_path / "mine.csv").read_text() == "user"


def test_record_with_overwrite_lists_files_but_never_a_foreign_folder(tmp_path):
    claim(tmp_path, "train", "training run", overwrite=True)
    (tmp_path / "config.yaml").write_text("user")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "mine.txt").write_text("user")
    assert record(tmp_path, ["config.yaml", "logs/"], overwrite=True) == ["config.yaml"]
    remove_listed(tmp_path)
    assert (tmp_path / "logs" / "mine.txt").read_text() == "user"


@pytest.mark.parametrize("bad", ["../x", "a/../../x", MARKER, "."])
def test_record_refuses_paths_outside_the_folder(tmp_path, bad):
    claim(tmp_path / "out", "train", "training run")
    with pytest.raises(InvalidInputError):
        record(tmp_path / "out", [bad])


def test_record_needs_a_claim(tmp_path):
    with pytest.raises(InvalidInputError, match="claim it first"):
        record(tmp_path, ["a"])


def test_remove_listed_removes_only_listed_files_and_the_folders_remap_made(tmp_path):
    """Listed: a.jpg, keep.jpg, sub/b.jpg, tree/ (sub/ made by remap); the user adds
    sub/user.jpg and top.jpg: removing all but keep.jpg leaves keep.jpg, sub/user.jpg (so
    sub/ stays) and top.jpg."""
    claim(tmp_path, "demo", "photo set")
    record(tmp_path, ["a.jpg", "keep.jpg", "sub/b.jpg", "tree/"])
    for name in ("a.jpg", "keep.jpg", "sub/b.jpg", "tree/x/y.bin"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("remap")
    (tmp_path / "sub" / "user.jpg").write_text("user")
    (tmp_path / "top.jpg").write_text("user")
    removed = remove_listed(tmp_path, keep=["keep.jpg", tmp_path.absolute() / "none.jpg"])
    assert removed == ["a.jpg", "sub/b.jpg", "tree/"]
    assert _files(tmp_path) == {
        "keep.jpg": b"remap",
        "sub/user.jpg": b"user",
        "top.jpg": b"user",
    }
    assert listed(tmp_path) == ["keep.jpg"]
    assert read_marker(tmp_path)["folders"] == ["sub"]  # not empty: kept, still remap's
    (tmp_path / "sub" / "user.jpg").unlink()
    record(tmp_path, ["sub/c.jpg"])
    remove_listed(tmp_path, keep=["keep.jpg"])
    assert not (tmp_path / "sub").exists()  # empty and made by remap


def test_remove_listed_without_a_marker_removes_nothing(tmp_path):
    (tmp_path / "a.jpg").write_text("user")
    assert remove_listed(tmp_path) == []
    assert (tmp_path / "a.jpg").read_text() == "user"


def _fake_report(page: Path) -> None:
    """What `remap_tf.serving.report.write_report` writes: the page and <stem>_files/."""
    files = report_files_dir(page)
    files.mkdir()
    (files / f"{page.stem}.png").write_bytes(b"png")
    (files / "0123456789abcdef.jpg").write_bytes(b"thumb")
    page.write_text("<html>")


def test_publish_report_writes_only_its_own_side_files(tmp_path):
    report = tmp_path / "r2.html"
    assert report_files_dir(report) == tmp_path / "r2_files"
    side = tmp_path / "r2_files"
    side.mkdir()
    (side / "notes.txt").write_text("user")
    with pytest.raises(OutputExistsError, match="r2_files"):
        publish_report(report, _fake_report)
    assert not report.exists() and _files(side) == {"notes.txt": b"user"}
    publish_report(report, _fake_report, overwrite=True)
    assert report.read_text() == "<html>"
    assert _files(side) == {
        "0123456789abcdef.jpg": b"thumb",
        "notes.txt": b"user",
        "r2.png": b"png",
    }
    assert sorted(listed(side)) == ["0123456789abcdef.jpg", "r2.png"]

    def other_report(page: Path) -> None:
        report_files_dir(page).mkdir()
        (report_files_dir(page) / "fedcba9876543210.jpg").write_bytes(b"new")
        page.write_text("<html>2")

    publish_report(report, other_report)  # its own folder now: no --overwrite needed
    assert _files(side) == {"fedcba9876543210.jpg": b"new", "notes.txt": b"user"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
