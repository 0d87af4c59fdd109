"""The contract the packages share: what an export looks like from the outside.

`remap_tf.export` writes it, `remap_tf.serving` reads it, the ``remap`` command names it, and
TF Serving serves it; each fact is stated once, here:

- signature names and tensor keys of the exported SavedModel;
- the tags of the graph's input checks (`check_message` writes them, `check_tag` reads them);
- the file names the layers hand each other: ``model.keras`` (what ``remap train`` writes and
  ``remap export`` reads), ``saved_model.pb``, ``remap.json``, ``manifest.json`` (the
  checksummed manifest of every folder ``remap`` publishes: indexes, embeddings) and the
  Keras package name of the project's registered objects;
- image size limits;
- the ``remap.json`` asset (its schema, `export_metadata` and `read_export_metadata`);
- the version-folder layout TF Serving expects (`version_dirs`, `latest_version_dir`,
  `next_version`, `resolve_saved_model`).

Standard library only: importing this module does not import TensorFlow.

Layout of an export base folder (``models/remap``)::

    1/saved_model.pb, 1/variables/          a version TF Serving loads (highest wins)
    1/assets/remap.json                     `export_metadata`: descriptor size, sizes, config
    1/assets.extra/tf_serving_warmup_requests
    2/ ...
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from remap_tf.errors import BadPathError, FileFormatError, InvalidInputError

# --- the SavedModel's signatures ------------------------------------------------------------
BYTES_SIGNATURE = "serving_default"  # tf.string (batch,) encoded JPEG/PNG/GIF/BMP
PIXELS_SIGNATURE = "embed_pixels"  # uint8 (batch, height, width, 3) RGB
SIGNATURES = (BYTES_SIGNATURE, PIXELS_SIGNATURE)
INPUT_KEY = "images"
OUTPUT_KEY = "descriptors"  # float32 (batch, dim), L2-normalised
DEFAULT_MODEL_NAME = "remap"
SAVED_MODEL_FILE = "saved_model.pb"
CONFIG_ASSET = "remap.json"  # in <version>/assets/
WARMUP_FILE = "tf_serving_warmup_requests"  # in <version>/assets.extra/

# --- the graph's input checks ---------------------------------------------------------------
# A failed check is an INVALID_ARGUMENT whose message reads
# "remap input check failed (<tag>): <detail>" (remap_tf.export.graph writes it with
# `check_message`); the tag names the check, and the search service picks its HTTP error from
# it (`check_tag`).
CHECK_PREFIX = "remap input check failed"
NOT_AN_IMAGE = "not an image"  # bytes of none of the formats in IMAGE_SIGNATURES
PIXEL_LIMIT = "pixel limit"  # height * width over the export's max_pixels
GIF_BLOCKS = "gif blocks"  # a GIF whose blocks are not all walked within the block limit
_CHECK_TAG = re.compile(re.escape(CHECK_PREFIX) + r" \(([^()]+)\): ")

# --- files the layers hand each other -------------------------------------------------------
MODEL_FILE = "model.keras"  # what `remap train` writes in its output folder
# The checksummed manifest (remap_tf.serving.manifest) of every folder `remap` publishes:
# indexes (plain and sharded) and embedding outputs.
MANIFEST_FILE = "manifest.json"
# The package name of the project's registered Keras objects: a saved model.keras refers to
# them as "remap_tf>TripletLoss", "remap_tf>Whitening", ...
KERAS_PACKAGE = "remap_tf"

# A TF Serving gRPC address, "host:port" or "host:port/model_name".
_ADDRESS = re.compile(
    r"^(?P<target>(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):\d{1,5})(/(?P<model>\w[\w\-]*))?$"
)
# Leading bytes of the image formats the exported graph decodes (export/graph.py checks the
# same signatures in the graph).
IMAGE_SIGNATURES = {
    "jpeg": (b"\xff\xd8\xff",),
    "png": (b"\x89PNG\r\n\x1a\n",),
    "gif": (b"GIF87a", b"GIF89a"),
    "bmp": (b"BM",),
}


# File names the project treats as images: the formats the exported graph decodes.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


def parse_serving_address(text: str) -> tuple[str, str | None] | None:
    """``(host:port, model name or None)`` of a TF Serving address, or None if ``text`` is not
    one. Example: ``parse_serving_address("localhost:8500/remap") == ("localhost:8500", "remap")``.

    Raises:
        InvalidInputError: an address whose port is not from 1 to 65535 (it would be dialled).
    """
    match = _ADDRESS.match(str(text))
    if not match:
        return None
    port = int(match.group("target").rsplit(":", 1)[1])
    if not 1 <= port <= 65535:
        raise InvalidInputError(
            f"TF Serving address {str(text)!r}: port {port} is not a port (1 to 65535)."
        )
    return match.group("target"), match.group("model")


def check_message(tag: str) -> str:
    """The start of a failed input check's message: ``"remap input check failed (<tag>): "``."""
    return f"{CHECK_PREFIX} ({tag}): "


def check_tag(message: str) -> str | None:
    """The tag of the graph input check that ``message`` (a model's error) reports, or None.

    Example:
        >>> check_tag("images[0]: remap input check failed (pixel limit): images[0] is 9x9")
        'pixel limit'
    """
    match = _CHECK_TAG.search(str(message))
    return match.group(1) if match else None


def image_format(header: bytes) -> str | None:
    """``"jpeg"``, ``"png"``, ``"gif"`` or ``"bmp"`` from a file's first bytes; None otherwise."""
    for name, signatures in IMAGE_SIGNATURES.items():
        if any(header.startswith(signature) for signature in signatures):
            return name
    return None


# Marks an HTML report as written by remap-tf (remap_tf.serving.report), so the command line
# may replace it; any other file at a report path is the user's and is never replaced.
REPORT_MARKER = '<meta name="generator" content="remap-tf report">'

# --- image sizes ----------------------------------------------------------------------------
# The smallest side every backbone accepts (five stride-2 stages leave a 2x2 map).
MIN_IMAGE_SIZE = 64
# Long side images are resized to by an export unless told otherwise.
DEFAULT_IMAGE_SIZE = 512
# The largest long side an export resizes images to, at any of its scales: at 4096 px the first
# activations of a ResNet alone take 1 GiB per image (20000 px grew to ~20 GB and was killed).
MAX_IMAGE_SIZE = 4096
# 50 megapixels: larger than any camera photo users send for retrieval, far below a
# decompression bomb (a 65535 x 65535 PNG is 4.3 gigapixels, 12.9 GB decoded).
DEFAULT_MAX_PIXELS = 50_000_000
# The largest max_pixels an export accepts: 500 megapixels decode to 1.5 GB of RGB, above the
# largest camera photos (~200 MP); beyond it the guard would no longer guard anything.
MAX_PIXELS_LIMIT = 500_000_000

# --- remap.json -----------------------------------------------------------------------------
EXPORT_FORMAT_VERSION = 1
_REQUIRED_METADATA = {
    "format_version": int,
    "model_name": str,
    "descriptor_dim": int,
    "image_size": int,
    "scales": list,
    "max_pixels": int,
}
# A TF Serving model name that is also a docker-compose service name.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_model_name(model_name: str) -> str:
    """``model_name`` if usable as a TF Serving model name and a docker-compose service name."""
    if not isinstance(model_name, str) or not _MODEL_NAME.fullmatch(model_name):
        raise InvalidInputError(
            f"Model name {model_name!r} must use letters, digits, '-' and '_' only "
            "(it is a TF Serving model name and a docker-compose service name)."
        )
    return model_name


def export_metadata(
    *,
    model_name: str,
    keras_model_name: str,
    descriptor_dim: int,
    image_size: int,
    scales,
    max_pixels: int,
    fixed_size=None,
    config=None,
    versions: dict | None = None,
    exported_at: str | None = None,
) -> dict:
    """The ``remap.json`` asset of an export: what a client needs to know about the model.

    Args:
        model_name: the name TF Serving serves it under.
        keras_model_name: the Keras model's ``name``.
        descriptor_dim: size of the ``descriptors`` output.
        image_size: long side, in pixels, images are resized to (aspect kept).
        scales: factors of ``image_size`` at which images are embedded.
        max_pixels: the largest ``height * width`` the graph accepts.
        fixed_size: ``(height, width)`` when the model's input size is fixed, else None.
        config: the resolved training or demo configuration (JSON-compatible), or None.
        versions: library versions, e.g. ``{"tensorflow": "2.20.0", "keras": "3.15.1"}``.
        exported_at: ISO 8601 time of the export.

    Returns:
        a JSON-compatible dict (`read_export_metadata` reads it back).
    """
    io_doc = f"float32 (batch, {descriptor_dim}) L2-normalised"
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "model_name": check_model_name(model_name),
        "keras_model_name": keras_model_name,
        "descriptor_dim": int(descriptor_dim),
        "signatures": {
            BYTES_SIGNATURE: {
                "inputs": {INPUT_KEY: "string (batch,) encoded JPEG/PNG/GIF/BMP"},
                "outputs": {OUTPUT_KEY: io_doc},
            },
            PIXELS_SIGNATURE: {
                "inputs": {INPUT_KEY: "uint8 (batch, height, width, 3) RGB"},
                "outputs": {OUTPUT_KEY: io_doc},
            },
        },
        "image_size": int(image_size),
        "fixed_size": None if fixed_size is None else [int(v) for v in fixed_size],
        "scales": [float(s) for s in scales],
        "max_pixels": int(max_pixels),
        "config": config,
        **{f"{name}_version": value for name, value in (versions or {}).items()},
        "exported_at": exported_at,
    }


def read_export_metadata(saved_model_dir) -> dict:
    """Reads and checks ``<saved_model_dir>/assets/remap.json``.

    Returns:
        the metadata dict, or ``{}`` when the export has no ``remap.json`` (a SavedModel not
        written by this project).

    Raises:
        FileFormatError: the file is not valid JSON, or lacks a required field, or is of a
            newer format version than this code reads.
    """
    path = Path(saved_model_dir) / "assets" / CONFIG_ASSET
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FileFormatError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(metadata, dict):
        raise FileFormatError(f"{path} holds a {type(metadata).__name__}, not an object.")
    for key, kind in _REQUIRED_METADATA.items():
        if not isinstance(metadata.get(key), kind) or isinstance(metadata.get(key), bool):
            raise FileFormatError(f"{path}: field {key!r} is missing or not a {kind.__name__}.")
    if metadata["format_version"] > EXPORT_FORMAT_VERSION:
        raise FileFormatError(
            f"{path} has format_version {metadata['format_version']}; this version of remap-tf "
            f"reads up to {EXPORT_FORMAT_VERSION}."
        )
    return metadata


# --- version folders ------------------------------------------------------------------------


def version_dirs(base_dir) -> list[Path]:
    """The integer version folders of an export base folder, lowest first.

    A folder counts when its name is an integer and it holds ``saved_model.pb``; the staging
    folders an export writes aside (``.export-*``) never do.
    """
    base = Path(base_dir)
    if not base.is_dir():
        return []
    found = [p for p in base.iterdir() if p.name.isdigit() and (p / SAVED_MODEL_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name))


def next_version(base_dir) -> int:
    """The next free integer version in ``base_dir`` (1 when it is empty or absent).

    Every integer-named entry counts, complete or not, so a new export never reuses a name.
    """
    base = Path(base_dir)
    taken = [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
    return max(taken, default=0) + 1


def latest_version_dir(base_dir) -> Path:
    """The highest version folder of ``base_dir``: the one TF Serving serves.

    Raises:
        BadPathError: ``base_dir`` is not a folder or holds no version.
    """
    base = Path(base_dir)
    if not base.is_dir():
        raise BadPathError(f"{str(base)!r} is not a folder.")
    versions = version_dirs(base)
    if not versions:
        raise BadPathError(
            f"{str(base)!r} holds no version folder (e.g. 1/{SAVED_MODEL_FILE}); run "
            "`remap export` first."
        )
    return versions[-1]


def is_saved_model(path) -> bool:
    """True if ``path`` is a SavedModel folder (it holds ``saved_model.pb``)."""
    return (Path(path) / SAVED_MODEL_FILE).is_file()


def resolve_saved_model(path) -> Path:
    """The SavedModel folder for ``path``: itself if it is one, else its highest version.

    Raises:
        BadPathError: ``path`` does not exist, is a file (a ``.keras`` model, say), or is a
            folder with neither ``saved_model.pb`` nor integer versions.
    """
    path = Path(path)
    if is_saved_model(path):
        return path
    if not path.exists():
        raise BadPathError(f"No such SavedModel folder: {str(path)!r}.")
    if not path.is_dir():
        hint = " (a Keras model: export it with `remap export` first)" if path.suffix else ""
        raise BadPathError(f"{str(path)!r} is a file, not an exported model folder{hint}.")
    if not version_dirs(path):
        raise BadPathError(
            f"{str(path)!r} is neither a SavedModel (no {SAVED_MODEL_FILE}) nor a base folder "
            f"with integer versions (e.g. 1/{SAVED_MODEL_FILE}); run `remap export` first."
        )
    return version_dirs(path)[-1]
