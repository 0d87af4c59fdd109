"""Checks of the paths a ``remap`` command reads and writes, before any work starts.

Every check names the flag and what is wrong with the path in one line (a
`remap_tf.errors.RemapError`), so a command refuses bad input before it imports TensorFlow or
writes anything. Relative paths are the caller's: no command changes the working directory.

Outputs never replace what the command did not write: `output_file` refuses an existing file
that is not an output of the same kind (by suffix and content) unless ``--overwrite``;
`output_folder` refuses a folder without remap's marker for that command and output
(`remap_tf.outputs`) unless ``--overwrite``; a report's side files go in one folder named
after it (``hits.html`` -> ``hits_files/``), checked by `report_files`.
Standard library only (plus the core's light modules).
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

from remap_tf.contract import (
    MANIFEST_FILE,
    MODEL_FILE,
    REPORT_MARKER,
    SAVED_MODEL_FILE,
    image_format,
    parse_serving_address,
    resolve_saved_model,
)
from remap_tf.errors import (
    BadPathError,
    FileFormatError,
    InvalidInputError,
    OutputExistsError,
    RemapError,
)
from remap_tf.outputs import REPORT_COMMAND, REPORT_FILES, check_claim, report_files_dir


@contextlib.contextmanager
def naming(flag: str):
    """Re-raises a library's `RemapError` inside the block with ``flag`` in front of it, so a
    message about a value names the argument the user typed."""
    try:
        yield
    except RemapError as error:
        if flag in str(error):
            raise
        raise type(error)(f"{flag}: {error}") from None


def _exists(flag: str, path: Path) -> None:
    if not path.exists():
        raise BadPathError(f"{flag} {str(path)!r} does not exist")


def _readable(flag: str, path: Path) -> None:
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise BadPathError(f"{flag} {str(path)!r} cannot be read (permission denied)")


def input_file(flag: str, value, suffixes: tuple[str, ...] | None = None) -> Path:
    """An existing, readable, non-empty file (with one of ``suffixes`` when given)."""
    path = Path(value)
    _exists(flag, path)
    if path.is_dir():
        raise BadPathError(f"{flag} {str(path)!r} is a folder, not a file")
    _readable(flag, path)
    if path.stat().st_size == 0:
        raise FileFormatError(f"{flag} {str(path)!r} is empty")
    if suffixes and path.suffix.lower() not in suffixes:
        raise InvalidInputError(f"{flag} {str(path)!r} is not a {' or '.join(suffixes)} file")
    return path


def input_dir(flag: str, value) -> Path:
    """An existing, readable folder."""
    path = Path(value)
    _exists(flag, path)
    if not path.is_dir():
        raise BadPathError(f"{flag} {str(path)!r} is a file, not a folder")
    _readable(flag, path)
    return path


def input_path(flag: str, value) -> Path:
    """An existing, readable file or folder (a file must not be empty)."""
    path = Path(value)
    _exists(flag, path)
    return input_dir(flag, path) if path.is_dir() else input_file(flag, path)


def image_file(flag: str, value) -> Path:
    """A readable JPEG, PNG, GIF or BMP file (checked by its first bytes)."""
    path = input_file(flag, value)
    with open(path, "rb") as handle:
        if image_format(handle.read(16)) is None:
            raise FileFormatError(
                f"{flag} {str(path)!r} is not an image (not JPEG, PNG, GIF or BMP data)"
            )
    return path


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def weights_file(flag: str, value) -> Path:
    """A Keras weights file (``.h5`` / ``.weights.h5``: HDF5, checked by its signature)."""
    path = input_file(flag, value)
    with open(path, "rb") as handle:
        if handle.read(8) != _HDF5_SIGNATURE:
            raise FileFormatError(f"{flag} {str(path)!r} is not a Keras weights file (not HDF5)")
    return path


def keras_model(flag: str, value) -> Path:
    """A ``.keras`` file, or a training folder holding `MODEL_FILE` (or another ``.keras``).

    An exported SavedModel is refused with a pointer to the command that takes it.
    """
    path = Path(value)
    _exists(flag, path)
    if path.is_dir():
        _readable(flag, path)
        if (path / SAVED_MODEL_FILE).is_file() or any(p.name.isdigit() for p in path.iterdir()):
            raise InvalidInputError(
                f"{flag} {str(path)!r} is an exported SavedModel, not a Keras model; give the "
                ".keras file (or the remap train output folder)"
            )
        candidates = [path / MODEL_FILE] if (path / MODEL_FILE).is_file() else []
        candidates = candidates or sorted(path.glob("*.keras"))
        if not candidates:
            raise BadPathError(f"{flag} {str(path)!r} is a folder without a .keras file")
        path = candidates[0]
    path = input_file(flag, path)
    if path.suffix != ".keras":
        raise InvalidInputError(f"{flag} {str(path)!r} is not a .keras file")
    if not zipfile.is_zipfile(path):
        raise FileFormatError(f"{flag} {str(path)!r} is not a Keras model file (not a zip archive)")
    return path


def exported_model(flag: str, value: str) -> str:
    """An export folder (a SavedModel or a base folder with versions) or ``host:port[/name]``.

    A ``.keras`` file is refused with a pointer to ``remap export``.
    """
    path = Path(value)
    if path.exists():
        if path.is_file() and (path.suffix == ".keras" or zipfile.is_zipfile(path)):
            raise InvalidInputError(
                f"{flag} {str(path)!r} is a Keras model file; export it first "
                f"(remap export --model {value} --out models/remap) and give the export folder"
            )
        _readable(flag, path)
        try:
            resolve_saved_model(path)
        except BadPathError as error:
            raise BadPathError(f"{flag}: {error}") from None
        return str(value)
    with naming(flag):
        if parse_serving_address(value) is not None:
            return str(value)
    raise BadPathError(
        f"{flag} {value!r} is neither an existing exported model folder nor a TF Serving "
        "address host:port[/name]"
    )


def index_dir(flag: str, value) -> Path:
    """A folder written by ``remap index build`` (it holds `MANIFEST_FILE`)."""
    path = input_dir(flag, value)
    if not (path / MANIFEST_FILE).is_file():
        raise BadPathError(f"{flag} {str(path)!r} is not an index (no {MANIFEST_FILE} in it)")
    return path


# --- outputs --------------------------------------------------------------------------------


def _is_report(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return REPORT_MARKER in handle.read(4096)
    except (OSError, UnicodeDecodeError):
        return False


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _is_search_json(path: Path) -> bool:
    """What ``remap search --json`` writes: a list of ``{"query", "results"}``."""
    value = _json(path)
    return isinstance(value, list) and all(
        isinstance(item, dict) and {"query", "results"} <= set(item) for item in value
    )


def _is_evaluation_json(path: Path) -> bool:
    """What ``remap evaluate --json`` writes: ``{"mAP", ...}``, or one such per protocol."""
    value = _json(path)
    if not isinstance(value, dict):
        return False
    return "mAP" in value or (
        bool(value) and all(isinstance(v, dict) and "mAP" in v for v in value.values())
    )


OUTPUT_KINDS: dict[str, tuple[tuple[str, ...], Callable[[Path], bool]]] = {
    "HTML report": ((".html", ".htm"), _is_report),
    "search results JSON": ((".json",), _is_search_json),
    "evaluation JSON": ((".json",), _is_evaluation_json),
}


def output_file(flag: str, value, kind: str, overwrite: bool = False) -> Path:
    """A path the command may write a ``kind`` output to (see `OUTPUT_KINDS`).

    The suffix must fit the kind. An existing file is replaced only when it is an output of
    the same kind (a report this project wrote, JSON of the same shape) or with
    ``--overwrite``; a folder never is. The parent folder must be writable where it exists.
    """
    path = Path(value)
    suffixes, same_kind = OUTPUT_KINDS[kind]
    if path.is_dir():
        raise OutputExistsError(f"{flag} {str(path)!r} is a folder; give a file name")
    if path.suffix.lower() not in suffixes:
        raise InvalidInputError(
            f"{flag} {str(path)!r} does not end in {' or '.join(suffixes)}; a {kind} is "
            "written there (did the flag take the next argument by mistake?)"
        )
    if path.exists() and not overwrite and not same_kind(path):
        raise OutputExistsError(
            f"{flag} {str(path)!r} exists and is not a {kind} written by remap; refusing to "
            "replace it (add --overwrite to replace it anyway)"
        )
    _writable_parent(flag, path)
    return path


def output_dir(flag: str, value, what: str, is_ours: Callable[[Path], bool]) -> Path:
    """A folder the command creates or adds to: absent, empty, or one it wrote (``is_ours``)."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{flag} {str(path)!r} is a file, not a folder for {what}")
    if path.is_dir() and any(path.iterdir()) and not is_ours(path):
        raise OutputExistsError(
            f"{flag} {str(path)!r} is a folder that holds other files, not {what}; give a new "
            "or empty folder"
        )
    _writable_parent(flag, path)
    return path


def output_folder(flag: str, value, command: str, output: str, overwrite: bool = False) -> Path:
    """A folder ``remap <command>`` may write its ``output`` to (`remap_tf.outputs.claim`
    decides; nothing is written here): absent, empty, or carrying remap's marker for this
    command and output; any other folder only with ``--overwrite``, which keeps its files."""
    path = Path(value)
    with naming(flag):
        check_claim(path, command, output, overwrite)
    _writable_parent(flag, path)
    return path


def report_files(flag: str, report, overwrite: bool = False) -> Path:
    """The side folder of the HTML report ``report`` (``hits.html`` -> ``hits_files/``),
    checked as `output_folder` checks: a user's folder of that name needs ``--overwrite``
    (write with `remap_tf.outputs.publish_report`)."""
    return output_folder(flag, report_files_dir(report), REPORT_COMMAND, REPORT_FILES, overwrite)


def _writable_parent(flag: str, path: Path) -> None:
    target = path if path.is_dir() else path.parent
    while not target.exists():  # the nearest existing ancestor is where writing starts
        target = target.parent
    if not target.is_dir():
        raise OutputExistsError(f"{flag} {str(path)!r}: {str(target)!r} is a file, not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise BadPathError(f"{flag} {str(path)!r} cannot be written (permission denied)")
