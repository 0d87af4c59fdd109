"""Export for TF Serving: signatures against the Keras model in a TensorFlow-only process,
input guards, assets, warm-up records, versions and atomicity, and the `remap export` CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from google.protobuf import text_format
from PIL import Image
from tensorflow_serving.config import model_server_config_pb2

import remap_tf
from remap_cli import main as cli
from remap_tf import contract, imageheaders
from remap_tf.export import graph, server_files, warmup
from remap_tf.export import saved_model as sm
from tests import gif_bombs

IMAGE_SIZE = 96
SCALES = (1.0, 0.75)
SMALL_MAX_PIXELS = 150 * 150
VENV_BIN = Path(sys.executable).parent


def smooth_image(height, width, seed):
    """Photo-like uint8 RGB: low-resolution noise upsampled, so descriptors differ per image."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (1, 6, 6, 3)).astype("float32")
    return tf.cast(tf.image.resize(coarse, (height, width))[0], tf.uint8).numpy()


def encode(pixels, fmt, mode="RGB"):
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def sample_images():
    """Encoded images of four formats, several sizes and colour modes."""
    return [
        encode(smooth_image(120, 80, 1), "PNG"),
        encode(smooth_image(70, 150, 2), "JPEG"),
        encode(smooth_image(64, 64, 3), "BMP"),
        encode(smooth_image(90, 90, 4), "GIF"),
        encode(smooth_image(100, 110, 5), "PNG", mode="L"),
        encode(smooth_image(130, 60, 6), "PNG", mode="RGBA"),
    ]


def keras_descriptors(model, pixels_list, sizes):
    """The reference: the Keras model on each image resized (aspect kept) to each long side,
    summed over sizes, L2-normalised. Rows in input order."""
    rows = []
    for pixels in pixels_list:
        total = sum(
            model(graph.resize_images(pixels[np.newaxis], size), training=False)[0].numpy()
            for size in sizes
        )
        rows.append(total / np.linalg.norm(total))
    return np.stack(rows)


def decoded(data):
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


_SHARED = {}


def shared_export(tmp_path_factory):
    """A tiny calibrated REMAP model and two exports of it into one base folder (version 1
    single-scale; version 2 multi-scale with a small pixel limit), made once per session
    and shared with tests/test_client.py: exporting costs seconds of tracing."""
    if not _SHARED:
        keras.utils.set_random_seed(7)
        model = remap_tf.REMAP("mobilenet", backbone_kwargs={"alpha": 0.25})
        # Random-init MobileNet taps vanish (~1e-12) without BatchNorm statistics; calibrate
        # so descriptors carry the image (otherwise the comparisons would be vacuous).
        calibration = np.stack([smooth_image(96, 96, 100 + i) for i in range(16)])
        remap_tf.recalibrate_batch_norm(model, calibration.astype("float32"), batch_size=16)
        base = tmp_path_factory.mktemp("models") / "remap"
        # verify=False: the warm-up replay is tested on its own below; skipping it here
        # saves two SavedModel loads.
        v1 = sm.export_model(
            model, base, image_size=IMAGE_SIZE, config={"backbone": "mobilenet"}, verify=False
        )
        v2 = sm.export_model(model, base, image_size=IMAGE_SIZE, scales=SCALES,
                             max_pixels=SMALL_MAX_PIXELS, verify=False)  # fmt: skip
        _SHARED.update(model=model, exported=(base, v1, v2))
    return _SHARED["model"], _SHARED["exported"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return shared_export(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return shared_export(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def loaded(exported):
    """The two versions loaded in this process (loading costs seconds: once per module)."""
    _, v1, v2 = exported
    return tf.saved_model.load(str(v1)), tf.saved_model.load(str(v2))


def test_exporting_twice_creates_versions_1_and_2(exported):
    base, v1, v2 = exported
    assert (v1.name, v2.name) == ("1", "2")
    assert sorted(p.name for p in base.iterdir()) == [
        "1",
        "2",
        server_files.BATCHING_FILE,
        server_files.COMPOSE_FILE,
        server_files.MODELS_CONFIG,
    ]
    for version in (v1, v2):
        assert (version / "saved_model.pb").is_file()
        assert (version / "variables" / "variables.index").is_file()


_TF_ONLY_SCRIPT = r"""
import importlib.abc, json, sys
from pathlib import Path

class _Block(importlib.abc.MetaPathFinder):
    # A serving process has no project code: any import of it fails loudly.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("remap_tf", "remap_cli", "bench"):
            raise ImportError(f"serving process imported project module {name}")
        return None

sys.meta_path.insert(0, _Block())
import numpy as np
import tensorflow as tf

keras_before = {m for m in sys.modules if m.split(".")[0] == "keras"}
folder = Path(sys.argv[1])
encoded = [p.read_bytes() for p in sorted(folder.glob("image_*.bin"))]
pixels = np.load(folder / "pixels.npy")
results = {}
for tag, path in json.loads(sys.argv[2]).items():
    loaded = tf.saved_model.load(path)
    assert sorted(loaded.signatures) == ["embed_pixels", "serving_default"], loaded.signatures
    by_bytes = loaded.signatures["serving_default"]
    by_pixels = loaded.signatures["embed_pixels"]
    results[tag + "_bytes_batch"] = by_bytes(images=tf.constant(encoded))["descriptors"].numpy()
    results[tag + "_bytes_alone"] = np.concatenate(
        [by_bytes(images=tf.constant([e]))["descriptors"].numpy() for e in encoded])
    results[tag + "_pixels"] = by_pixels(images=tf.constant(pixels))["descriptors"].numpy()
    results[tag + "_pixels_alone"] = np.concatenate(
        [by_pixels(images=tf.constant(p[None]))["descriptors"].numpy() for p in pixels])
    empty = by_bytes(images=tf.constant([], tf.string))["descriptors"]
    results[tag + "_empty_shape"] = np.array(empty.shape)
new_keras = {m for m in sys.modules if m.split(".")[0] == "keras"} - keras_before
assert not new_keras, f"loading the SavedModel imported Keras modules: {sorted(new_keras)[:5]}"
np.savez(folder / "results.npz", **results)
"""


def test_signatures_in_a_tensorflow_only_process_equal_keras(model, exported, tmp_path):
    """Load each version in a subprocess that can import only TensorFlow, call every
    signature; compare with the Keras model on the same decoded, resized pixels."""
    _, v1, v2 = exported
    encoded = sample_images()
    for i, data in enumerate(encoded):
        (tmp_path / f"image_{i}.bin").write_bytes(data)
    pixels = np.stack([smooth_image(80, 120, 20 + i) for i in range(3)])
    np.save(tmp_path / "pixels.npy", pixels)
    script = tmp_path / "tf_only.py"
    script.write_text(_TF_ONLY_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path), json.dumps({"v1": str(v1), "v2": str(v2)})],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = np.load(tmp_path / "results.npz")

    decoded_images = [decoded(data) for data in encoded]
    for tag, sizes in (("v1", [IMAGE_SIZE]), ("v2", [round(IMAGE_SIZE * s) for s in SCALES])):
        want_bytes = keras_descriptors(model, decoded_images, sizes)
        want_pixels = keras_descriptors(model, list(pixels), sizes)
        np.testing.assert_allclose(results[f"{tag}_bytes_batch"], want_bytes, atol=1e-5)
        np.testing.assert_allclose(results[f"{tag}_pixels"], want_pixels, atol=1e-5)
        # A descriptor does not depend on the rest of the batch.
        np.testing.assert_allclose(
            results[f"{tag}_bytes_alone"], results[f"{tag}_bytes_batch"], atol=1e-5
        )
        np.testing.assert_allclose(
            results[f"{tag}_pixels_alone"], results[f"{tag}_pixels"], atol=1e-5
        )
        np.testing.assert_allclose(np.linalg.norm(results[f"{tag}_bytes_batch"], axis=1), 1.0,
                                   atol=1e-5)  # fmt: skip
        assert tuple(results[f"{tag}_empty_shape"]) == (0, model.output_shape[-1])
    # The comparisons above can fail: the images give clearly different descriptors, and
    # multi-scale differs from single-scale.
    cosines = want_bytes @ want_bytes.T
    assert cosines[~np.eye(len(cosines), dtype=bool)].max() < 0.999
    assert np.abs(results["v1_bytes_batch"] - results["v2_bytes_batch"]).max() > 1e-3


def test_saved_model_cli_lists_the_signatures(exported):
    _, v1, _ = exported
    run = subprocess.run(
        [str(VENV_BIN / "saved_model_cli"), "show", "--dir", str(v1), "--all"],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    for signature in ("serving_default", "embed_pixels"):
        assert f"signature_def['{signature}']" in out
    assert "dtype: DT_STRING" in out and "dtype: DT_UINT8" in out
    assert out.count("outputs['descriptors']") >= 2


def test_warmup_records_parse_and_the_model_answers_them(model, exported, loaded):
    _, v1, _ = exported
    records = warmup.read_warmup_requests(v1 / "assets.extra" / contract.WARMUP_FILE)
    assert len(records) == 3  # one image, two images of different formats, one pixel array
    loaded = loaded[0]
    seen = set()
    for record in records:
        request = record.predict_log.request
        assert request.model_spec.name == "remap"
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        out = loaded.signatures[request.model_spec.signature_name](**inputs)["descriptors"]
        assert out.shape == (inputs["images"].shape[0], model.output_shape[-1])
        assert np.all(np.isfinite(out.numpy()))
        seen.add(request.model_spec.signature_name)
    assert seen == {"serving_default", "embed_pixels"}


def test_config_asset_and_server_files(model, exported):
    base, v1, v2 = exported
    meta = json.loads((v1 / "assets" / contract.CONFIG_ASSET).read_text())
    assert meta["descriptor_dim"] == model.output_shape[-1]
    assert meta["config"] == {"backbone": "mobilenet"}
    assert (meta["image_size"], meta["scales"]) == (IMAGE_SIZE, [1.0])
    meta2 = json.loads((v2 / "assets" / contract.CONFIG_ASSET).read_text())
    assert (meta2["scales"], meta2["max_pixels"]) == (list(SCALES), SMALL_MAX_PIXELS)

    config = text_format.Parse(
        (base / server_files.MODELS_CONFIG).read_text(), model_server_config_pb2.ModelServerConfig()
    )
    (entry,) = config.model_config_list.config
    assert (entry.name, entry.base_path, entry.model_platform) == (
        "remap",
        "/models/remap",
        "tensorflow",
    )
    batching = (base / server_files.BATCHING_FILE).read_text()
    assert "pad_variable_length_inputs: false" in batching
    assert "max_batch_size { value: 32 }" in batching
    compose = yaml.safe_load((base / server_files.COMPOSE_FILE).read_text())
    service = compose["services"]["remap"]
    assert "tensorflow/serving" in service["image"]
    assert service["volumes"] == ["./:/models/remap:ro"]
    assert "--model_config_file=/models/remap/models.config" in service["command"]
    assert "--batching_parameters_file=/models/remap/batching_parameters.txt" in service["command"]


def test_server_files_are_never_overwritten(tmp_path):
    (tmp_path / server_files.MODELS_CONFIG).write_text("# edited by hand\n")
    written = server_files.write_server_files(tmp_path, "remap")
    assert (tmp_path / server_files.MODELS_CONFIG).read_text() == "# edited by hand\n"
    assert sorted(p.name for p in written) == [server_files.BATCHING_FILE,
                                                server_files.COMPOSE_FILE]  # fmt: skip


def _bomb_png(width, height):
    """A PNG whose header claims width x height (the pixel data is never reached)."""
    png = encode(smooth_image(8, 8, 0), "PNG")
    return png[:16] + width.to_bytes(4, "big") + height.to_bytes(4, "big") + png[24:]


def _bomb_jpeg(width, height):
    """A JPEG whose SOF0 marker claims width x height."""
    jpeg = bytearray(encode(smooth_image(8, 8, 0), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(jpeg)


@pytest.mark.parametrize(
    ("bad", "check", "details"),
    [
        (b"this is a text file, not an image", "not an image", "images[1] is not JPEG"),
        (b"", "not an image", "(0 bytes)"),
        (_bomb_png(100_000, 100_000), "pixel limit", "images[1] is 100000x100000 pixels"),
        (_bomb_jpeg(60_000, 50_000), "pixel limit", "images[1] is 60000x50000 pixels"),
        (_bomb_png(0, 10), "pixel limit", "is 0x10 pixels"),
    ],
)
def test_input_guards_fail_with_invalid_argument(loaded, bad, check, details):
    serve = loaded[0].signatures["serving_default"]
    good = sample_images()[0]
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        serve(images=tf.constant([good, bad]))
    assert f"remap input check failed ({check})" in error.value.message
    assert details in error.value.message
    assert contract.check_tag(error.value.message) == check  # what the service reads back


@pytest.mark.parametrize(
    ("gif", "size"),
    [
        (gif_bombs.bomb(200, 200), "200x200"),  # an 8x8 screen, one 200x200 frame
        (gif_bombs.gif(frames=((8, 8), (200, 1), (1, 200))), "200x200"),  # widest x tallest
    ],
)
def test_a_gif_bomb_is_refused_by_its_largest_frame_not_decoded(loaded, gif, size):
    """Issue 21: the graph read a GIF's screen size (8x8) only, and TensorFlow decodes the
    largest frame (the output is the widest frame's width x the tallest one's height): these
    GIFs were decoded and embedded. Now every frame counts: 200 x 200 = 40000 pixels is over
    version 2's limit of 150 x 150, so the pixel check refuses them before decoding."""
    assert decoded(gif).shape == (200, 200, 3)  # what TensorFlow would have decoded
    serve = loaded[1].signatures["serving_default"]
    good = sample_images()[0]
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        serve(images=tf.constant([good, gif]))
    assert "remap input check failed (pixel limit)" in error.value.message
    assert f"images[1] is {size} pixels" in error.value.message
    small = gif_bombs.gif(screen=(120, 90), frames=((120, 90), (60, 30)))
    assert serve(images=tf.constant([small]))["descriptors"].shape[0] == 1  # within the limit


def test_the_default_limit_refuses_a_35_kb_gif_of_52_megapixels(loaded):
    """A 7200x7200 frame (51.8 million pixels, 155 MB decoded) behind an 8x8 screen, in 35 KB:
    over the default limit of 50 million, refused by version 1 from its header walk."""
    bomb = gif_bombs.bomb(7200, 7200)
    assert len(bomb) < 40_000
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"pixel limit\): images\[0\] is 7200x7200"
    ):
        loaded[0].signatures["serving_default"](images=tf.constant([bomb]))


def test_the_graph_walks_gif_blocks_as_the_reference_does():
    """`graph.gif_extent` (TensorFlow ops) gives what `imageheaders.gif_extent` (Python) gives:
    frames, extensions and local colour tables, a file cut short, and the block budget."""
    comment = b"\x21\xfe\x05,,,,,\x00"  # a comment of five ',' (the image separator byte)
    local = b"\x2c" + bytes([0, 0, 0, 0, 30, 0, 20, 0, 0x81]) + bytes(12) + b"\x02\x02\x44\x01\x00"
    cases = {
        "frames": gif_bombs.gif(frames=((8, 8), (300, 2), (5, 400))),
        "comment and local table": gif_bombs.gif()[:-1] + comment + local + b";",
        "cut short": gif_bombs.bomb(2000, 2000)[:-1000],
        "cut in a descriptor": gif_bombs.gif()[:-1] + b"\x2c\x00\x00\x00\x00\x10",
        "many sub-blocks": gif_bombs.gif()[:-1] + b"\x21\xfe" + b"\x01x" * 40 + b"\x00;",
    }
    walk = tf.function(graph.gif_extent, input_signature=[tf.TensorSpec((), tf.string)])
    short = tf.function(lambda data: graph.gif_extent(data, max_blocks=30),
                        input_signature=[tf.TensorSpec((), tf.string)])  # fmt: skip
    for name, data in cases.items():
        for function, budget in ((walk, imageheaders.GIF_MAX_BLOCKS), (short, 30)):
            height, width, complete = (v.numpy() for v in function(tf.constant(data)))
            expected = imageheaders.gif_extent(data, max_blocks=budget)
            assert (int(width), int(height), bool(complete)) == (
                expected.width,
                expected.height,
                expected.complete,
            ), (name, budget)
    assert imageheaders.gif_extent(cases["frames"]).width == 300
    assert not imageheaders.gif_extent(cases["many sub-blocks"], max_blocks=30).complete


def test_the_in_process_embedder_checks_gif_frames_for_an_older_export(tmp_path, monkeypatch):
    """Exports made before the graph walked GIF frames read the screen only and decode any
    frame; `LocalEmbedder` (``remap search``, ``remap embed``, ``remap serve`` with an export
    folder) walks the frames itself (`imageheaders.check_gif`) before the graph sees them."""
    from remap_tf.errors import ImageRejectedError
    from remap_tf.serving.client import LocalEmbedder

    def screen_only(data, max_blocks=0):  # the graph's GIF check before issue 21
        header = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 0, 10), tf.uint8), tf.int64)
        return header[8] + 256 * header[9], header[6] + 256 * header[7], tf.constant(True)

    monkeypatch.setattr(graph, "gif_extent", screen_only)
    base = tmp_path / "remap"
    sm.export_model(tiny_functional_model(), base, image_size=64, max_pixels=64 * 64, verify=False)
    monkeypatch.undo()
    bomb = gif_bombs.bomb(200, 200)  # 40000 pixels behind an 8x8 screen
    old_graph = tf.saved_model.load(str(base / "1")).signatures["serving_default"]
    assert old_graph(images=tf.constant([bomb]))["descriptors"].shape[0] == 1  # decoded
    embedder = LocalEmbedder(base)
    with pytest.raises(ImageRejectedError, match=r"Image 1 .*pixel limit.*images\[1\] is 200x200"):
        embedder.embed([gif_bombs.gif(), bomb])
    assert embedder.embed([gif_bombs.gif()]).shape == (1, 8)


def test_pixel_limit_is_the_one_set_at_export(loaded):
    big_png = encode(smooth_image(200, 200, 9), "PNG")  # 40000 pixels > SMALL_MAX_PIXELS
    big_pixels = smooth_image(200, 200, 9)[np.newaxis]
    assert (
        loaded[0]
        .signatures["serving_default"](images=tf.constant([big_png]))["descriptors"]
        .shape[0]
        == 1
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"pixel limit.*200x200"):
        loaded[1].signatures["serving_default"](images=tf.constant([big_png]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"pixel limit\): images are 200x200"):
        loaded[1].signatures["embed_pixels"](images=tf.constant(big_pixels))


def tiny_functional_model(dim=8):
    """A small (batch, h, w, 3) -> (batch, dim) model: cheap to trace for the file tests."""
    images = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(dim, 3, strides=4)(images)
    x = keras.layers.GlobalMaxPooling2D()(x)
    return keras.Model(images, remap_tf.L2Normalization()(x))


def test_an_export_under_umask_002_is_group_writable_throughout(tmp_path):
    """TensorFlow makes the SavedModel's folders 0755 whatever the umask; under a group's
    umask 002 every folder is 0775 and every file 0664, as the user's other files are."""
    previous = os.umask(0o002)
    try:
        sm.export_model(tiny_functional_model(), tmp_path / "remap", image_size=64, verify=False)
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    folders = {name: mode for name, mode in modes.items() if (tmp_path / name).is_dir()}
    files = {name: mode for name, mode in modes.items() if name not in folders}
    assert {"remap/1", "remap/1/variables", "remap/1/assets"} <= set(folders)
    assert set(folders.values()) == {0o775}, {k: oct(v) for k, v in folders.items()}
    assert set(files.values()) == {0o664}, {k: oct(v) for k, v in files.items()}


def test_failure_mid_export_leaves_no_partial_version(tmp_path):
    base = tmp_path / "remap"
    model = tiny_functional_model()
    sm.export_model(model, base, image_size=64)
    before = sorted(p.name for p in base.iterdir())

    def fail(saved_model_dir):
        assert (saved_model_dir / "saved_model.pb").is_file()  # all written, not yet renamed
        raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected failure"):
        sm.export_model(model, base, image_size=64, _before_rename=fail)
    assert sorted(p.name for p in base.iterdir()) == before  # no 2/, no hidden temp folder
    assert contract.next_version(base) == 2


def test_a_warmup_the_model_would_refuse_fails_the_export(tmp_path):
    """TF Serving refuses a version whose warm-up fails: the export checks it first."""
    big = encode(smooth_image(100, 100, 1), "PNG")
    with pytest.raises(ValueError, match=r"Warm-up request 0 .*pixel limit"):
        sm.export_model(tiny_functional_model(), tmp_path / "remap", image_size=64,
                        max_pixels=64 * 64, warmup_images=[big])  # fmt: skip
    assert [p.name for p in (tmp_path / "remap").iterdir()] == []


def test_an_existing_version_is_never_overwritten(tmp_path):
    base = tmp_path / "remap"
    (base / "3").mkdir(parents=True)
    (base / "3" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="Version 3 already exists"):
        sm.export_model(tiny_functional_model(), base, version=3, image_size=64)
    assert [p.name for p in (base / "3").iterdir()] == ["keep.txt"]
    assert contract.next_version(base) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 32}, "image_size"),
        ({"image_size": 20000}, "`image_size` must be an integer from 64 to 4096"),
        ({"image_size": 2048, "scales": (1.0, 2.5)}, "5120 px, above the 4096 px limit"),
        ({"max_pixels": 10**12}, "max_pixels"),
        ({"scales": (1.0, -1.0)}, "scales"),
        ({"image_size": 96, "scales": (1.0, 0.5)}, "below 64"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"version": 0}, "version"),
        ({"model_name": "my model"}, "Model name"),
    ],
)
def test_bad_options_are_rejected_before_writing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sm.export_model(tiny_functional_model(), tmp_path / "remap", **kwargs)
    assert not (tmp_path / "remap").exists() or not any((tmp_path / "remap").iterdir())


def test_cli_exports_a_keras_file_and_reports_bad_input(tmp_path, capsys):
    model = tiny_functional_model()
    model.save(tmp_path / "model.keras")
    (tmp_path / "config.json").write_text('{"epochs": 3}')
    out = tmp_path / "models" / "remap"
    assert cli.main(["export", "--model", str(tmp_path), "--out", str(out),
                     "--image-size", "64"]) == 0  # fmt: skip
    meta = json.loads((out / "1" / "assets" / contract.CONFIG_ASSET).read_text())
    assert meta["config"] == {"epochs": 3} and meta["descriptor_dim"] == 8

    bad_file = tmp_path / "notes.keras"
    bad_file.write_text("not a keras file")
    for argv, message in [
        (["--model", str(tmp_path / "missing.keras")], "does not exist"),
        (["--model", str(bad_file)], "not a Keras model file"),
        (["--model", str(tmp_path / "config.json")], "not a .keras file"),
        (["--model", str(tmp_path), "--version", "1"], "exports never overwrite a version"),
    ]:
        capsys.readouterr()
        assert cli.main(["export", "--out", str(out), "--image-size", "64", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def test_an_export_killed_mid_way_is_cleaned_up_by_the_next(tmp_path):
    """kill -9 during an export leaves its staging folder (issue 21, item 12: the hidden
    ``.export-1-*`` folder stayed forever); the next export removes it and takes version 1."""
    import socket

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    base = tmp_path / "remap"
    leftover = base / f".export-{child.pid}@{socket.gethostname()}~deadbeef" / "saved_model"
    leftover.mkdir(parents=True)
    (leftover / "saved_model.pb").write_bytes(b"\0" * 1000)
    assert sm.export_model(tiny_functional_model(), base, image_size=64) == base / "1"
    assert sorted(p.name for p in base.iterdir() if p.name.startswith(".export")) == []
