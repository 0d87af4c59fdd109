"""The ``remap`` command as a user meets it: what it writes loads anywhere, errors are one line
unless ``--debug``, bugs say so, and the index verbs (build, add, delete, info) work together.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from remap_cli import common
from remap_cli import main as cli
from remap_cli.commands import search as search_command
from remap_cli.demo.photoset import make_photo_views
from tests.test_commands import FAKE_MODEL, ThumbnailEmbedder, _make_groups

ROOT = Path(__file__).resolve().parent.parent


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")


_LOAD_SCRIPT = r"""
import sys
import numpy as np
import keras, remap_tf   # the only project import: the loader must need nothing else

model = keras.saving.load_model(sys.argv[1], safe_mode=True)  # compiled (compile=True)
images = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(model(images, training=False)))
print(type(model.loss).__name__, type(model.optimizer).__name__)
"""


def test_trained_model_loads_compiled_after_import_remap_tf(tmp_path):
    """`remap train`, then a fresh process with `import keras, remap_tf` only loads the
    compiled model.keras with safe_mode=True and gives the descriptors of the weights the run
    checkpointed (rebuilt here from config.yaml)."""
    from remap_tf.training.config import TrainConfig
    from remap_tf.training.fit import build_model

    views = make_photo_views(tmp_path / "photos", seed=2, views_per_photo=3, image_size=(64, 64))
    out = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "remap_cli", "train", "--data", str(views.train_csv)]
        + ["--out", str(out), "--backbone", "mobilenet"]
        + ["--set", "model.backbone_kwargs={alpha: 0.25}", "--set", "model.levels=2"]
        + ["--set", "init.num_images=16", "--set", "tensorboard=false", "--epochs", "1"]
        + ["--steps-per-epoch", "2", "--batch-size", "4", "--image-size", "64"]
        + ["--verbose", "0"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    images = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    np.save(tmp_path / "images.npy", images)
    loaded = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(out / "model.keras")]
        + [str(tmp_path / "images.npy"), str(tmp_path / "descriptors.npy")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the project root: the installed package is what loads
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split()[-2:] == ["TripletLoss", "Adam"]
    config = TrainConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    reference = build_model(config)
    reference.load_weights(out / "checkpoints" / "epoch_001.weights.h5")
    np.testing.assert_allclose(
        np.load(tmp_path / "descriptors.npy"), reference(images, training=False), atol=1e-5
    )


@pytest.fixture
def fake(monkeypatch):
    embedder = ThumbnailEmbedder()
    monkeypatch.setattr(common, "embedder_for", lambda model: embedder)
    return embedder


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_debug_prints_the_traceback_of_a_bad_input(tmp_path, capsys, monkeypatch):
    argv = ["search", "--index", str(tmp_path / "missing"), "q.jpg"]
    code, _, err = _run(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("remap search: error:") and "Traceback" not in err
    code, _, err = _run(["--debug", *argv], capsys)
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("remap search: error:")
    monkeypatch.setenv("REMAP_DEBUG", "1")
    code, _, err = _run(argv, capsys)
    assert code == 2 and "Traceback (most recent call last)" in err


def test_an_unexpected_exception_is_an_internal_error_with_its_traceback(capsys, monkeypatch):
    def broken(args):
        raise ZeroDivisionError("a bug deep inside")

    monkeypatch.setattr(search_command, "run", broken)
    code, _, err = _run(["search", "--index", "x", "q.jpg"], capsys)
    assert code == 1
    (line,) = err.strip().splitlines()
    assert "remap search: internal error: ZeroDivisionError: a bug deep inside" in line
    path = line.split("traceback in ")[1].split(";")[0]
    saved = Path(path).read_text()
    assert "Traceback (most recent call last)" in saved and "a bug deep inside" in saved
    Path(path).unlink()
    code, _, err = _run(["--debug", "search", "--index", "x", "q.jpg"], capsys)
    assert code == 1 and "Traceback (most recent call last)" in err and "traceback above" in err


def test_argparse_errors_are_one_line_with_a_hint(capsys):
    assert cli.main(["search", "--index", "x", "--k", "zero", "q.jpg"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("remap search: error: argument --k:") and "--help" in line


def test_index_verbs_and_the_recorded_model(tmp_path, fake, capsys):
    groups = _make_groups(tmp_path / "imgs", num_groups=3, per_group=3, distractors=0)
    new = groups["group2"].pop()
    kept = tmp_path / "kept.png"
    new.rename(kept)  # out of the collection while the index is built
    index = tmp_path / "index"
    build = ["index", "build", "--model", FAKE_MODEL, "--images", str(tmp_path / "imgs")]
    assert _run([*build, "--out", str(index), "--quiet", "--kind", "exact"], capsys)[0] == 0

    kept.rename(new)  # the file arrives in the collection later
    code, out, err = _run(["index", "add", "--index", str(index), str(new)], capsys)
    assert code == 0, err
    assert "added 1 image(s)" in out and "9 in all" in out
    code, _, err = _run(["index", "add", "--index", str(index), str(new)], capsys)
    assert code == 2 and "already in the index" in err
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(outside)
    code, _, err = _run(["index", "add", "--index", str(index), str(outside)], capsys)
    assert code == 2 and "outside the collection root" in err

    # search without --model: the index recorded the model it was built with
    code, out, err = _run(["search", "--index", str(index), str(new), "--k", "1"], capsys)
    assert code == 0, err
    assert out.splitlines()[1].split()[-1] == "group2/img2.png"

    code, out, _ = _run(["index", "delete", "--index", str(index), "group2/img2.png"], capsys)
    assert code == 0 and "8 left" in out
    code, _, err = _run(["index", "delete", "--index", str(index), "group2/img2.png"], capsys)
    assert code == 2 and "not in the index" in err and "\n" not in err.strip()

    code, out, _ = _run(["index", "info", "--index", str(index), "--json"], capsys)
    info = json.loads(out)
    assert info["count"] == 8 and info["dim"] == 48 and info["kind"] == "exact"
    assert info["metadata"]["model"] == FAKE_MODEL
    assert info["metadata"]["image_root"] == str((tmp_path / "imgs").resolve())
    code, out, _ = _run(["index", "info", "--index", str(index)], capsys)
    assert code == 0 and "8 (48-d descriptors)" in out


def test_search_without_model_on_an_index_that_recorded_none(tmp_path, fake, capsys):
    from remap_tf.serving.index import ExactIndex

    index = ExactIndex(dim=48)
    index.add(["a"], np.ones((1, 48), np.float32))
    index.save(tmp_path / "index")
    image = tmp_path / "q.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    code, _, err = _run(["search", "--index", str(tmp_path / "index"), str(image)], capsys)
    assert code == 2 and "--model is required" in err


def test_remap_help_lists_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "remap_cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("train", "export", "embed", "index", "search", "evaluate", "demo", "--debug"):
        assert command in result.stdout
    index_help = subprocess.run(
        [sys.executable, "-m", "remap_cli", "index", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for action in ("build", "add", "delete", "info"):
        assert action in index_help


# `remap` in a subprocess with the in-process fake embedder (no model, no server).
_FAKE_REMAP = """
import sys
from remap_cli import common, main
from tests.test_commands import ThumbnailEmbedder

common.embedder_for = lambda model: ThumbnailEmbedder()
sys.exit(main.main(sys.argv[1:]))
"""


def _limit_file_size(limit: int):
    """For preexec_fn: files may not grow past ``limit`` bytes (``ulimit -f``); the write that
    would gets EFBIG instead of the SIGXFSZ that would kill the process."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_a_full_disk_is_one_line_exit_2_and_leaves_no_half_written_report(tmp_path, fake, capsys):
    """Under `ulimit -f` (40 kB) the report's PNG cannot be written: before, the page was left
    without it and the command said 'internal error ... a bug in remap-tf' (exit 1)."""
    _make_groups(tmp_path / "imgs", num_groups=3, per_group=4, distractors=0)
    build = ["index", "build", "--model", FAKE_MODEL, "--images", "imgs", "--out", "index"]
    os.chdir(tmp_path)  # paths as a user types them
    try:
        assert _run([*build, "--quiet", "--kind", "exact"], capsys)[0] == 0
    finally:
        os.chdir(ROOT)
    before = _tree(tmp_path)
    query = "imgs/group0/img0.png"
    argv = ["search", "--index", "index", query, "--report", "out/search.html"]
    result = subprocess.run(
        [sys.executable, "-c", _FAKE_REMAP, *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(_env(), PYTHONPATH=str(ROOT)),
        preexec_fn=_limit_file_size(40_000),
    )
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert line.startswith("remap search: error: out/search_files/"), line
    assert line.endswith(": file too large (over the file size limit, see `ulimit -f`)"), line
    assert _tree(tmp_path) == before  # no out/, no page, no thumbnails


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/x.npy"), "out/x.npy: no space"),
        (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "r.html: disk quota exceeded"),
        # TensorFlow's file system: its own error type, the C library's words in the message
        (RuntimeError("writing foo/variables: No space left on device"), "r.html: no space"),
    ],
)
def test_no_room_anywhere_in_a_command_is_one_line_exit_2(capsys, monkeypatch, raised, expected):
    def full(args):
        try:
            raise raised
        except Exception as error:
            raise ValueError("a library wrapped it") from error

    monkeypatch.setattr(search_command, "run", full)
    code, _, err = _run(["search", "--index", "x", "--report", "r.html", "q.jpg"], capsys)
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith(f"remap search: error: {expected}"), err


def test_an_atomic_write_that_runs_out_of_room_names_its_file(tmp_path, capsys, monkeypatch):
    """write() on a full disk names no file; the error names the output, and nothing is left."""
    from remap_tf.io import atomic_write

    def full_disk(handle):
        handle.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "results.json"
    monkeypatch.setattr(search_command, "run", lambda args: atomic_write(target, full_disk))
    code, _, err = _run(["search", "--index", "x", "q.jpg"], capsys)
    assert code == 2 and err.strip() == f"remap search: error: {target}: no space left on device"
    assert list(tmp_path.iterdir()) == []


def test_search_prints_a_name_holding_a_newline_on_its_own_line(tmp_path, fake, capsys):
    _make_groups(tmp_path / "imgs", num_groups=2, per_group=2, distractors=0)
    odd = tmp_path / "imgs" / "group0" / "two\nlines\x1b[31m.png"
    (tmp_path / "imgs" / "group0" / "img0.png").rename(odd)
    index = tmp_path / "index"
    build = ["index", "build", "--model", FAKE_MODEL, "--images", str(tmp_path / "imgs")]
    assert _run([*build, "--out", str(index), "--quiet", "--kind", "exact"], capsys)[0] == 0
    # Control characters are legal in a file name and so in an id (collection.id_problem).
    code, out, err = _run(["search", "--index", str(index), str(odd), "--k", "2"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3, out  # the query, then one line per result
    assert lines[0] == str(odd).replace("\n", "\\n").replace("\x1b", "\\x1b")
    assert lines[1].split()[-1] == "group0/two\\nlines\\x1b[31m.png", lines
    assert "\x1b" not in out


def test_the_demo_report_is_whole_or_absent_when_the_disk_fills(tmp_path, monkeypatch):
    """Figures and results.json written, then the page hits a full disk: before, they stayed
    beside no report.html; now what this run created is removed."""
    from types import SimpleNamespace

    from remap_cli.demo import report as demo_report

    def figures(config, folder, remap, curves):
        return {"training_curve": demo_report.write_svg(folder / "curve.svg", "<svg/>")}

    def page(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "report.html")

    monkeypatch.setattr(demo_report, "_write_figures", figures)
    monkeypatch.setattr(demo_report, "_write_query_report", page)
    monkeypatch.setattr(demo_report, "config_json", lambda config: {})
    views = SimpleNamespace(train_photos=["a"], test_photos=["b"])
    remap = SimpleNamespace(version_dir="m/1", embedded_through="x", export_difference=0.0)
    (tmp_path / "mine.txt").write_text("kept\n")
    with pytest.raises(OSError, match="No space left"):
        demo_report.write_outputs(None, tmp_path, SimpleNamespace(views=views), remap, [], [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """TensorFlow's own writer hits `ulimit -f` (20 kB): its error is not an OSError, yet the
    command says so in one line, exit 2, and no version, staging folder or --out is left."""
    import keras

    inputs = keras.Input((None, None, 3))
    x = keras.layers.GlobalMaxPooling2D()(keras.layers.Conv2D(4, 3, strides=4)(inputs))
    keras.Model(inputs, x).save(tmp_path / "model.keras")
    before = _tree(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "remap_cli", "export", "--model", "model.keras"]
        + ["--out", "models/remap", "--image-size", "64"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(_env(), TF_CPP_MIN_LOG_LEVEL="3"),  # TF's cuInit notice is not ours
        preexec_fn=_limit_file_size(20_000),
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "remap export: error: models/remap: file too large (over the file size limit, see "
        "`ulimit -f`)"
    ]
    assert _tree(tmp_path) == before


def test_train_on_a_csv_of_missing_files_stops_in_one_line(tmp_path):
    """Issue 21, item 10: every path of the CSV missing made `remap train` wait forever for a
    batch (and ignore SIGTERM, blocked inside TensorFlow); it now stops with one line."""
    rows = ["path,label"] + [f"gone/{c}_{i}.jpg,c{c}" for c in range(4) for i in range(3)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    argv = ["train", "--data", "data.csv", "--out", "run", "--epochs", "1"]
    argv += ["--steps-per-epoch", "1", "--batch-size", "4", "--images-per-class", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "remap_cli", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("remap")]  # not TF's log
    assert line.startswith("remap train: error: no batch can be made: "), line
    assert "file not found" in line or "No such file" in line, line
