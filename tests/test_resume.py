"""Acceptance: `remap train` killed with SIGKILL mid-run resumes from its last saved state.

The first run is killed as soon as its backup records a finished epoch (it is then inside
the next epoch). Running the same command again must start at that epoch, not at epoch 0,
and finish with model.keras. Also checks the command's one-line errors for bad input.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remap_cli.demo.photoset import make_photo_views

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 8


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _command(data, out):
    return [
        sys.executable, "-m", "remap_cli", "train",
        "--data", str(data), "--out", str(out),
        "--backbone", "mobilenet", "--set", "model.backbone_kwargs={alpha: 0.25}",
        "--set", "model.levels=1", "--set", "model.freeze_backbone=true",
        "--set", "init.num_images=16", "--set", "tensorboard=false",
        "--epochs", str(EPOCHS), "--steps-per-epoch", "4", "--batch-size", "4",
        "--image-size", "64", "--verbose", "2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    return make_photo_views(root, seed=1, views_per_photo=3, image_size=(64, 64), photos=None)


def _saved_epoch(out: Path):
    path = out / "backup" / "training_metadata.json"
    try:
        return json.loads(path.read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return None


def test_sigkill_then_rerun_resumes_and_finishes(photos, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        _command(photos.train_csv, out),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    try:
        while first.poll() is None and time.monotonic() < deadline:
            epoch = _saved_epoch(out)
            if epoch is not None and epoch >= 1:
                os.kill(first.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if first.poll() is None and time.monotonic() >= deadline:
            os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL, "the first run ended before it was killed"
    killed_at = _saved_epoch(out)
    assert killed_at is not None and 1 <= killed_at < EPOCHS
    assert not (out / "model.keras").exists()

    second = subprocess.run(
        _command(photos.train_csv, out), env=_env(), capture_output=True, text=True, timeout=300
    )
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    started = [int(m) for m in re.findall(rf"Epoch (\d+)/{EPOCHS}", output)]
    assert started and started[0] == killed_at + 1 > 1, output[-3000:]
    assert started[-1] == EPOCHS
    assert f"from epoch {killed_at}" in output
    assert (out / "model.keras").is_file() and (out / "config.yaml").is_file()
    assert not (out / "backup").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "/no/such/folder"], "--data '/no/such/folder' does not exist"),
        (["--data", "{tmp}", "--backbone", "resnet5"], "model.backbone must be one of"),
        (["--data", "{tmp}", "--config", "missing.yaml"], "missing.yaml"),
        (["--data", "{tmp}", "--strategy", "nccl"], "strategy must be one of"),
    ],
)
def test_bad_input_is_one_clear_line(photos, tmp_path, capsys, argv, message):
    from remap_cli.main import main

    argv = [a.replace("{tmp}", str(photos.train_dir)) for a in argv]
    assert main(["train", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("remap train: error:"), lines
    assert message in lines[0]
