"""Output markers (issue 21): remap clears or reuses a folder only when its marker says remap
wrote it for that command and output, and then removes only the files the marker lists.

The table `LOOK_ALIKES` runs every command that writes a folder against a folder holding a
user's file plus a look-alike of that command's own output (a stray ``config.yaml``, a
``data/`` of photos, ``models.config`` + ``1/``, ``<name>_files/``, an index's stray
``manifest.json``, a descriptor folder's ``shard-00000.npy``): without ``--overwrite`` it is
refused in one line and every user byte is kept; with ``--overwrite`` the command runs and
the user's files are still there (a user's file of a name an index or a descriptor folder
writes is refused even then). The unit tests of `remap_tf.outputs` come first; the index and
descriptor folders' own tests (issue 21 items 2, 5) come last.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from remap_cli import common
from remap_cli import main as cli
from remap_cli.demo.photoset import DATA_DIR, make_photo_views
from remap_tf import __version__
from remap_tf.errors import InvalidInputError, OutputExistsError
from remap_tf.outputs import (
    MARKER,
    REPORT_COMMAND,
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
FAKE_MODEL = "localhost:8500/fake"  # answered by the ThumbnailEmbedder of tests.test_commands


def _jpeg(seed: int, size=(64, 64)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


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
        (lambda d: (d / "data").mkdir(), "holds other files, not the training run"),
        (
            lambda d: claim(d, "export", "model base folder"),
            "the model base folder of remap export",
        ),
        (lambda d: (d / MARKER).write_text("{not json"), "no readable .remap-output.json"),
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


# --- every command that writes a folder --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One command against a folder holding a user's file and a look-alike of its output.

    Attributes:
        argv: the command line, relative paths as a user types them, without --overwrite.
        folder: the folder the command would write (``--out``, or a report's side folder).
        flag: the flag the one-line refusal names.
        user_files: the folder's files before the command (the user's own).
        replaced: user files of the same names as the command's own, which --overwrite
            replaces (every other user byte is kept).
        listed_in: the sub-folder whose marker lists the files (the demo's photo set).
        clash: a user file of a name the command writes that even --overwrite refuses to
            replace (an index's manifest.json, a descriptor shard): refused in one line
            naming it; once it is moved away, --overwrite writes beside the other files.
        marker_command: the command the folder's marker names (default ``argv[0]``).
    """

    argv: tuple[str, ...]
    folder: str
    flag: str
    user_files: dict
    replaced: frozenset = frozenset()
    listed_in: str = "."
    clash: str | None = None
    marker_command: str | None = None

    @property
    def prog(self) -> str:
        """The command as its messages name it (``index build``, ``search``)."""
        return " ".join(self.argv[:2]) if self.argv[0] == "index" else self.argv[0]


NOTES = {"notes.txt": b"my notes\n"}
TRAIN = (
    "train", "--data", "classes", "--out", "p", "--backbone", "mobilenet",
    "--set", "model.backbone_kwargs={alpha: 0.25}", "--set", "model.levels=1",
    "--set", "init.num_images=4", "--set", "tensorboard=false", "--epochs", "1",
    "--steps-per-epoch", "1", "--batch-size", "4", "--image-size", "64", "--verbose", "0",
)  # fmt: skip
SIDE_FOLDER = {**NOTES, "0123456789abcdef.jpg": _jpeg(5)}  # looks like a report thumbnail
USER_SHARD = {**NOTES, "shard-00000.npy": b"\x93NUMPY my own array"}  # looks like a shard
INDEX_BUILD = ("index", "build", "--model", FAKE_MODEL, "--images", "classes", "--kind", "exact")
CASES = {
    # issue 21.1: a data/ of the user's photos was taken for an earlier demo's photo set
    "demo": Case(
        ("demo", "--out", "p"),
        "p",
        "--out",
        {**NOTES, "data/train/cats/x.jpg": _jpeg(1), "results.json": b"{}"},
        listed_in=DATA_DIR,
    ),
    # issue 21.4: any folder with a config.yaml was taken for an earlier run
    "train": Case(
        TRAIN, "p", "--out", {**NOTES, "config.yaml": b"epochs: 99\n"}, frozenset({"config.yaml"})
    ),
    "export": Case(
        ("export", "--model", "model.keras", "--out", "p", "--image-size", "64"),
        "p",
        "--out",
        {**NOTES, "models.config": b"model_config_list {}\n", "1/saved_model.pb": b"\x08\x01"},
    ),
    # issue 21.5: a user's r2_files/ beside r2.html was written into
    "search": Case(
        ("search", "--index", "index", "--model", FAKE_MODEL, "q.png", "--report", "r2.html"),
        "r2_files",
        "--report",
        SIDE_FOLDER,
        marker_command=REPORT_COMMAND,
    ),
    "evaluate": Case(
        ("evaluate", "--dataset", "groups.json", "--model", FAKE_MODEL, "--quiet")
        + ("--report", "r2.html"),
        "r2_files",
        "--report",
        SIDE_FOLDER,
        marker_command=REPORT_COMMAND,
    ),
    # issue 21.2: any folder with a manifest.json was taken for an index and wiped
    "index build": Case(
        (*INDEX_BUILD, "--out", "w", "--quiet"),
        "w",
        "--out",
        {**NOTES, "thesis.txt": b"chapter 1\n", "manifest.json": b"{}\n"},
        clash="manifest.json",
        marker_command="index build",
    ),
    # issue 21.5: index build --out my3 wrote over the user's my3.embeddings/shard-00000.npy
    "index build <out>.embeddings": Case(
        (*INDEX_BUILD, "--out", "my3", "--quiet"),
        "my3.embeddings",
        "--embeddings",
        USER_SHARD,
        clash="shard-00000.npy",
        marker_command="index build",
    ),
    "index build --embeddings": Case(
        (*INDEX_BUILD, "--out", "my4", "--embeddings", "e", "--quiet"),
        "e",
        "--embeddings",
        USER_SHARD,
        clash="shard-00000.npy",
        marker_command="index build",
    ),
    "embed": Case(
        ("embed", "--images", "classes", "--model", FAKE_MODEL, "--out", "o"),
        "o",
        "--out",
        {**NOTES, "manifest.json": b"{}\n"},
        clash="manifest.json",
    ),
    "evaluate --embeddings": Case(
        ("evaluate", "--dataset", "groups.json", "--model", FAKE_MODEL, "--quiet")
        + ("--embeddings", "e"),
        "e",
        "--embeddings",
        USER_SHARD,
        clash="shard-00000.npy",
    ),
}


def _inputs(ws: Path, command: str) -> None:
    """The good inputs ``command`` reads, in the workspace ``ws``."""
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        for i in range(2):
            path = ws / "classes" / name / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_jpeg(10 * seed + i))
    (ws / "q.png").write_bytes(b"")
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(ws / "q.png")
    if command == "export":
        from tests.test_export import tiny_functional_model

        tiny_functional_model().save(ws / "model.keras")
    if command == "search":
        from remap_tf.serving.index import ExactIndex
        from tests.test_commands import ThumbnailEmbedder

        ids = ["classes/a/0.jpg", "classes/b/0.jpg"]
        index = ExactIndex(dim=ThumbnailEmbedder.dim)
        index.add(ids, ThumbnailEmbedder().embed([ws / i for i in ids]))
        index.metadata = {"image_root": str(ws), "model": FAKE_MODEL}
        index.save(ws / "index")
    groups = [{"name": n, "images": [f"classes/{n}/0.jpg", f"classes/{n}/1.jpg"]} for n in "abc"]
    (ws / "groups.json").write_text(json.dumps({"groups": groups}))


@pytest.fixture
def workspace(tmp_path, monkeypatch, request):
    """A workspace (the working directory) with the command's inputs and the case's folder."""
    case = CASES[request.param]
    command = case.argv[0]
    _inputs(tmp_path, command)
    for name, data in case.user_files.items():
        (tmp_path / case.folder / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / case.folder / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    from remap_tf.serving import client
    from tests.test_commands import ThumbnailEmbedder

    monkeypatch.setattr(common, "embedder_for", lambda model: ThumbnailEmbedder())
    # remap embed's Beam model handler makes its own embedder (in this process)
    monkeypatch.setattr(client, "make_embedder", lambda model, **kw: ThumbnailEmbedder())
    return tmp_path, case


@pytest.mark.parametrize("workspace", list(CASES), indirect=True)
def test_a_look_alike_folder_is_refused_in_one_line_and_left_alone(workspace, capsys):
    ws, case = workspace
    before = _files(ws)
    code = cli.main(list(case.argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"remap {case.prog}: error: {case.flag}"), lines[0]
    assert repr(case.folder) in lines[0] and "holds other files" in lines[0], lines[0]
    assert "--overwrite" in lines[0], lines[0]
    assert _files(ws) == before  # every byte of the user's kept, nothing written
    assert not (ws / case.folder / MARKER).exists()


def _refused_to_replace(ws: Path, case: Case, capsys) -> None:
    """Even --overwrite refuses to replace the user's file of the name the command writes
    (``case.clash``): one line naming it, nothing written; the user then moves it away."""
    before = _files(ws)
    code = cli.main([*case.argv, "--overwrite"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert repr(f"{case.folder}/{case.clash}") in lines[0], lines[0]
    assert "move it away" in lines[0], lines[0]
    assert _files(ws) == before
    (ws / case.folder / case.clash).unlink()


def _fake_demo(config):
    """`run_demo` cut to its photo set: `remap demo` writes it as the pipeline does."""
    import types

    make_photo_views(
        Path(config.out_dir) / DATA_DIR,
        seed=config.seed,
        views_per_photo=3,
        image_size=(48, 64),
        photos=["astronaut", "camera", "chelsea", "coffee", "rocket"],
    )
    return types.SimpleNamespace(table=[{"model": "fake"}])


@pytest.mark.parametrize("workspace", list(CASES), indirect=True)
def test_with_overwrite_the_command_runs_and_keeps_the_users_files(workspace, capsys, monkeypatch):
    """--overwrite: the command writes beside the user's files; the marker lists only its own
    files; a rerun without --overwrite reuses the folder (the demo: twice more, the second
    with another seed, whose stale views are removed and the user's photos still kept)."""
    ws, case = workspace
    if case.argv[0] == "demo":
        from remap_cli.demo import pipeline

        monkeypatch.setattr(pipeline, "run_demo", _fake_demo)
    user_files = dict(case.user_files)
    if case.clash is not None:
        _refused_to_replace(ws, case, capsys)
        del user_files[case.clash]
    code = cli.main([*case.argv, "--overwrite"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    after = _files(ws / case.folder)
    for name, data in user_files.items():
        assert name in after, name
        assert name in case.replaced or after[name] == data, name
    folder = ws / case.folder
    assert read_marker(folder)["command"] == (case.marker_command or case.argv[0])
    prefix = "" if case.listed_in == "." else f"{case.listed_in}/"
    own = {prefix + e.rstrip("/") for e in listed(folder / case.listed_in)}
    assert own, "the command listed nothing it wrote"
    assert not own & (set(user_files) - case.replaced), own
    for entry in own:
        assert all(not name.startswith(f"{entry}/") for name in user_files), entry
    if case.argv[0] in ("train",):
        return  # a second training run is test_resume's
    if case.argv[0] == "index":
        assert read_marker(ws / case.argv[case.argv.index("--out") + 1])["output"] == "index"
    reruns = [list(case.argv)]
    if case.argv[0] == "demo":
        reruns.append([*case.argv, "--seed", "7"])
    for argv in reruns:
        assert cli.main(argv) == 0, capsys.readouterr().err[-3000:]
    after = _files(ws / case.folder)
    assert all(after[n] == d for n, d in user_files.items() if n not in case.replaced)
    if case.argv[0] == "demo":
        assert _files(ws / case.folder / DATA_DIR).keys() - {"train/cats/x.jpg"} == {
            e.removeprefix(f"{DATA_DIR}/") for e in listed(ws / case.folder / DATA_DIR)
        }  # seed 0's views removed, only seed 7's (listed) and the user's photo left
    if case.argv[0] == "export":
        assert sorted(p.name for p in (ws / "p").iterdir() if p.name.isdigit()) == ["1", "2", "3"]
        assert "models.config" not in listed(ws / "p")


def test_the_photo_set_never_removes_a_users_photos(tmp_path):
    """Issue 21.1: `remap demo --out p` where p/data/train/cats/ holds the user's photos
    removed every .jpg it did not write (`_remove_leftovers`). Now the folder is refused; with
    overwrite the photo set is written beside them, and a rerun with another seed removes
    only its own stale views."""
    photo = tmp_path / "p" / DATA_DIR / "train" / "cats" / "x.jpg"
    photo.parent.mkdir(parents=True)
    photo.write_bytes(_jpeg(3))
    small = dict(
        views_per_photo=3, image_size=(48, 64), photos=["camera", "coffee", "coins", "moon"]
    )
    data = photo.parents[2]
    with pytest.raises(OutputExistsError, match="holds other files"):
        make_photo_views(data, seed=0, **small)
    assert photo.read_bytes() == _jpeg(3) and not (data / MARKER).exists()
    make_photo_views(data, seed=0, overwrite=True, **small)
    seed_0 = set(listed(data))
    views = make_photo_views(data, seed=1, **small)
    assert photo.read_bytes() == _jpeg(3)
    written = set(_files(views.root)) - {"train/cats/x.jpg"}
    assert written == set(listed(views.root))
    stale = seed_0 - written  # seed 0's views that seed 1 does not have: removed
    assert stale and not any((data / name).exists() for name in stale)


@pytest.mark.slow
def test_demo_interrupted_after_its_photo_set_keeps_the_users_photos(tmp_path):
    """Issue 21.1 as reported: `remap demo --out p` over p/data/train/cats/*.jpg, Ctrl-C once
    the photo set is written: refused without --overwrite; with it, the user's photos are all
    there after the interrupt."""
    photo = tmp_path / "p" / DATA_DIR / "train" / "cats" / "x.jpg"
    photo.parent.mkdir(parents=True)
    photo.write_bytes(_jpeg(4))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    argv = [sys.executable, "-m", "remap_cli", "demo", "--out", "p", "--weights", "none"]
    refused = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "holds other files" in refused.stderr, refused.stderr
    process = subprocess.Popen(
        [*argv, "--overwrite"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 400
    while process.poll() is None and time.monotonic() < deadline:
        if (tmp_path / "p" / DATA_DIR / "photoset.json").exists():
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert photo.read_bytes() == _jpeg(4)
    views = set(listed(tmp_path / "p" / DATA_DIR))  # the photo set was written beside it
    assert "train.csv" in views and "train/cats/x.jpg" not in views


# --- index and descriptor folders (issue 21 items 2, 5) ----------------------------------------


def _exact_index(n: int = 6):
    from remap_tf.serving.index import ExactIndex

    index = ExactIndex(dim=4)
    index.add([f"i{k}" for k in range(n)], np.eye(n, 4, dtype=np.float32) + 0.1)
    return index


def test_an_index_is_saved_only_over_an_index_remap_wrote(tmp_path):
    """Issue 21.2 in the library: a stray manifest.json (even one naming the format) does not
    make a folder an index; a saved index carries the marker of remap index build."""
    index = _exact_index()
    out = tmp_path / "w"
    out.mkdir()
    (out / "manifest.json").write_text('{"format": "remap-index", "kind": "exact"}')
    (out / "thesis.txt").write_text("mine")
    before = _files(out)
    with pytest.raises(OutputExistsError, match="not an index remap wrote.*--overwrite") as error:
        index.save(out)
    assert "\n" not in str(error.value)
    assert _files(out) == before and not (out / MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no staging left behind
    index.save(tmp_path / "new")
    assert owned(tmp_path / "new", "index build", "index")
    assert {"manifest.json", "ids.json", "descriptors.npy"} <= set(listed(tmp_path / "new"))


def test_an_older_index_without_a_marker_is_updated_and_keeps_the_users_files(tmp_path):
    """An index saved before markers (a verified manifest, no marker) is still saved over, and
    gains the marker; a user's file in it survives every save (it is carried over); an
    altered one is no longer recognised as remap's."""
    from remap_tf.serving.index import load_index

    index = _exact_index()
    out = index.save(tmp_path / "idx")
    (out / MARKER).unlink()  # as an older remap left it
    (out / "notes.txt").write_text("mine")
    index.delete(["i0"])
    index.save(out)
    assert owned(out, "index build", "index") and (out / "notes.txt").read_text() == "mine"
    assert "notes.txt" not in listed(out)
    index.delete(["i1"])
    index.save(out)
    assert len(load_index(out)) == 4 and (out / "notes.txt").read_text() == "mine"
    (out / MARKER).unlink()
    (out / "ids.json").write_text('["x"]')  # altered: no longer a verified index
    with pytest.raises(OutputExistsError, match="not an index remap wrote"):
        index.save(out)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_users_file_of_an_index_files_name_is_never_replaced(tmp_path):
    from remap_tf.serving.index.files import claim_index_output

    out = tmp_path / "w"
    out.mkdir()
    (out / "config.json").write_text("mine")
    with pytest.raises(OutputExistsError, match="config.json.*move it away"):
        claim_index_output(out, overwrite=True)
    (out / "config.json").rename(out / "mine.json")
    claim_index_output(out, overwrite=True)
    _exact_index().save(out)
    assert (out / "mine.json").read_text() == "mine" and owned(out, "index build", "index")


def _cli_index(ws: Path, capsys, *argv) -> str:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out


@pytest.mark.parametrize("workspace", ["index build"], indirect=True)
def test_index_add_delete_compact_update_an_older_index_and_keep_the_users_files(workspace, capsys):
    """add, delete and compact rewrite an index in place: an index of an earlier version (no
    marker) is recognised by its verified manifest, gains the marker, and the user's file in
    it is kept through each rewrite."""
    ws, case = workspace
    for name in case.user_files:
        (ws / "w" / name).unlink()
    _cli_index(ws, capsys, *case.argv)
    (ws / "w" / MARKER).unlink()
    (ws / "w" / "notes.txt").write_text("mine")
    _cli_index(ws, capsys, "index", "delete", "--index", "w", "a/0.jpg")
    assert owned(ws / "w", "index build", "index")
    _cli_index(ws, capsys, "index", "add", "--index", "w", "classes/a/0.jpg")
    (ws / "w" / MARKER).unlink()  # older again: a service logs a change, compact folds it in
    from remap_tf.serving.index import DurableIndex

    with DurableIndex.open(ws / "w") as store:
        store.delete("b/1.jpg")
    assert "1 change(s) folded" in _cli_index(ws, capsys, "index", "compact", "--index", "w")
    assert owned(ws / "w", "index build", "index")
    assert (ws / "w" / "notes.txt").read_text() == "mine" and "notes.txt" not in listed(ws / "w")
    out = _cli_index(ws, capsys, *case.argv)  # a rebuild over its own index: no --overwrite
    assert "indexed 6 images" in out and (ws / "w" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("workspace", ["index build"], indirect=True)
def test_an_index_never_goes_into_a_descriptor_folder(workspace, capsys):
    """Issue 21.2: `index build --from-embeddings e --out e` wiped remap embed's output. Now
    an --out that is a descriptor folder (the source, --embeddings, or any) is refused, with
    or without --overwrite, before anything is written."""
    ws, case = workspace
    _cli_index(ws, capsys, *case.argv[:-3], "--out", "idx", "--embeddings", "e", "--quiet")
    _cli_index(ws, capsys, *case.argv[:-3], "--out", "idx2", "--embeddings", "f", "--quiet")
    before = _files(ws)
    for argv in (
        ["index", "build", "--from-embeddings", "e", "--out", "e"],
        ["index", "build", "--from-embeddings", "e", "--out", "./e/", "--shards", "2"],
        ["index", "build", "--from-embeddings", "f", "--out", "e"],
        [*case.argv[:-3], "--out", "x", "--embeddings", "x"],
        [*case.argv[:-3], "--out", "e"],
    ):
        for extra in ([], ["--overwrite"]):
            code = cli.main(argv + extra)
            err = capsys.readouterr().err
            assert code == 2 and len(err.strip().splitlines()) == 1, err
            assert "--out" in err and "descriptor folder" in err, err
    assert _files(ws) == before
