"""Ctrl-C (SIGINT) or SIGTERM at several moments of ``remap export``, ``index build``,
``embed`` and ``train``: the command says ``interrupted``, exits with 130, and leaves either the
complete result or nothing of it (no half-written version, index or model, no staging leftovers).

Each moment is a milestone seen on disk (a staging folder appears, a shard is committed, a
backup is written), not a fixed delay, so the test means the same on a fast or a loaded
machine. A rerun after the interrupt completes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from remap_tf.contract import read_export_metadata, version_dirs
from remap_tf.serving.index import verify_index

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def _remap(argv, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "remap_cli", *argv],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _interrupt_when(process, milestone, signum, timeout=240.0) -> tuple[int, str]:
    """Sends ``signum`` once ``milestone()`` is true; returns (exit status, stderr)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if milestone():
            process.send_signal(signum)
            break
        time.sleep(0.02)
    else:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"the milestone was never reached (exit {process.returncode}): {err[-2000:]}")
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def _assert_interrupted(code: int, err: str) -> None:
    assert code == 130, err[-2000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    assert "Traceback" not in err


def _images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny REMAP .keras model, one export of it and a folder of images."""
    from remap_tf.export.saved_model import export_model
    from remap_tf.model import REMAP

    root = tmp_path_factory.mktemp("interrupts")
    model = REMAP("mobilenet_v2", pooling="mac", backbone_kwargs={"alpha": 0.35})
    model.save(root / "model.keras")
    export_model(model, root / "export", image_size=64)
    _images(root / "imgs", 48)
    return root


def _export_is_complete_or_absent(base: Path) -> None:
    assert not list(base.glob(".export-*")), "a staging folder was left behind"
    for version in [p for p in base.iterdir() if p.name.isdigit()] if base.exists() else []:
        assert version in version_dirs(base), f"{version} is not a complete SavedModel"
        assert read_export_metadata(version)["descriptor_dim"] > 0
        assert (version / "assets.extra" / "tf_serving_warmup_requests").is_file()
        assert (base / "models.config").is_file() and (base / "docker-compose.yml").is_file()


@pytest.mark.parametrize(
    "moment, signum",
    [("start", signal.SIGTERM), ("staging", signal.SIGINT), ("saved", signal.SIGTERM)],
)
def test_export_interrupted(work, tmp_path, moment, signum):
    base = tmp_path / "models" / "remap"

    def milestone():
        if moment == "start":
            return True
        staged = list(base.glob(".export-*")) if base.exists() else []
        if moment == "staging":
            return bool(staged)
        return any((s / "saved_model" / "saved_model.pb").exists() for s in staged)

    process = _remap(["export", "--model", str(work / "model.keras"), "--out", str(base)], tmp_path)
    if moment == "start":
        time.sleep(2.0)  # inside the start-up (argument checks, TensorFlow's import)
    _assert_interrupted(*_interrupt_when(process, milestone, signum))
    _export_is_complete_or_absent(base)
    if moment == "saved":  # nothing in the way of the next export
        again = _remap(
            ["export", "--model", str(work / "model.keras"), "--out", str(base)], tmp_path
        )
        _, err = again.communicate(timeout=240)
        assert again.returncode == 0, err[-2000:]
        _export_is_complete_or_absent(base)
        assert version_dirs(base)


@pytest.mark.parametrize(
    "moment, signum", [("first shard", signal.SIGINT), ("later shard", signal.SIGTERM)]
)
def test_index_build_interrupted_then_resumed(work, tmp_path, moment, signum):
    out, shards = tmp_path / "idx", tmp_path / "idx.embeddings"
    argv = ["index", "build", "--model", str(work / "export"), "--images", str(work / "imgs")]
    argv += ["--out", str(out), "--shard-size", "4", "--batch-size", "2", "--quiet"]
    wanted = 1 if moment == "first shard" else 5

    def milestone():  # commit records only (shard-N.ids.json is written before them)
        names = [p.name for p in shards.glob("shard-*.json")] if shards.exists() else []
        return sum(bool(re.fullmatch(r"shard-\d{5}\.json", n)) for n in names) >= wanted

    _assert_interrupted(*_interrupt_when(_remap(argv, tmp_path), milestone, signum))
    assert not out.exists() or verify_index(out)["count"] == 48
    assert not list(tmp_path.glob(".idx.tmp-*")), "a staging folder was left behind"
    again = _remap(argv, tmp_path)
    stdout, err = again.communicate(timeout=240)
    assert again.returncode == 0, err[-2000:]
    assert "indexed 48 images" in stdout and verify_index(out)["count"] == 48


@pytest.mark.parametrize(
    "moment, signum",
    [
        ("first shard", signal.SIGINT),
        pytest.param("later shard", signal.SIGTERM, marks=pytest.mark.slow),  # ~1 min more
    ],
)
def test_embed_interrupted_then_resumed(work, tmp_path, moment, signum):
    """Beam's in-process runner: committed shards stay whole, the rerun does only the rest."""
    from remap_tf.serving.embeddings import load_embeddings, shard_complete

    out = tmp_path / "emb"
    argv = ["embed", "--images", str(work / "imgs"), "--model", str(work / "export")]
    argv += ["--out", str(out), "--shard-size", "4", "--batch-size", "2"]
    wanted = 1 if moment == "first shard" else 5

    def committed():
        names = [p.name for p in out.glob("shard-*.json")] if out.exists() else []
        return sorted(int(n[6:11]) for n in names if re.fullmatch(r"shard-\d{5}\.json", n))

    for _ in range(3):
        code, err = _interrupt_when(
            _remap(argv, tmp_path), lambda: len(committed()) >= wanted, signum
        )
        if not (code == -signum and (out / "manifest.json").exists()):
            break
        # The whole run finished, handlers restored, before the signal was sent: on a loaded
        # machine this poller saw the milestone only then (seen in a CI dry run: all 12
        # shards and the manifest written, exit -15). Nothing was tested: run it again.
        shutil.rmtree(out)
    _assert_interrupted(code, err)
    done = committed()
    assert len(done) >= wanted and all(shard_complete(str(out), shard) for shard in done)
    assert not (out / "manifest.json").exists()  # the run is not finished
    again = _remap(argv, tmp_path)
    stdout, err = again.communicate(timeout=240)
    assert again.returncode == 0, err[-2000:]
    assert f"{len(done)} already finished" in stdout, stdout
    ids, descriptors, _ = load_embeddings([str(out)])
    assert len(ids) == 48 and descriptors.shape[0] == 48


@pytest.mark.parametrize("moment, signum", [("start", signal.SIGINT), ("backup", signal.SIGTERM)])
def test_train_interrupted(tmp_path, moment, signum):
    from remap_cli.demo.photoset import make_photo_views

    views = make_photo_views(tmp_path / "photos", seed=3, views_per_photo=3, image_size=(64, 64))
    out = tmp_path / "run"
    argv = ["train", "--data", str(views.train_csv), "--out", str(out), "--backbone"]
    argv += ["mobilenet", "--set", "model.backbone_kwargs={alpha: 0.25}", "--set"]
    argv += ["model.levels=1", "--set", "init.num_images=8", "--set", "tensorboard=false"]
    argv += ["--epochs", "6", "--steps-per-epoch", "2", "--batch-size", "4", "--image-size"]
    argv += ["64", "--verbose", "0"]

    def milestone():
        return moment == "start" or (out / "backup" / "training_metadata.json").exists()

    process = _remap(argv, tmp_path)
    if moment == "start":
        time.sleep(2.0)
    _assert_interrupted(*_interrupt_when(process, milestone, signum))
    model = out / "model.keras"
    assert not model.exists(), "training was interrupted, yet a final model was written"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")] if out.exists() else True
    if moment == "backup":  # issue 21, item 12: the run left logs/ and its rerun was refused
        again = _remap(argv, tmp_path)
        _, err = again.communicate(timeout=300)
        assert again.returncode == 0, err[-2000:]
        assert model.is_file()


def _run_script(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", text], env=ENV, capture_output=True, text=True, timeout=60
    )


_UNRAISABLE = """
import signal, time, weakref
from remap_cli.args import Interrupts

class Thing:
    pass

with Interrupts() as interrupts:
    other = Thing()
    other_ref = weakref.ref(other, lambda r: 1 / 0)
    del other  # an unrelated unraisable error is still reported
    try:
        thing = Thing()
        ref = weakref.ref(thing, lambda r: interrupts._handle(signal.SIGTERM, None))
        del thing  # the handler raises inside a weakref callback: Python cannot propagate it
        for _ in range(2000):  # ordinary code, where the signal delivered again raises
            time.sleep(0.001)
        print("ran on")
    except KeyboardInterrupt:
        print("stopped in ordinary code")
print("requested", interrupts.requested)
"""


def test_interrupt_landing_in_a_weakref_callback_prints_no_traceback():
    """A signal can arrive while Python runs a weakref callback (seen in CI during
    ``remap train``, which then ran to the end): the KeyboardInterrupt cannot propagate there
    and Python would print it with a traceback. It is silenced and raised again in ordinary
    code; other unraisable errors are still printed."""
    done = _run_script(_UNRAISABLE)
    assert done.returncode == 0, done.stderr
    assert "stopped in ordinary code" in done.stdout and "ran on" not in done.stdout
    assert "requested True" in done.stdout
    assert "KeyboardInterrupt" not in done.stderr
    assert "ZeroDivisionError" in done.stderr


_UNRAISABLE_AT_THE_END = """
import signal, time, weakref
from remap_cli.args import Interrupts

class Thing:
    pass

with Interrupts() as interrupts:
    thing = Thing()
    ref = weakref.ref(thing, lambda r: interrupts._handle(signal.SIGTERM, None))
    del thing  # swallowed just before the command ends
time.sleep(0.3)  # the interrupt is not delivered again once the command has ended
print("requested", interrupts.requested)
"""


def test_interrupt_swallowed_as_the_command_ends_is_still_recorded():
    done = _run_script(_UNRAISABLE_AT_THE_END)
    assert done.returncode == 0, done.stderr
    assert "requested True" in done.stdout
    assert "Traceback" not in done.stderr
