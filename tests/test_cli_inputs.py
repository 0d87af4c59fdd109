"""Every subcommand against every kind of bad path and bad value: one line, exit 2, no trace.

Each case runs ``remap`` from a workspace with relative paths, as a user types them, and
checks: exit status 2; exactly one line on stderr, ``remap <command>: error: ...``, naming the
argument; no traceback; and nothing in the workspace created, changed or removed. Arguments
are checked before any work starts, so no case loads TensorFlow's model code or writes a file.

Unreadable files cannot be simulated for root with chmod alone (root reads anything), so those
cases run in a subprocess without the capabilities that let root bypass file permissions
(``setpriv``), or as they are for another user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from remap_cli import main as cli
from remap_tf.serving.index import ExactIndex

GOOD = {
    "train": ["train", "--data", "classes", "--out", "run", "--epochs", "1"],
    "export": ["export", "--model", "model.keras", "--out", "models/remap"],
    "index build": ["index", "build", "--model", "export", "--images", "imgs", "--out", "new"],
    "index add": ["index", "add", "--index", "index", "img.png"],
    "index delete": ["index", "delete", "--index", "index", "a"],
    "index info": ["index", "info", "--index", "index"],
    "search": ["search", "--index", "index", "img.png"],
    "evaluate": ["evaluate", "--dataset", "groups.json", "--model", "export"],
    "demo": ["demo", "--out", "demo_out"],
    "embed": ["embed", "--images", "imgs", "--model", "export", "--out", "emb"],
}

# (command, flag, bad value, words the message must contain)
PATH_CASES = [
    # remap train
    ("train", "--data", "nope", "does not exist"),
    ("train", "--data", "empty_dir", "no images found"),
    ("train", "--data", "empty.csv", "empty"),
    ("train", "--data", "garbage.csv", "not"),
    ("train", "--config", "nope.yaml", "does not exist"),
    ("train", "--config", "empty_dir", "is a folder"),
    ("train", "--config", "empty.yaml", "empty"),
    ("train", "--config", "garbage.yaml", "not UTF-8 text"),
    ("train", "--weights", "nope.h5", "does not exist"),
    ("train", "--weights", "garbage.h5", "not a Keras weights file"),
    ("train", "--weights", "model.keras", "not a Keras weights file"),
    ("train", "--validation", "garbage.csv", "not"),
    ("train", "--out", "img.png", "is a file"),
    ("train", "--out", "notes", "holds other files"),
    # remap export
    ("export", "--model", "nope.keras", "does not exist"),
    ("export", "--model", "empty_dir", "without a .keras file"),
    ("export", "--model", "empty.keras", "is empty"),
    ("export", "--model", "garbage.keras", "not a Keras model file"),
    ("export", "--model", "img.png", "not a .keras file"),
    ("export", "--model", "export", "is an exported SavedModel"),
    ("export", "--out", "img.png", "is a file"),
    ("export", "--out", "notes", "holds other files"),
    ("export", "--warmup-images", "garbage.jpg", "not an image"),
    # remap index build / add / delete / info
    ("index build", "--model", "nope", "neither an existing exported model"),
    ("index build", "--model", "model.keras", "is a Keras model file"),
    ("index build", "--model", "empty_dir", "neither a SavedModel"),
    ("index build", "--model", "garbage.bin", "is a file"),
    ("index build", "--images", "nope", "does not exist"),
    ("index build", "--images", "empty_dir", "no images"),
    ("index build", "--images", "empty.txt", "is empty"),
    ("index build", "--images", "garbage.txt", "not a text manifest"),
    ("index build", "--out", "img.png", "is a file"),
    ("index build", "--out", "notes", "holds other files"),
    ("index add", "--index", "nope", "does not exist"),
    ("index add", "--index", "img.png", "is a file"),
    ("index add", "--index", "empty_dir", "is not an index"),
    ("index add", "--index", "broken_index", "manifest"),
    ("index add", "IMAGE", "nope.png", "does not exist"),
    ("index add", "IMAGE", "empty_dir", "is a folder"),
    ("index add", "IMAGE", "empty.png", "is empty"),
    ("index add", "IMAGE", "garbage.jpg", "not an image"),
    ("index delete", "--index", "nope", "does not exist"),
    ("index delete", "--index", "empty_dir", "is not an index"),
    ("index info", "--index", "img.png", "is a file"),
    # remap search
    ("search", "--index", "nope", "does not exist"),
    ("search", "--index", "empty_dir", "is not an index"),
    ("search", "--index", "broken_index", "manifest"),
    ("search", "QUERY", "nope.jpg", "does not exist"),
    ("search", "QUERY", "empty_dir", "is a folder"),
    ("search", "QUERY", "empty.png", "is empty"),
    ("search", "QUERY", "garbage.jpg", "not an image"),
    ("search", "--model", "model.keras", "is a Keras model file"),
    ("search", "--model", "nope", "neither an existing exported model"),
    ("search", "--model", "127.0.0.1:99999", "port 99999 is not a port (1 to 65535)"),
    ("search", "--model", "localhost:0/remap", "port 0 is not a port"),
    ("index build", "--model", "[::1]:65536", "port 65536"),
    ("search", "--report", "img.png", "does not end in .html"),
    ("search", "--report", "mine.html", "--overwrite"),
    ("search", "--report", "empty_dir.html", "is a folder"),
    ("search", "--json", "mine.json", "--overwrite"),
    ("search", "--json", "img.png", "does not end in .json"),
    # remap evaluate
    ("evaluate", "--dataset", "nope.pkl", "does not exist"),
    ("evaluate", "--dataset", "empty.pkl", "is empty"),
    ("evaluate", "--dataset", "garbage.pkl", "garbage.pkl"),
    ("evaluate", "--dataset", "garbage.json", "garbage.json"),
    ("evaluate", "--dataset", "empty_dir", "empty_dir"),
    ("evaluate", "--images", "img.png", "is a file"),
    ("evaluate", "--model", "model.keras", "is a Keras model file"),
    ("evaluate", "--json", "mine.json", "--overwrite"),
    ("evaluate", "--report", "notes/x.txt", "does not end in .html"),
    ("evaluate", "--embeddings", "notes", "holds other files"),
    # remap embed
    ("embed", "--images", "nope", "does not exist"),
    ("embed", "--images", "empty_dir", "no images"),
    ("embed", "--images", "empty.txt", "is empty"),
    ("embed", "--images", "garbage.txt", "not a text manifest"),
    ("embed", "--model", "nope", "neither an existing exported model"),
    ("embed", "--model", "model.keras", "is a Keras model file"),
    ("embed", "--model", "empty_dir", "neither a SavedModel"),
    ("embed", "--out", "img.png", "is a file"),
    ("embed", "--out", "notes", "holds other files"),
    # remap demo
    ("demo", "--out", "img.png", "is a file"),
    ("demo", "--out", "notes", "holds other files"),
    ("demo", "--weights", "nope.h5", "does not exist"),
    ("demo", "--weights", "garbage.h5", "not a Keras weights file"),
]

# (command, flag, bad value): argparse or config refuses them, naming the flag.
VALUE_CASES = [
    (command, flag, value)
    for command, flag, values in [
        ("train", "--epochs", ["-1", "two"]),  # 0 is allowed: initialise only
        ("train", "--loss", ["arcface"]),
        ("train", "--mining", ["hardest"]),
        ("train", "--steps-per-epoch", ["0", "x"]),
        ("train", "--batch-size", ["0", "-4", "3"]),
        ("train", "--image-size", ["10", "big"]),
        ("train", "--learning-rate", ["0", "-1", "nan"]),
        ("train", "--margin", ["-0.1", "x"]),
        ("train", "--seed", ["-1"]),
        ("train", "--pooling", ["max"]),
        ("export", "--image-size", ["10", "x", "4097", "20000", "100000000", "1e8"]),
        ("export", "--version", ["0", "-1"]),
        ("export", "--scales", ["0", "a,b", "-1.0"]),
        ("export", "--scales", ["0.05", "9", "1,8.1"]),  # 512 x 9 = 4608 px > 4096
        ("export", "--max-pixels", ["0", "500000001", "10000000000000"]),
        ("export", "--name", ["bad name!"]),
        ("index build", "--shard-size", ["0", "x"]),
        ("index build", "--batch-size", ["-1"]),
        ("index build", "--num-leaves", ["0"]),
        ("index build", "--threads", ["-1"]),
        ("index build", "--reorder", ["0"]),
        ("index build", "--tune-budget", ["0", "-1", "x", "nan"]),
        ("index build", "--target-recall", ["1.5", "-0.1"]),
        ("search", "--k", ["0", "-3", "ten"]),
        ("evaluate", "--qe", ["-1", "x"]),
        ("evaluate", "--kappas", ["0"]),
        ("evaluate", "--qe-alpha", ["0", "inf"]),
        ("evaluate", "--batch-size", ["0"]),
        ("evaluate", "--report-k", ["0"]),
        ("embed", "--shard-size", ["0", "x"]),
        ("embed", "--batch-size", ["-1"]),
        ("embed", "--workers", ["0"]),
        ("embed", "--threads", ["0"]),
        ("demo", "--minutes", ["0", "-2", "x"]),
        ("demo", "--steps", ["0"]),
        ("demo", "--seed", ["-1"]),
        ("demo", "--image-size", ["10"]),
        ("demo", "--views-per-photo", ["1"]),
        ("demo", "--alpha", ["0"]),
        ("demo", "--backbone", ["resnet5"]),
    ]
    for value in values
]


def _image(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Good inputs for every command, and bad ones of every kind."""
    ws = tmp_path_factory.mktemp("ws")
    for name in ("a", "b"):
        (ws / "classes" / name).mkdir(parents=True)
        for i in range(2):
            _image(ws / "classes" / name / f"{i}.png", hash(name) % 100 + i)
    (ws / "imgs").mkdir()
    _image(ws / "imgs" / "x.png", 1)
    (ws / "index_images").mkdir()
    _image(ws / "img.png", 2)
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(ws / "model.keras")
    (ws / "export" / "1").mkdir(parents=True)
    (ws / "export" / "1" / "saved_model.pb").write_bytes(b"\x08\x01")  # the layout is enough
    index = ExactIndex(dim=4)
    index.add(["a"], np.ones((1, 4), np.float32))
    index.metadata = {"image_root": str(ws), "model": "export"}
    index.save(ws / "index")
    shutil.copytree(ws / "index", ws / "broken_index")
    (ws / "broken_index" / "manifest.json").write_text("{not json")
    (ws / "groups.json").write_text('{"groups": [{"name": "g", "images": ["img.png"]}]}')
    (ws / "empty_dir").mkdir()
    (ws / "empty_dir.html").mkdir()
    (ws / "notes").mkdir()
    (ws / "notes" / "todo.txt").write_text("mine\n")
    (ws / "mine.html").write_text("<html><body>my own page</body></html>\n")
    (ws / "mine.json").write_text('{"settings": true}\n')
    for name in ("empty.csv", "empty.yaml", "empty.keras", "empty.txt", "empty.png", "empty.pkl"):
        (ws / name).write_bytes(b"")
    garbage = bytes(np.random.default_rng(7).integers(0, 256, 512, dtype=np.uint8))
    for suffix in ("bin", "csv", "yaml", "h5", "keras", "jpg", "txt", "pkl", "json"):
        (ws / f"garbage.{suffix}").write_bytes(b"\xfe\xff" + garbage)
    return ws


def _snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.is_dir(), p.stat().st_mtime_ns, p.stat().st_size)
        for p in root.rglob("*")
    }


def _argv(command: str, flag: str, value: str) -> list[str]:
    argv = list(GOOD[command])
    positional = {"QUERY": "img.png", "IMAGE": "img.png"}
    if flag in positional:
        argv[argv.index(positional[flag])] = value
    elif flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


def _check_one_line(command: str, code: int, err: str, expected: str | None, names: str):
    lines = err.strip().splitlines()
    assert code == 2, (command, code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"remap {command}: error:"), lines[0]
    assert "Traceback" not in err
    if expected is not None:
        assert expected in lines[0], lines[0]
    assert names in lines[0], (names, lines[0])


@pytest.mark.parametrize("command, flag, value, expected", PATH_CASES)
def test_bad_paths_get_one_line_and_exit_2(
    workspace, monkeypatch, capsys, command, flag, value, expected
):
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    code = cli.main(_argv(command, flag, value))
    err = capsys.readouterr().err
    names = {"QUERY": "query", "IMAGE": "image"}.get(flag, flag)
    _check_one_line(command, code, err, expected, names)
    assert _snapshot(workspace) == before, "the command changed the workspace"


@pytest.mark.parametrize("command, flag, value", VALUE_CASES)
def test_bad_values_get_one_line_and_exit_2(workspace, monkeypatch, capsys, command, flag, value):
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    code = cli.main(_argv(command, flag, value))
    err = capsys.readouterr().err
    config_names = {
        "--name": "Model name",
        "--pooling": "pooling",
        "--loss": "loss.kind",
        "--mining": "loss.mining",
    }
    names = config_names.get(flag, flag)
    _check_one_line(command, code, err, None, names)
    assert _snapshot(workspace) == before, "the command changed the workspace"


def _run_without_root_powers(argv, cwd):
    """``remap argv`` in a subprocess that file permissions apply to, even as root."""
    prefix = []
    if os.geteuid() == 0:
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "remap_cli", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )


@pytest.mark.skipif(
    shutil.which("setpriv") is None and os.geteuid() == 0,
    reason="running as root without setpriv (util-linux): root reads any file, so "
    "an unreadable file cannot be made",
)
@pytest.mark.parametrize(
    "command, flag, value",
    [
        ("train", "--data", "locked_dir"),
        ("export", "--model", "locked.keras"),
        ("index build", "--images", "locked_dir"),
        ("embed", "--images", "locked_dir"),
        ("search", "QUERY", "locked.png"),
        ("search", "--index", "locked_dir"),
        ("evaluate", "--dataset", "locked.json"),
        ("demo", "--weights", "locked.h5"),
    ],
)
def test_unreadable_paths_get_one_line_and_exit_2(workspace, command, flag, value):
    locked = workspace / value
    if value.endswith("_dir"):
        locked.mkdir(exist_ok=True)
    else:
        shutil.copy(workspace / ("img.png" if value.endswith(".png") else "model.keras"), locked)
    locked.chmod(0)
    try:
        result = _run_without_root_powers(_argv(command, flag, value), workspace)
    finally:
        locked.chmod(0o755)
        shutil.rmtree(locked) if locked.is_dir() else locked.unlink()
    names = {"QUERY": "query"}.get(flag, flag)
    _check_one_line(command, result.returncode, result.stderr, "permission denied", names)


@pytest.mark.parametrize(
    "argv, expected",
    [
        # --report took the first query as its value: q_mine.jpg must not become a page
        (["search", "--index", "index", "--report", "q_mine.jpg", "q_other.jpg"], ".html"),
        (["search", "--index", "index", "--json", "q_mine.jpg", "q_other.jpg"], ".json"),
        (["index", "build", "--model", "model.keras", "--images", "imgs", "--out", "x"], "export"),
        (["search", "--index", "index", "--model", "model.keras", "img.png"], "export"),
        (["evaluate", "--dataset", "groups.json", "--model", "model.keras"], "export"),
        (["index", "build", "--model", "export", "--images", "imgs", "--out", "afile.txt"], "file"),
        (["search", "--index", "index", "--json", "photos", "img.png"], "is a folder"),
        (["export", "--model", "fake.keras", "--out", "models/remap"], "not a Keras model"),
        (["search", "--index", "index", "photos"], "is a folder"),
        (["evaluate", "--dataset", "groups.json", "--model", "export", "--qe", "-1"], "--qe"),
        (["search", "--index", "index", "--report", "page.html", "img.png"], "--overwrite"),
    ],
)
def test_the_reported_cases_are_one_line_and_leave_files_alone(
    workspace, monkeypatch, capsys, argv, expected
):
    """The rows of issue 12's table, as the user typed them."""
    monkeypatch.chdir(workspace)
    for name in ("q_mine.jpg", "q_other.jpg"):
        shutil.copy(workspace / "img.png", workspace / name)
    (workspace / "afile.txt").write_text("my notes\n")
    (workspace / "fake.keras").write_text("not a model\n")
    (workspace / "page.html").write_text("<html>my page</html>\n")
    (workspace / "photos").mkdir(exist_ok=True)
    before = _snapshot(workspace)
    code = cli.main(argv)
    err = capsys.readouterr().err
    command = " ".join(argv[:2]) if argv[0] == "index" else argv[0]
    _check_one_line(command, code, err, expected, "")
    assert _snapshot(workspace) == before, "the command changed the workspace"
