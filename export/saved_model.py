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
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import yaml

from remap_tf.contract import (
    CONFIG_ASSET,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_PIXELS,
    INPUT_KEY,
    MODEL_FILE,
    OUTPUT_KEY,
    SAVED_MODEL_FILE,
    WARMUP_FILE,
    check_model_name,
    export_metadata,
    next_version,
)
from remap_tf.errors import (
    BadPathError,
    FileFormatError,
    InvalidInputError,
    OutputExistsError,
    clean_tf_message,
)
from remap_tf.export import graph, server_files, warmup
from remap_tf.export.options import ExportOptions
from remap_tf.io import (
    atomic_write_json,
    give_folders_the_umask,
    remove_stale,
    staging_name,
    uninterruptible,
)

# Versions are written aside under this prefix (a dot, so TF Serving never loads one).
_STAGING_PREFIX = ".export-"


def descriptor_dim(model: keras.Model) -> int:
    """The descriptor size of ``model`` (its last output axis)."""
    dim = model.output_shape[-1]
    if dim is None:
        raise InvalidInputError(f"Model {model.name!r} has no static descriptor size.")
    return int(dim)


def _fixed_size(model: keras.Model):
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise InvalidInputError(
                f"Model {model.name!r} must have one image input, it has {shape}."
            )
        shape = shape[0]
    if len(shape) != 4 or shape[-1] != 3:
        raise InvalidInputError(
            f"Model {model.name!r} must take (batch, height, width, 3) images, takes {shape}."
        )
    if shape[1] is None and shape[2] is None:
        return None
    if shape[1] is None or shape[2] is None:
        raise InvalidInputError(f"Model {model.name!r} fixes only one side of its input: {shape}.")
    return int(shape[1]), int(shape[2])


def _save(model: keras.Model, options: ExportOptions, dim: int, path: Path) -> None:
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
    for name, (fn, spec) in graph.signature_functions(model, options, dim).items():
        function = tf.function(fn, input_signature=[spec], autograph=False)
        setattr(module, name, function)
        signatures[name] = function.get_concrete_function()
    tf.saved_model.save(module, str(path), signatures=signatures)


def _verify(saved_model_dir: Path, dim: int) -> None:
    """Loads the SavedModel as a server would and answers every warm-up request."""
    loaded = tf.saved_model.load(str(saved_model_dir))
    records = warmup.read_warmup_requests(saved_model_dir / "assets.extra" / WARMUP_FILE)
    for i, record in enumerate(records):
        request = record.predict_log.request
        inputs = {key: tf.constant(tf.make_ndarray(t)) for key, t in request.inputs.items()}
        try:
            out = loaded.signatures[request.model_spec.signature_name](**inputs)[OUTPUT_KEY]
        except tf.errors.InvalidArgumentError as error:
            raise FileFormatError(
                f"Warm-up request {i} ({request.model_spec.signature_name}) fails on the "
                f"exported model, so TF Serving would refuse to load it: "
                f"{clean_tf_message(error.message)}"
            ) from None
        want = (inputs[INPUT_KEY].shape[0], dim)
        if tuple(out.shape) != want or not np.all(np.isfinite(out.numpy())):
            raise FileFormatError(
                f"Exported model answered warm-up request {i} with shape {tuple(out.shape)} "
                f"(finite: {bool(np.all(np.isfinite(out.numpy())))}); expected {want}, finite."
            )


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
        remap_tf.errors.OutputExistsError: the version already exists.
        remap_tf.errors.InvalidInputError: a bad option or model.

    Example:
        >>> model = REMAP("mobilenet_v2", input_shape=(None, None, 3))
        >>> export_model(model, "models/remap", image_size=512)
        PosixPath('models/remap/1')
    """
    base = Path(base_dir)
    if base.exists() and not base.is_dir():
        raise OutputExistsError(f"Export folder {str(base)!r} exists and is not a folder.")
    options = ExportOptions(
        image_size=image_size,
        scales=(1.0,) if scales is None else tuple(scales),
        max_pixels=max_pixels,
        fixed_size=_fixed_size(model),
    )
    name = check_model_name(model_name or base.resolve().name)
    version = _check_version(base, version)
    base.mkdir(parents=True, exist_ok=True)
    final = base / str(version)
    staging = _staging_dir(base)
    try:
        saved = staging / "saved_model"
        _write_version(model, options, saved, name=name, config=config, warmup_images=warmup_images)
        give_folders_the_umask(saved)  # TensorFlow made its folders 0755
        if verify:
            _verify(saved, descriptor_dim(model))
        if _before_rename is not None:  # a test hook: fail here to check nothing is left
            _before_rename(saved)
        with uninterruptible():  # the version and the server files appear together
            try:
                os.rename(saved, final)
            except OSError as error:  # another export took this version number meanwhile
                raise OutputExistsError(
                    f"Could not create version {version} at {str(final)!r}: {error}"
                ) from None
            server_files.write_server_files(base, model_name=name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _staging_dir(base: Path) -> Path:
    """A new folder to write a version in, beside the versions in ``base`` (same file system,
    so the rename that publishes it is atomic). Its name starts with a dot and is not an
    integer, so TF Serving never loads it, and names its writer: the folder a killed export
    left is removed here."""
    remove_stale(base, _STAGING_PREFIX)
    staging = base / staging_name(_STAGING_PREFIX)
    staging.mkdir()
    return staging


def _check_version(base: Path, version) -> int:
    """``version`` (or the next free one) if no folder of that name exists in ``base``."""
    if version is None:
        return next_version(base)
    if isinstance(version, bool) or int(version) != version or version < 1:
        raise InvalidInputError(f"`version` must be a positive integer, received {version!r}.")
    version = int(version)
    if (base / str(version)).exists():
        raise OutputExistsError(
            f"Version {version} already exists at {str(base / str(version))!r}; exports never "
            f"overwrite a version (the next free one is "
            f"{next_version(base)})."
        )
    return version


def _write_version(model, options: ExportOptions, saved: Path, *, name, config, warmup_images):
    """Writes the SavedModel, its ``remap.json`` asset and its warm-up requests to ``saved``."""
    dim = descriptor_dim(model)
    _save(model, options, dim, saved)
    metadata = export_metadata(
        model_name=name,
        keras_model_name=model.name,
        descriptor_dim=dim,
        image_size=options.image_size,
        scales=options.scales,
        max_pixels=options.max_pixels,
        fixed_size=options.fixed_size,
        config=_to_jsonable(config),
        versions={"tensorflow": tf.__version__, "keras": keras.__version__},
        exported_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    )
    # assets/ is where SavedModel keeps files that travel with the model (TF Serving copies
    # the whole folder); clients read the descriptor size from it.
    atomic_write_json(saved / "assets" / CONFIG_ASSET, metadata)
    warmup.write_warmup_requests(
        saved / "assets.extra" / WARMUP_FILE,
        model_name=name,
        images=warmup_images,
        image_size=options.image_size,
    )


def load_keras_model(path):
    """Loads the model to export: a ``.keras`` file, or a folder holding ``model.keras``.

    The resolved config written beside it by ``remap train`` (a ``*config*.yaml``/``.yml``/
    ``.json`` file in the same folder) is read too, for the export's ``remap.json`` asset.

    Returns:
        ``(model, config)``: the ``keras.Model`` (loaded with ``safe_mode=True``) and the
        config dict, or None when there is none.
    """
    path = _keras_file(Path(path))
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as error:  # Keras raises several types for a bad file.
        raise FileFormatError(f"Could not load the Keras model {str(path)!r}: {error}") from None
    if not isinstance(model, keras.Model):
        raise FileFormatError(f"{str(path)!r} holds a {type(model).__name__}, not a model.")
    return model, _config_beside(path)


def _keras_file(path: Path) -> Path:
    """The ``.keras`` file for ``path``: itself, or the newest one in a folder."""
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        candidates = sorted(path.glob("*.keras"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            hint = (
                " (an exported model? export takes a .keras file)"
                if (
                    (path / SAVED_MODEL_FILE).is_file()
                    or any(p.name.isdigit() for p in path.iterdir())
                )
                else ""
            )
            raise BadPathError(f"{str(path)!r} is a folder without a .keras file{hint}.")
        return candidates[-1]
    if not path.exists():
        raise BadPathError(f"Keras model {str(path)!r} does not exist.")
    if path.suffix != ".keras":
        raise FileFormatError(f"{str(path)!r} is not a .keras file or a checkpoint folder.")
    return path


def _config_beside(path: Path):
    """The training config written beside a ``.keras`` file (``*config*.yaml/.yml/.json``)."""
    for candidate in sorted(path.parent.iterdir()):
        if "config" in candidate.name and candidate.suffix in (".yaml", ".yml", ".json"):
            text = candidate.read_text(encoding="utf-8")
            try:
                return json.loads(text) if candidate.suffix == ".json" else yaml.safe_load(text)
            except (json.JSONDecodeError, yaml.YAMLError) as error:
                raise FileFormatError(f"{str(candidate)!r} cannot be parsed: {error}") from None
    return None
