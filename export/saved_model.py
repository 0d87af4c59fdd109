"""Exports a REMAP Keras model as a TensorFlow Serving SavedModel.

``export_model(model, "models/remap")`` writes ``models/remap/<version>/`` with two
signatures, both returning ``descriptors``, float32 ``(batch, dim)``, L2-normalised:

- ``serving_default``: ``images``, tf.string ``(batch,)`` of encoded JPEG, PNG, GIF or BMP
  bytes. Each image is checked (format, pixel limit read from the header before decoding),
  decoded to RGB, resized keeping its aspect ratio so its long side is ``image_size`` and
  embedded on its own (``tf.map_fn``), so images of different sizes share a request and a
  descriptor never depends on the rest of the batch.
- ``embed_pixels``: ``images``, uint8 ``(batch, height, width, 3)`` RGB, resized the same way.

With ``scales`` (fixed at export time) each image is embedded at every scale
``round(image_size * s)`` and the descriptors are summed and L2-normalised, as REMAP's
multi-scale variant combines 1024x768 and 1280x960 inputs (Husain & Bober, TIP 2019).

The version folder is written aside (a temporary folder in ``base_dir``) and renamed into
place at the end, so a failed export leaves nothing behind and an existing version is never
overwritten. Beside the versions (in ``base_dir``) go the files a stock
``tensorflow_model_server`` needs: see `export.server_files`.

The graph uses only stock TensorFlow ops: it loads in a process that imports TensorFlow
alone (TF Serving, ``tf.saved_model.load``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

DEFAULT_IMAGE_SIZE = 512
# 50 megapixels: larger than any camera photo users send for retrieval, far below a
# decompression bomb (a 65535 x 65535 PNG is 4.3 gigapixels, 12.9 GB decoded).
DEFAULT_MAX_PIXELS = 50_000_000
MIN_SIDE = 64  # remap_tf.model.MIN_IMAGE_SIZE: the smallest side the backbones accept
CONFIG_ASSET = "remap.json"
WARMUP_FILE = "tf_serving_warmup_requests"
INPUT_KEY = "images"
OUTPUT_KEY = "descriptors"
BYTES_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "embed_pixels"
SIGNATURES = (BYTES_SIGNATURE, PIXELS_SIGNATURE)
CHECK_PREFIX = "remap input check failed"
_HEADER_BYTES = 32


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """How images are turned into model input in the exported graph (validated once).

    Attributes:
        image_size: long side, in pixels, that every image is resized to (aspect kept; the
            short side is at least `MIN_SIDE`). Ignored when the model has a fixed input size.
        scales: factors of ``image_size`` at which each image is embedded; descriptors are
            summed then L2-normalised. ``(1.0,)`` is single-scale.
        max_pixels: largest ``height * width`` accepted, read from the file header before
            decoding.
        fixed_size: ``(height, width)`` when the model's input size is fixed, else None.
    """

    image_size: int = DEFAULT_IMAGE_SIZE
    scales: tuple[float, ...] = (1.0,)
    max_pixels: int = DEFAULT_MAX_PIXELS
    fixed_size: tuple[int, int] | None = None

    def __post_init__(self):
        if isinstance(self.image_size, bool) or int(self.image_size) != self.image_size:
            raise ValueError(f"`image_size` must be an integer, received {self.image_size!r}.")
        if self.image_size < MIN_SIDE:
            raise ValueError(f"`image_size` must be >= {MIN_SIDE}, received {self.image_size}.")
        scales = tuple(float(s) for s in self.scales)
        if not scales or any(not np.isfinite(s) or s <= 0 for s in scales):
            raise ValueError(f"`scales` must be positive numbers, received {self.scales!r}.")
        if len(set(scales)) != len(scales):
            raise ValueError(f"`scales` must not repeat a value, received {self.scales!r}.")
        for s in scales:
            if round(self.image_size * s) < MIN_SIDE:
                raise ValueError(
                    f"Scale {s} of image_size {self.image_size} gives a side below {MIN_SIDE} px."
                )
        object.__setattr__(self, "scales", scales)
        if isinstance(self.max_pixels, bool) or int(self.max_pixels) != self.max_pixels:
            raise ValueError(f"`max_pixels` must be an integer, received {self.max_pixels!r}.")
        if self.max_pixels < 1:
            raise ValueError(f"`max_pixels` must be >= 1, received {self.max_pixels}.")
        if self.fixed_size is not None and len(self.scales) > 1:
            raise ValueError(
                f"Multi-scale export needs a model with a variable input size; this model's is "
                f"fixed at {self.fixed_size}."
            )

    def sizes(self) -> list[int]:
        """The long side at every scale."""
        return [int(round(self.image_size * s)) for s in self.scales]


# ---------------------------------------------------------------------------------------------
# Pure graph functions (also used by tests and the benchmark to build reference inputs).


def resized_shape(height, width, long_side: int):
    """Target ``(height, width)`` with the long side ``long_side``, aspect kept.

    Both sides are at least `MIN_SIDE` (very elongated images are stretched to it).

    Args:
        height, width: scalar int tensors (or ints), the image size.
        long_side: the target long side.

    Returns:
        two int32 scalar tensors.
    """
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    scale = tf.cast(long_side, tf.float64) / tf.maximum(h, w)
    new_h = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), MIN_SIDE)
    new_w = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), MIN_SIDE)
    return new_h, new_w


def resize_images(pixels, long_side: int | None, fixed_size=None):
    """Resizes RGB images for the model (bilinear with antialiasing), to float32 0-255.

    Args:
        pixels: ``(batch, height, width, 3)`` or ``(height, width, 3)``, any real dtype.
        long_side: the long side after resizing (aspect kept), when ``fixed_size`` is None.
        fixed_size: ``(height, width)`` to resize to exactly (models with a fixed input).

    Returns:
        float32 images of the same rank, values 0-255.
    """
    pixels = tf.convert_to_tensor(pixels)
    shape = tf.shape(pixels)
    if fixed_size is not None:
        size = tf.constant(fixed_size, tf.int32)
    else:
        size = tf.stack(resized_shape(shape[-3], shape[-2], long_side))
    resized = tf.image.resize(tf.cast(pixels, tf.float32), size, antialias=True)
    return tf.clip_by_value(resized, 0.0, 255.0)


def _uint(header, start: int, count: int, big_endian: bool):
    values = [tf.cast(header[start + i], tf.int64) for i in range(count)]
    if big_endian:
        values = values[::-1]
    total = tf.constant(0, tf.int64)
    for i, value in enumerate(values):
        total += value * (256**i)
    return total


def _matches(header, magic: bytes):
    return tf.reduce_all(tf.equal(header[: len(magic)], tf.constant(list(magic), tf.int64)))


def image_header_shape(data, index):
    """Reads ``(height, width)`` from the header of a JPEG, PNG, GIF or BMP, without decoding.

    Fails with INVALID_ARGUMENT (``"remap input check failed (not an image): ..."``) for
    bytes of any other format, so no decoder ever sees them.

    Args:
        data: a scalar tf.string, the encoded image.
        index: a scalar int, its position in the request (named in the error message).

    Returns:
        ``(height, width)``: two int64 scalar tensors.
    """
    prefix = tf.strings.substr(data, 0, _HEADER_BYTES)
    padded = tf.strings.substr(
        tf.strings.join([prefix, tf.constant(b"\0" * _HEADER_BYTES)]), 0, _HEADER_BYTES
    )
    header = tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int64)
    is_jpeg = _matches(header, b"\xff\xd8\xff")
    is_png = _matches(header, b"\x89PNG\r\n\x1a\n")
    is_gif = tf.logical_or(_matches(header, b"GIF87a"), _matches(header, b"GIF89a"))
    is_bmp = _matches(header, b"BM")
    known = tf.reduce_any(tf.stack([is_jpeg, is_png, is_gif, is_bmp]))
    message = tf.strings.format(
        CHECK_PREFIX + " (not an image): images[{}] is not JPEG, PNG, GIF or BMP data ({} bytes).",
        (index, tf.strings.length(data)),
    )
    check = tf.debugging.Assert(known, [message])
    with tf.control_dependencies([check]):

        def jpeg():
            shape = tf.io.extract_jpeg_shape(data, output_type=tf.int64)
            return shape[0], shape[1]

        def png():
            return _uint(header, 20, 4, True), _uint(header, 16, 4, True)

        def gif():
            return _uint(header, 8, 2, False), _uint(header, 6, 2, False)

        def bmp():
            core = tf.equal(_uint(header, 14, 4, False), 12)  # BITMAPCOREHEADER: 16-bit sizes
            width = tf.where(core, _uint(header, 18, 2, False), _uint(header, 18, 4, False))
            height = tf.where(core, _uint(header, 20, 2, False), _uint(header, 22, 4, False))
            # Height is a signed 32-bit value (negative: top-down rows).
            height = tf.where(height >= 2**31, 2**32 - height, height)
            return height, width

        height, width = tf.case(
            [(is_jpeg, jpeg), (is_png, png), (is_gif, gif)], default=bmp, exclusive=False
        )
    return height, width


def check_pixels(height, width, index, max_pixels: int):
    """An assert op: ``0 < height * width <= max_pixels``, else INVALID_ARGUMENT.

    ``index`` (a scalar int tensor) names the image in the message; None names the whole
    batch (``embed_pixels``, where all images share one size).
    """
    height = tf.cast(height, tf.int64)
    width = tf.cast(width, tf.int64)
    ok = tf.logical_and(
        tf.logical_and(height > 0, width > 0), height * width <= tf.constant(max_pixels, tf.int64)
    )
    what, values = ("images[{}] is", [index]) if index is not None else ("images are", [])
    message = tf.strings.format(
        f"{CHECK_PREFIX} (pixel limit): {what} {{}}x{{}} pixels; this export accepts 1 to "
        f"{max_pixels} pixels.",
        (*values, width, height),
    )
    return tf.debugging.Assert(ok, [message])


def decode_checked(data, index, max_pixels: int):
    """Checks then decodes one encoded image to uint8 RGB ``(height, width, 3)``.

    Order: format check and header size (no decoding), pixel limit, then decoding
    (grayscale and RGBA become RGB; an animated GIF gives its first frame).
    """
    height, width = image_header_shape(data, index)
    with tf.control_dependencies([check_pixels(height, width, index, max_pixels)]):
        pixels = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    pixels.set_shape([None, None, 3])
    return pixels


# ---------------------------------------------------------------------------------------------
# The export.


def descriptor_dim(model: keras.Model) -> int:
    """The descriptor size of ``model`` (its last output axis)."""
    dim = model.output_shape[-1]
    if dim is None:
        raise ValueError(f"Model {model.name!r} has no static descriptor size.")
    return int(dim)


def _fixed_size(model: keras.Model):
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise ValueError(f"Model {model.name!r} must have one image input, it has {shape}.")
        shape = shape[0]
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"Model {model.name!r} must take (batch, height, width, 3) images, takes {shape}."
        )
    if shape[1] is None and shape[2] is None:
        return None
    if shape[1] is None or shape[2] is None:
        raise ValueError(f"Model {model.name!r} fixes only one side of its input: {shape}.")
    return int(shape[1]), int(shape[2])


def make_embed_fn(model: keras.Model, options: ExportOptions):
    """``embed(pixels (batch, h, w, 3)) -> (batch, dim)`` float32: resize, model, combine."""

    def embed(pixels):
        descriptors = []
        for long_side in options.sizes():
            x = resize_images(pixels, long_side, options.fixed_size)
            descriptors.append(tf.cast(model(x, training=False), tf.float32))
        if len(descriptors) == 1:
            return descriptors[0]
        return tf.math.l2_normalize(tf.add_n(descriptors), axis=-1, epsilon=1e-12)

    return embed


def _endpoints(model: keras.Model, options: ExportOptions):
    dim = descriptor_dim(model)
    embed = make_embed_fn(model, options)

    def embed_bytes(images):
        count = tf.shape(images)[0]

        def one(args):
            data, index = args
            pixels = decode_checked(data, index, options.max_pixels)
            return embed(pixels[tf.newaxis])[0]

        descriptors = tf.map_fn(
            one,
            (images, tf.range(count)),
            fn_output_signature=tf.TensorSpec((dim,), tf.float32),
            parallel_iterations=4,
        )
        return {OUTPUT_KEY: tf.reshape(descriptors, (-1, dim))}

    def embed_pixels(images):
        shape = tf.shape(images, out_type=tf.int64)

        def empty():
            return tf.zeros((0, dim), tf.float32)

        def nonempty():
            check = check_pixels(shape[1], shape[2], None, options.max_pixels)
            with tf.control_dependencies([check]):
                return tf.reshape(embed(images), (-1, dim))

        return {OUTPUT_KEY: tf.cond(tf.equal(shape[0], 0), empty, nonempty)}

    return {
        BYTES_SIGNATURE: (embed_bytes, tf.TensorSpec((None,), tf.string, name=INPUT_KEY)),
        PIXELS_SIGNATURE: (
            embed_pixels,
            tf.TensorSpec((None, None, None, 3), tf.uint8, name=INPUT_KEY),
        ),
    }


def _save(model: keras.Model, options: ExportOptions, path: Path) -> None:
    """Writes the SavedModel: one traced ``tf.function`` per signature.

    A plain ``tf.Module`` holding the model's TF variables, rather than
    ``keras.export.ExportArchive``: the archive traces every endpoint twice (once to find
    the variables, once in ``tf.saved_model.save``), which made an export 1.5-2x slower
    for the same SavedModel. Autograph is off: the endpoints use explicit ``tf.cond``,
    ``tf.case`` and ``tf.map_fn``.
    """
    module = tf.Module()
    # Keras 3 variables wrap tf.Variables; tracking those makes them the SavedModel's
    # variables, captured by the traced functions.
    module.model_variables = [variable.value for variable in model.variables]
    signatures = {}
    for name, (fn, spec) in _endpoints(model, options).items():
        function = tf.function(fn, input_signature=[spec], autograph=False)
        setattr(module, name, function)
        signatures[name] = function.get_concrete_function()
    tf.saved_model.save(module, str(path), signatures=signatures)


def _verify(saved_model_dir: Path, dim: int) -> None:
    """Loads the SavedModel as a server would and answers every warm-up request."""
    from export import warmup
    from serving.client import clean_tf_message

    loaded = tf.saved_model.load(str(saved_model_dir))
    records = warmup.read_warmup_requests(saved_model_dir / "assets.extra" / WARMUP_FILE)
    for i, record in enumerate(records):
        request = record.predict_log.request
        inputs = {key: tf.constant(tf.make_ndarray(t)) for key, t in request.inputs.items()}
        try:
            out = loaded.signatures[request.model_spec.signature_name](**inputs)[OUTPUT_KEY]
        except tf.errors.InvalidArgumentError as error:
            raise ValueError(
                f"Warm-up request {i} ({request.model_spec.signature_name}) fails on the "
                f"exported model, so TF Serving would refuse to load it: "
                f"{clean_tf_message(error.message)}"
            ) from None
        want = (inputs[INPUT_KEY].shape[0], dim)
        if tuple(out.shape) != want or not np.all(np.isfinite(out.numpy())):
            raise ValueError(
                f"Exported model answered warm-up request {i} with shape {tuple(out.shape)} "
                f"(finite: {bool(np.all(np.isfinite(out.numpy())))}); expected {want}, finite."
            )


def next_version(base_dir) -> int:
    """The next free integer version in ``base_dir`` (1 when empty or absent)."""
    base = Path(base_dir)
    versions = [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
    return max(versions, default=0) + 1


def latest_version_dir(base_dir) -> Path:
    """The highest integer version folder in ``base_dir`` (what TF Serving serves)."""
    base = Path(base_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"No such folder: {str(base)!r}.")
    versions = [p for p in base.iterdir() if p.name.isdigit() and p.is_dir()]
    if not versions:
        raise FileNotFoundError(f"No integer version folder (e.g. 1/) in {str(base)!r}.")
    return max(versions, key=lambda p: int(p.name))


def _to_jsonable(config):
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(config, default=str))


def export_model(
    model: keras.Model,
    base_dir,
    version: int | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    scales=None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    config=None,
    warmup_images=None,
    model_name: str | None = None,
    verify: bool = True,
    _before_rename=None,
) -> Path:
    """Exports ``model`` to ``base_dir/<version>/`` for TensorFlow Serving.

    Args:
        model: a REMAP ``keras.Model`` mapping ``(batch, h, w, 3)`` RGB 0-255 to
            ``(batch, dim)`` descriptors (`remap_tf.model.REMAP`).
        base_dir: the model's base path (``models/remap``); created when absent.
        version: integer version; default the next free one. An existing version is an error.
        image_size: long side, in pixels, images are resized to (aspect kept).
        scales: None for single-scale, or factors of ``image_size`` (e.g. ``(1.0, 1.25)``);
            the descriptors of all scales are summed and L2-normalised.
        max_pixels: largest ``height * width`` accepted (decompression-bomb guard).
        config: the resolved training/model config (dict or dataclass), saved in the
            ``assets/remap.json`` asset with the descriptor size.
        warmup_images: encoded images (bytes) or paths for the warm-up requests; default
            synthetic JPEG and PNG images.
        model_name: the name TF Serving serves it under; default ``base_dir``'s name.
        verify: before the version appears, load the written SavedModel and replay its
            warm-up requests (TF Serving refuses a version whose warm-up fails).

    Returns:
        the version folder, e.g. ``Path("models/remap/1")``.

    Raises:
        FileExistsError: the version already exists.
        ValueError: a bad option or model.

    Example:
        >>> model = REMAP("mobilenet_v2", input_shape=(None, None, 3))
        >>> export_model(model, "models/remap", image_size=512)
        PosixPath('models/remap/1')
    """
    from export import server_files, warmup

    base = Path(base_dir)
    if base.exists() and not base.is_dir():
        raise ValueError(f"--out {str(base)!r} exists and is not a folder.")
    if version is not None and (
        isinstance(version, bool) or int(version) != version or version < 1
    ):
        raise ValueError(f"`version` must be a positive integer, received {version!r}.")
    options = ExportOptions(
        image_size=image_size,
        scales=(1.0,) if scales is None else tuple(scales),
        max_pixels=max_pixels,
        fixed_size=_fixed_size(model),
    )
    name = server_files.check_model_name(model_name or base.resolve().name)
    dim = descriptor_dim(model)
    base.mkdir(parents=True, exist_ok=True)
    version = int(version) if version is not None else next_version(base)
    final = base / str(version)
    if final.exists():
        raise FileExistsError(
            f"Version {version} already exists at {str(final)!r}; exports never overwrite a "
            f"version (omit --version to use the next free one, {next_version(base)})."
        )
    # Written aside in base_dir (same file system, so the rename is atomic); the name starts
    # with a dot and is not an integer, so TF Serving never loads it.
    staging = Path(tempfile.mkdtemp(prefix=f".export-{version}-", dir=base))
    try:
        metadata = {
            "format_version": 1,
            "model_name": name,
            "keras_model_name": model.name,
            "descriptor_dim": dim,
            "signatures": {
                BYTES_SIGNATURE: {
                    "inputs": {INPUT_KEY: "string (batch,) encoded JPEG/PNG/GIF/BMP"},
                    "outputs": {OUTPUT_KEY: f"float32 (batch, {dim}) L2-normalised"},
                },
                PIXELS_SIGNATURE: {
                    "inputs": {INPUT_KEY: "uint8 (batch, height, width, 3) RGB"},
                    "outputs": {OUTPUT_KEY: f"float32 (batch, {dim}) L2-normalised"},
                },
            },
            "image_size": options.image_size,
            "fixed_size": options.fixed_size,
            "scales": list(options.scales),
            "max_pixels": options.max_pixels,
            "config": _to_jsonable(config),
            "tensorflow_version": tf.__version__,
            "keras_version": keras.__version__,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        saved = staging / "saved_model"
        _save(model, options, saved)
        # assets/ is where SavedModel keeps files that travel with the model (TF Serving
        # copies the whole folder); clients read the descriptor size from it.
        (saved / "assets").mkdir(exist_ok=True)
        (saved / "assets" / CONFIG_ASSET).write_text(json.dumps(metadata, indent=2) + "\n")

        warmup.write_warmup_requests(
            saved / "assets.extra" / WARMUP_FILE,
            model_name=name,
            images=warmup_images,
            image_size=options.image_size,
        )
        if verify:
            _verify(saved, dim)
        if _before_rename is not None:  # a test hook: fail here to check nothing is left
            _before_rename(saved)
        try:
            os.rename(saved, final)
        except OSError as error:  # another export took this version number meanwhile
            raise FileExistsError(
                f"Could not create version {version} at {str(final)!r}: {error}"
            ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    server_files.write_server_files(base, model_name=name)
    return final


def load_keras_model(path):
    """Loads the model to export: a ``.keras`` file, or a folder holding ``model.keras``.

    The resolved config written beside it by ``remap train`` (a ``*config*.yaml``/``.yml``/
    ``.json`` file in the same folder) is read too, for the export's ``remap.json`` asset.

    Returns:
        ``(model, config)``: the ``keras.Model`` (loaded with ``safe_mode=True``) and the
        config dict, or None when there is none.
    """
    import remap_tf.layers  # noqa: F401  (registers the REMAP layers for deserialisation)

    path = Path(path)
    if path.is_dir():
        candidates = [path / "model.keras"] if (path / "model.keras").is_file() else []
        candidates = candidates or sorted(path.glob("*.keras"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"--model {str(path)!r} is a folder without a .keras file.")
        path = candidates[-1]
    elif not path.is_file():
        raise FileNotFoundError(f"--model {str(path)!r} does not exist.")
    if path.suffix != ".keras":
        raise ValueError(f"--model {str(path)!r} is not a .keras file or a checkpoint folder.")
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as error:  # Keras raises several types for a bad file.
        raise ValueError(f"Could not load --model {str(path)!r}: {error}") from None
    if not isinstance(model, keras.Model):
        raise ValueError(f"--model {str(path)!r} holds a {type(model).__name__}, not a model.")
    config = None
    for candidate in sorted(path.parent.iterdir()):
        if "config" in candidate.name and candidate.suffix in (".yaml", ".yml", ".json"):
            text = candidate.read_text(encoding="utf-8")
            if candidate.suffix == ".json":
                config = json.loads(text)
            else:
                import yaml

                config = yaml.safe_load(text)
            break
    return model, config
