"""Multi-scale descriptors (issue 18): one rule, `remap_tf.model.multiscale_descriptors`,
behind the exported graph's ``--scales``, ``remap evaluate --scales`` and bench.quality."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from PIL import Image

import remap_tf
from remap_cli import main as cli
from remap_tf.model import multiscale_descriptors
from remap_tf.ops import resize_images

TINY = {"backbone": "mobilenet", "backbone_kwargs": {"alpha": 0.25}, "pooling": "gem"}


def _images(n=2, height=80, width=120, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, height, width, 3)).astype("float32")


def _tiny():
    """A random-init model whose BatchNorm statistics come from random images (else its
    features are ~1e-12 and every descriptor is the same constant row)."""
    model = remap_tf.REMAP(**TINY)
    remap_tf.recalibrate_batch_norm(model, _images(16, 96, 96, seed=99), batch_size=16)
    return model


def test_one_scale_is_the_single_scale_descriptor_and_several_are_summed():
    """scales=(1.0,) at long side 96 is exactly model(resize(x, 96)); three sizes give
    L2(d_72 + d_96 + d_136), with every d a unit row, so the result is unit too."""
    model = _tiny()
    x = _images()
    single = np.asarray(model(resize_images(x, 96), training=False))
    np.testing.assert_array_equal(np.asarray(multiscale_descriptors(model, x, [96])), single)
    parts = [np.asarray(model(resize_images(x, side), training=False)) for side in (72, 96, 136)]
    summed = np.sum(parts, axis=0)
    expected = summed / np.linalg.norm(summed, axis=1, keepdims=True)
    got = np.asarray(multiscale_descriptors(model, x, [72, 96, 136]))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(got, single, atol=1e-4)  # the other scales do change it


def _groups(root):
    """Two groups of two images (a colour pattern plus noise) and the groups JSON."""
    rng = np.random.default_rng(1)
    groups = []
    for g in range(2):
        base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.float32)
        names = []
        for m in range(2):
            pixels = np.kron(base, np.ones((20, 20, 1))) + rng.normal(0, 12, (80, 80, 3))
            name = f"g{g}_{m}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name)
            names.append(name)
        groups.append({"name": f"g{g}", "images": names})
    (root / "groups.json").write_text(json.dumps({"groups": groups}))
    return root / "groups.json"


def _evaluate(argv, capsys):
    code = cli.main(["evaluate", "--quiet", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_remap_evaluate_scales_one_equals_the_export(tmp_path, capsys):
    """`remap evaluate --model model.keras --scales 1 --image-size 64` scores exactly what
    the single-scale export of the same model scores; three scales run through the same
    export rule; a bad scale and an exported --model with --scales are one-line errors."""
    from remap_tf.export.saved_model import export_model

    dataset = _groups(tmp_path)
    model = _tiny()
    model.save(tmp_path / "model.keras")
    version = export_model(model, tmp_path / "export", image_size=64, verify=False)
    base = ["--dataset", str(dataset)]
    _evaluate([*base, "--model", str(version.parent), "--json", str(tmp_path / "a.json")], capsys)
    keras_model = ["--model", str(tmp_path / "model.keras")]
    _evaluate(
        [*base, *keras_model, "--scales", "1", "--image-size", "64"]
        + ["--json", str(tmp_path / "b.json")],
        capsys,
    )
    exported, in_process = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert exported == in_process and exported["num_queries"] == 4
    out = _evaluate([*base, *keras_model, "--scales", "1", "0.707,1.414"], capsys)
    assert "4 queries" in out
    code = cli.main(["evaluate", *base, *keras_model, "--scales", "0.001"])
    err = capsys.readouterr().err
    assert code == 2 and "--scales" in err and len(err.strip().splitlines()) == 1
    code = cli.main(["evaluate", *base, "--model", str(version.parent), "--scales", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "exported SavedModel" in err


@pytest.fixture(autouse=True)
def _clear():
    yield
    keras.backend.clear_session()
