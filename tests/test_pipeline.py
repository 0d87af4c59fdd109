"""Decoding odd and broken image files (training.images), P x K batches (training.sampling),
the dataset builders (training.pipeline), and training through bad files."""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import threading
import zlib

import keras
import numpy as np
import pytest
from PIL import Image

from remap_tf.errors import InvalidInputError
from remap_tf.losses import TripletLoss
from remap_tf.model import REMAP
from remap_tf.training.data import Manifest, load_manifest
from remap_tf.training.images import (
    BadFileLog,
    BadFileReporter,
    BadImageError,
    decode_image_file,
    unusable_data_guard,
)
from remap_tf.training.pipeline import (
    BAD_LABEL,
    embed_batches,
    embed_dataset,
    make_eval_dataset,
    make_indexed_dataset,
    make_train_dataset,
)
from remap_tf.training.sampling import balanced_batch_indices

RED, GREEN = (255, 0, 0), (0, 255, 0)


def _png16_rgb(path, pixels):
    """Writes a 16-bit-per-channel RGB PNG by hand (Pillow cannot write one)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _write_odd_files(folder):
    """Good files in unusual formats, each with the RGB values it must decode to."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}

    cmyk = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # C=0 M=Y=255: red
    cmyk.paste((255, 0, 255, 0), (16, 0, 32, 16))  # M=0, C=Y=255: green
    cmyk.save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = {(8, 4): RED, (8, 24): GREEN}

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent: the white background
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black over white: 255 * 127 / 255
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    expected["rgba.png"] = {(0, 0): RED, (0, 1): (255, 255, 255), (0, 2): (127, 127, 127)}

    gray16 = np.array([[0, 257 * 100, 65535, 32768]], np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")  # mode I;16, bit depth 16
    expected["gray16.png"] = {(0, 1): (100,) * 3, (0, 2): (255,) * 3, (0, 3): (128,) * 3}

    rgb16 = np.array([[[65535, 0, 257 * 50], [0, 257 * 200, 0]]], np.uint16)
    _png16_rgb(folder / "rgb16.png", rgb16)
    expected["rgb16.png"] = {(0, 0): (255, 0, 50), (0, 1): (0, 200, 0)}

    Image.new("L", (5, 3), 77).save(folder / "gray.png")
    expected["gray.png"] = {(2, 4): (77, 77, 77)}

    gif = Image.new("P", (4, 4), 0)
    gif.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    gif.putpixel((3, 0), 1)
    gif.save(folder / "palette.gif")
    expected["palette.gif"] = {(0, 0): RED, (0, 3): GREEN}

    Image.new("RGB", (6, 2), (10, 20, 30)).save(folder / "plain.bmp")
    expected["plain.bmp"] = {(1, 5): (10, 20, 30)}

    rotated = Image.new("RGB", (40, 16), (200, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the decoded image is 40 high, 16 wide
    rotated.save(folder / "exif.jpg", exif=exif)
    expected["exif.jpg"] = {(30, 8): (200, 200, 200)}
    return expected


def _write_bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.jpg").write_bytes(b"")
    buffer = folder / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buffer)
    data = buffer.read_bytes()
    buffer.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.jpg").write_text("this is not an image\n")
    return ["zero.jpg", "truncated.jpg", "text.jpg"]


def test_odd_formats_decode_to_the_right_rgb_values(tmp_path):
    expected = _write_odd_files(tmp_path)
    for name, pixels in expected.items():
        image = decode_image_file(tmp_path / name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        tolerance = 12 if name.endswith(".jpg") else 1
        for (row, col), rgb in pixels.items():
            np.testing.assert_allclose(image[row, col], rgb, atol=tolerance, err_msg=name)
    assert decode_image_file(tmp_path / "exif.jpg").shape == (40, 16, 3)


def test_bad_files_raise_a_value_error_naming_the_path(tmp_path):
    for name in [*_write_bad_files(tmp_path), "missing.jpg"]:
        with pytest.raises(ValueError, match=name) as info:
            decode_image_file(tmp_path / name)
        assert isinstance(info.value, BadImageError)
        assert info.value.path == str(tmp_path / name)


def test_bad_file_log_is_thread_safe_and_reports_each_file_once(capsys):
    log = BadFileLog()

    def add_all():
        for i in range(200):
            log.add(f"/data/{i % 50}.jpg", "broken")

    threads = [threading.Thread(target=add_all) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert log.count == 50 and len(set(log.paths)) == 50
    assert "/data/7.jpg" in log and "/data/50.jpg" not in log
    assert log.report().startswith("50 bad image file(s) skipped:")
    assert BadFileLog().report() == "No bad image files."

    reporter = BadFileReporter(log)
    logs = {}
    reporter.on_epoch_end(0, logs)
    reporter.on_epoch_end(1, {})
    log.add("/data/new.jpg", "empty file (0 bytes)")
    logs = {}
    reporter.on_epoch_end(2, logs)
    printed = capsys.readouterr().out
    assert printed.count("/data/7.jpg") == 1
    assert "/data/new.jpg (empty file (0 bytes)) [epoch 3]" in printed
    assert logs["bad_files"] == 51
    with pytest.raises(ValueError, match="BadFileLog"):
        BadFileReporter(["not a log"])


def _solid_manifest(folder, colours, per_class=3, size=(24, 20)):
    for c, colour in enumerate(colours):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, colour).save(folder / f"class{c}" / f"{i}.png")
    return load_manifest(folder)


def test_train_batches_are_class_balanced_static_and_seeded(tmp_path):
    colours = [(40 * c, 255 - 40 * c, 100) for c in range(5)]
    manifest = _solid_manifest(tmp_path, colours)
    dataset = make_train_dataset(
        manifest, image_size=16, classes_per_batch=3, images_per_class=2, seed=3, geometry="crop"
    )
    assert dataset.element_spec[0].shape.as_list() == [6, 16, 16, 3]
    assert dataset.element_spec[1].shape.as_list() == [6]
    batches = list(dataset.take(4).as_numpy_iterator())
    for images, labels in batches:
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert images.min() >= 0.0 and images.max() <= 255.0
        values, counts = np.unique(labels, return_counts=True)
        assert values.size == 3 and np.all(counts == 2)
        np.testing.assert_array_equal(labels, np.repeat(labels[::2], 2))  # K in a row
    again = list(
        make_train_dataset(manifest, 16, 3, 2, seed=3, geometry="crop").take(4).as_numpy_iterator()
    )
    for (x1, y1), (x2, y2) in zip(batches, again, strict=True):
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(x1, x2)
    other = list(make_train_dataset(manifest, 16, 3, 2, seed=4).take(4).as_numpy_iterator())
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(batches, other, strict=True))

    # Without augmentation a solid image comes out as its exact colour.
    images, labels = next(iter(make_train_dataset(manifest, 16, 3, 2, augment=False)))
    for image, label in zip(images.numpy(), labels.numpy(), strict=True):
        np.testing.assert_allclose(image, np.broadcast_to(colours[label], image.shape), atol=1e-3)


def test_shards_split_the_same_global_batches(tmp_path):
    manifest = _solid_manifest(tmp_path, [(30 * c, 0, 0) for c in range(6)], per_class=2)
    whole = list(make_train_dataset(manifest, 8, 4, 2, seed=1).take(3).as_numpy_iterator())
    parts = [
        list(make_train_dataset(manifest, 8, 4, 2, seed=1, shard=(2, i)).take(3)) for i in range(2)
    ]
    for step, (_, labels) in enumerate(whole):
        first, second = parts[0][step][1].numpy(), parts[1][step][1].numpy()
        assert first.shape == (4,)
        np.testing.assert_array_equal(np.concatenate([first, second]), labels)
        assert not set(first) & set(second)  # P = 4 over 2 shards: whole classes each
    with pytest.raises(ValueError, match="divisible"):
        make_train_dataset(manifest, 8, 3, 3, shard=(2, 0))
    with pytest.raises(ValueError, match="shard"):
        make_train_dataset(manifest, 8, 4, 2, shard=(2, 2))


def test_balanced_indices_cycle_small_classes_and_check_class_count():
    labels = np.array([0, 1, 1, 1, 1, 2, 2])
    batches = list(balanced_batch_indices(labels, 3, 3, seed=0).take(3).as_numpy_iterator())
    for batch in batches:
        assert sorted(set(labels[batch])) == [0, 1, 2]
        groups = {labels[batch[i]]: batch[i : i + 3] for i in range(0, 9, 3)}
        np.testing.assert_array_equal(groups[0], [0, 0, 0])  # one image, cycled
        assert len(set(groups[1])) == 3  # four images: three distinct ones
        assert set(groups[2].tolist()) == {5, 6}  # two images, both used
    with pytest.raises(ValueError, match="only 3 usable classes"):
        balanced_batch_indices(labels, 4, 2)


def test_a_class_whose_files_are_all_bad_never_stalls_the_stream(tmp_path):
    _solid_manifest(tmp_path, [RED, GREEN])
    (tmp_path / "z_broken").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "z_broken" / name).write_text("not an image")
    manifest = load_manifest(tmp_path)
    log = BadFileLog()
    dataset = make_train_dataset(manifest, 16, 2, 2, bad_files=log)
    for images, labels in dataset.take(4).as_numpy_iterator():
        assert images.shape[0] == 4 and max(images.shape[1:3]) == 16
        assert 2 not in labels  # the broken class never reaches a batch
    assert sorted(log.paths) == sorted(str(tmp_path / "z_broken" / n) for n in ("a.jpg", "b.png"))


@pytest.mark.timeout(120, method="thread")  # a hang is inside TensorFlow
def test_too_few_readable_classes_stop_the_stream_with_one_line(tmp_path):
    """Issue 21, item 10: with fewer classes holding a readable image than a batch needs, no
    batch can ever be made; the stream used to wait for one forever (and `remap train` on a CSV
    of missing files hung, deaf to Ctrl-C). It now stops, and the log says why in one line."""
    readable = _solid_manifest(tmp_path, [RED])
    missing = [str(tmp_path / "gone" / f"{i}.jpg") for i in range(2)]
    manifest = Manifest(readable.paths + missing, [0, 0, 0, 1, 1], ["red", "gone"])
    log = BadFileLog()
    dataset = make_train_dataset(manifest, 16, classes_per_batch=2, images_per_class=2,
                                 bad_files=log)  # fmt: skip
    with pytest.raises(Exception, match="no batch can be made"):
        for _ in dataset.take(4):
            pass
    assert log.unusable.startswith("no batch can be made: 1 of 2 classes have no readable image")
    assert "\n" not in log.unusable and "file not found" in log.unusable
    with (
        pytest.raises(InvalidInputError, match="^no batch can be made") as raised,
        unusable_data_guard(log),
    ):
        next(iter(dataset))
    assert raised.value.__cause__ is None


def test_aspect_geometry_keeps_the_aspect_ratio_everywhere(tmp_path):
    """Evaluation resizes the whole image to the long side (the exported graph's rule);
    training batches take one aspect each (4:3, 1:1, 3:4) and crop to it, never stretch."""
    image = np.zeros((40, 80, 3), np.uint8)  # 2:1, left half red, right half blue
    image[:, :40] = RED
    image[:, 40:] = (0, 0, 255)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(image).save(tmp_path / c / f"{i}.png")
    manifest = load_manifest(tmp_path)
    whole = next(iter(make_eval_dataset(manifest, 128)))[0].numpy()[0]
    assert whole.shape == (64, 128, 3)  # 40x80 -> long side 128, aspect kept
    np.testing.assert_allclose(whole[:, :60], np.broadcast_to(RED, (64, 60, 3)), atol=1e-3)
    shapes = set()
    for images, _ in make_train_dataset(manifest, 32, 2, 2, augment=False, seed=5).take(12):
        assert images.shape[0] == 4
        shapes.add(tuple(images.shape[1:3]))
        crop = images.numpy()[0]  # the middle of a 2:1 image: red left of centre, blue right
        left, right = crop[:, 0], crop[:, -1]
        np.testing.assert_allclose(left, np.broadcast_to(RED, left.shape), atol=1e-3)
        np.testing.assert_allclose(right, np.broadcast_to((0, 0, 255), right.shape), atol=1e-3)
    assert shapes == {(24, 32), (32, 32), (32, 24)}


def test_square_modes_crop_the_centre_or_pad_with_black(tmp_path):
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :32] = RED
    image[:, 32:] = (0, 0, 255)
    (tmp_path / "c").mkdir()
    Image.fromarray(image).save(tmp_path / "c" / "wide.png")
    manifest = load_manifest(tmp_path)
    crop = next(iter(make_eval_dataset(manifest, 32, geometry="crop")))[0].numpy()[0]
    np.testing.assert_allclose(crop[:, :14], np.broadcast_to(RED, (32, 14, 3)), atol=1e-3)
    np.testing.assert_allclose(crop[:, 18:], np.broadcast_to((0, 0, 255), (32, 14, 3)), atol=1e-3)
    pad = next(iter(make_eval_dataset(manifest, 32, geometry="pad")))[0].numpy()[0]
    assert np.all(pad[:8] == 0) and np.all(pad[24:] == 0)  # 64x32 -> 32x16, 8 rows each side
    np.testing.assert_allclose(pad[8:24, :14], np.broadcast_to(RED, (16, 14, 3)), atol=1e-3)


def test_bad_arguments_raise_clear_errors(tmp_path):
    manifest = _solid_manifest(tmp_path, [RED, GREEN])
    with pytest.raises(ValueError, match="classes_per_batch"):
        make_train_dataset(manifest, classes_per_batch=1)
    with pytest.raises(ValueError, match="images_per_class"):
        make_train_dataset(manifest, images_per_class=1)
    with pytest.raises(ValueError, match="only 2 usable classes"):
        make_train_dataset(manifest, classes_per_batch=3)
    with pytest.raises(ValueError, match="image_size"):
        make_eval_dataset(manifest, image_size=0)
    with pytest.raises(ValueError, match="geometry"):
        make_eval_dataset(manifest, geometry="stretch")
    with pytest.raises(ValueError, match="Manifest"):
        make_train_dataset(str(tmp_path))
    singles = Manifest(["a.jpg", "b.jpg"], [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="two or more images"):
        make_train_dataset(singles)


def test_training_runs_through_bad_and_odd_files_and_reports_them(tmp_path, capsys, caplog):
    """Acceptance: zero-byte, truncated and text-as-.jpg files next to CMYK, RGBA and 16-bit
    images; a tiny REMAP model fits a few steps to the end and the three bad files are
    reported once each by path."""
    root = tmp_path / "data"
    odd = _write_odd_files(root / "odd")
    bad = _write_bad_files(root / "bad")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"photos{c}").mkdir()
        for i in range(3):
            pixels = rng.integers(0, 255, (40, 48, 3), np.uint8)
            Image.fromarray(pixels).save(root / f"photos{c}" / f"{i}.jpg")
    # The bad files' class also has good images, so they are replaced within their class.
    Image.new("RGB", (30, 30), (9, 9, 9)).save(root / "bad" / "good.png")
    manifest = load_manifest(root)
    bad_paths = sorted(str(root / "bad" / name) for name in bad)

    log = BadFileLog()
    dataset = make_train_dataset(
        manifest, image_size=64, classes_per_batch=2, images_per_class=4, bad_files=log
    )
    keras.utils.set_random_seed(0)
    model = REMAP("mobilenet", levels=2, backbone_kwargs={"alpha": 0.25})
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=TripletLoss())
    with caplog.at_level(logging.WARNING, logger="remap.training"):
        history = model.fit(
            dataset,
            steps_per_epoch=4,
            epochs=2,
            callbacks=[BadFileReporter(log)],
            shuffle=False,
            verbose=0,
        )
    assert len(history.history["loss"]) == 2
    assert all(np.isfinite(history.history["loss"]))
    # The "bad" class has 4 files and K = 4, so each batch that picks it (2 classes of 4, half
    # the batches) tries all four: 8 steps miss it with probability 2^-8, and the seed is fixed.
    assert sorted(log.paths) == bad_paths
    assert history.history["bad_files"][-1] == 3
    printed = capsys.readouterr().out
    for path in bad_paths:
        assert printed.count(path) == 1, printed
        assert caplog.text.count(path) == 1

    # Evaluation keeps every file in its place; bad ones get BAD_LABEL and a black image.
    eval_log = BadFileLog()
    images, labels = [], []
    squares = make_eval_dataset(manifest, 32, 5, bad_files=eval_log, geometry="crop")
    for x, y in squares:
        images.append(x.numpy())
        labels.append(y.numpy())
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert images.shape == (len(manifest), 32, 32, 3)
    is_bad = np.isin(manifest.paths, bad_paths)
    np.testing.assert_array_equal(labels[is_bad], BAD_LABEL)
    np.testing.assert_array_equal(labels[~is_bad], manifest.labels[~is_bad])
    assert np.all(images[is_bad] == 0)
    assert sorted(eval_log.paths) == bad_paths
    # The odd files reach the model as their true colours.
    cmyk = manifest.paths.index(str(root / "odd" / "cmyk.jpg"))
    np.testing.assert_allclose(images[cmyk, 16, 4], RED, atol=16)
    np.testing.assert_allclose(images[cmyk, 16, 28], GREEN, atol=16)
    assert set(odd) <= {p.rsplit("/", 1)[-1] for p in manifest.paths}


def test_indexed_batches_hold_the_picked_images_in_order(tmp_path):
    """`make_indexed_dataset` (the miner's tuple batches): batch ``step`` holds exactly the
    manifest images ``next_indices(step)`` picked, in that order; a bad file is replaced by
    another image of its class."""
    colours = [(50 * c, 255 - 50 * c, 20) for c in range(4)]
    manifest = _solid_manifest(tmp_path, colours, per_class=2)
    broken = manifest.paths.index(str(tmp_path / "class3" / "0.png"))
    (tmp_path / "class3" / "0.png").write_text("not an image")
    picks = np.array([[0, 2, 5], [7, broken, 1]], np.int64)
    steps = []

    def next_indices(step):
        steps.append(int(step))
        return picks[int(step) % 2]

    log = BadFileLog()
    dataset = make_indexed_dataset(
        manifest, next_indices, batch=3, image_size=16, augment=False, bad_files=log
    )
    for step, (images, labels) in enumerate(dataset.take(2).as_numpy_iterator()):
        np.testing.assert_array_equal(labels, manifest.labels[picks[step]])
        assert images.shape[0] == 3 and images.shape[1:3] in ((12, 16), (16, 16), (16, 12))
        for image, label in zip(images, labels, strict=True):
            solid = np.broadcast_to(colours[label], image.shape)
            np.testing.assert_allclose(image, solid, atol=1e-3)
    assert steps[:2] == [0, 1]
    assert log.paths == [str(tmp_path / "class3" / "0.png")]
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        make_indexed_dataset(manifest, next_indices, batch=0)
    with pytest.raises(ValueError, match="geometry"):
        make_indexed_dataset(manifest, next_indices, batch=2, geometry="stretch")


def test_embed_batches_and_embed_dataset_keep_order_across_shapes():
    """A model that averages each channel: the descriptor of a solid image is its colour, so
    the rows can be read off; batches of different shapes go through one function."""
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    first = np.stack([np.full((4, 6, 3), v, np.float32) for v in (1.0, 2.0)])
    second = np.full((1, 8, 3, 3), 7.0, np.uint8)  # another shape, another dtype
    descriptors = embed_batches(model, [first, second])
    assert descriptors.dtype == np.float32
    np.testing.assert_allclose(descriptors, [[1.0] * 3, [2.0] * 3, [7.0] * 3])
    assert embed_batches(model, []).shape == (0, 0)

    dataset = [(first, np.array([3, 4], np.int32)), (second, np.array([5], np.int32))]
    descriptors, labels = embed_dataset(model, dataset)
    np.testing.assert_allclose(descriptors[:, 0], [1.0, 2.0, 7.0])
    np.testing.assert_array_equal(labels, [3, 4, 5])
    empty = embed_dataset(model, [])
    assert empty[0].shape == (0, 0) and empty[1].shape == (0,)


def test_names_moved_out_of_the_pipeline_still_import_from_it():
    """Decoding, geometry and sampling moved to their own modules; the public names users
    imported from `training.pipeline` are the same objects there."""
    from remap_tf.training import geometry, images, pipeline, sampling

    assert pipeline.BadFileLog is images.BadFileLog
    assert pipeline.BadFileReporter is images.BadFileReporter
    assert pipeline.BadImageError is images.BadImageError
    assert pipeline.decode_image_file is images.decode_image_file
    assert pipeline.balanced_batch_indices is sampling.balanced_batch_indices
    assert pipeline.GEOMETRIES is geometry.GEOMETRIES
    assert pipeline.BATCH_ASPECTS is geometry.BATCH_ASPECTS
    assert pipeline.MIN_CROP_AREA == geometry.MIN_CROP_AREA
    assert all(hasattr(pipeline, name) for name in pipeline.__all__)


_EXIT_SCRIPT = """
import sys
from remap_tf.training.data import load_manifest
from remap_tf.training.pipeline import make_train_dataset
if sys.argv[2] == "ungated":  # to check that this test fails without the exit gate
    import atexit
    from remap_tf.training import pipeline
    atexit.unregister(pipeline._EXIT_GATE.close)
dataset = make_train_dataset(load_manifest(sys.argv[1]), 64, 2, 2)
iterator = iter(dataset)
next(iterator)
print("first batch", flush=True)
raise RuntimeError("user code failed while the iterator is still alive")
"""


def test_process_exits_while_prefetch_threads_are_decoding(tmp_path):
    """A live iterator at exit (here held by an exception's traceback) must not hang the
    interpreter while its threads are inside the Python decoder (big JPEGs keep them there)."""
    gradient = np.linspace(0, 255, 2400, dtype=np.uint8)
    big = np.stack(np.broadcast_arrays(gradient[None, :], gradient[:1800, None], np.uint8(128)), -1)
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(3):
            Image.fromarray(np.ascontiguousarray(big)).save(tmp_path / f"c{c}" / f"{i}.jpg")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path), "gated"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert "first batch" in run.stdout, run.stderr[-2000:]
    assert run.returncode == 1 and "still alive" in run.stderr
