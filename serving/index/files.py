"""The on-disk side of every index kind: format constants, input checks, verification, staging.

Every saved index is a folder with a ``manifest.json`` (`remap_tf.serving.manifest.MANIFEST_FILE`)::

    {"format": "remap-index", "format_version": 1, "kind": <a registered kind>, "dim": D,
     "count": N, ...kind-specific fields..., "files": {relative path: {"sha256", "bytes"}}}

`read_manifest` checks what all kinds share (the folder, the format and its version, the kind);
`check_fields` and `check_listed` check the rest, the listed files' sizes and SHA-256 included.
`write_manifest` writes one in that key order. `staged_index_dir` publishes a folder whole:
built aside as ``.<name>.tmp-<token>``, the old one renamed to ``.<name>.old-<token>`` and then
removed (`staged_copies` finds what a crash between the renames leaves behind).

`check_ids` and `check_matrix` are the checks of user-given ids and descriptor rows, used by
every kind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from remap_tf.contract import MANIFEST_FILE
from remap_tf.errors import BadPathError, InvalidInputError, OutputExistsError
from remap_tf.io import atomic_write_json, uninterruptible
from remap_tf.serving.manifest import IndexFormatError, check_files, read_json

FORMAT = "remap-index"
FORMAT_VERSION = 1
# Stages of a folder being published by `staged_index_dir` (see `staging_path`).
WRITING, REPLACED = "tmp", "old"


# ---------------------------------------------------------------------------------------
# Checks of user input
# ---------------------------------------------------------------------------------------


def check_ids(ids: Iterable[str] | str) -> list[str]:
    """The ids as a list of distinct strings (one string is one id).

    Raises:
        InvalidInputError: an id that is not a string, or ids that repeat.
    """
    if isinstance(ids, str):
        ids = [ids]
    ids = list(ids)
    for i in ids:
        if not isinstance(i, str):
            raise InvalidInputError(f"ids must be strings, got {type(i).__name__} {i!r}")
    if len(set(ids)) != len(ids):
        seen, dupes = set(), []
        for i in ids:
            if i in seen:
                dupes.append(i)
            seen.add(i)
        raise InvalidInputError(f"duplicate ids: {dupes[:5]}")
    return ids


def check_matrix(descriptors, dim: int | None, name: str) -> np.ndarray:
    """Descriptor rows ``(num, dim)`` as contiguous float32 (one ``(dim,)`` vector is one row).

    Raises:
        InvalidInputError: not a numeric matrix, another dimension than ``dim`` (None: any),
            or NaN / infinite values; the message names ``name``.
    """
    x = np.asarray(descriptors)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise InvalidInputError(
            f"{name} must be a (num, dim) matrix of row descriptors, got {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise InvalidInputError(f"{name} must be numeric, got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise InvalidInputError(
            f"{name} have dimension {x.shape[1]} but the index has dimension {dim}"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise InvalidInputError(f"{name} contain NaN or infinite values")
    return x


# ---------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a saved index of any kind, with its format, version and kind checked.

    Raises:
        BadPathError: no such directory, or no manifest in it.
        IndexFormatError: not a manifest this version can read.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BadPathError(f"no index directory at {directory}")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise BadPathError(f"{directory} is not an index: {MANIFEST_FILE} is missing")
    manifest = read_json(path, MANIFEST_FILE)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{path} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: format_version {version!r} is not supported "
            f"(this version reads up to {FORMAT_VERSION})"
        )
    check_fields(directory, manifest, {"kind": str})
    return manifest


def check_fields(directory: Path, manifest: dict, fields: dict[str, type]) -> None:
    """IndexFormatError unless each ``fields`` key of the manifest holds its type."""
    for key, kind in fields.items():
        if not isinstance(manifest.get(key), kind):
            raise IndexFormatError(
                f"{Path(directory) / MANIFEST_FILE}: field {key!r} is missing or invalid"
            )


def check_listed(directory: Path, manifest: dict, required: Iterable[str]) -> None:
    """Checks that the manifest lists the ``required`` files, and every listed file's size and
    SHA-256 (IndexFormatError naming the first that is missing, truncated or altered)."""
    path = Path(directory) / MANIFEST_FILE
    for name in required:
        if name not in manifest["files"]:
            raise IndexFormatError(f"{path} does not list {name}")
    check_files(directory, manifest["files"], str(path))


def verify_index(directory: str | os.PathLike) -> dict:
    """Checks a saved (unsharded) index's manifest, and every listed file's size and SHA-256.

    Returns:
        The manifest dict.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    check_fields(directory, manifest, {"dim": int, "count": int, "files": dict})
    check_listed(directory, manifest, ("ids.json", "config.json"))
    return manifest


def saved_kind(directory: str | os.PathLike) -> str | None:
    """The ``kind`` a saved index's manifest declares (None when there is no readable one)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = read_json(path, MANIFEST_FILE)
    return manifest.get("kind") if isinstance(manifest, dict) else None


def write_manifest(directory: Path, kind: str, dim: int, count: int, files: dict, **fields):
    """Writes ``directory/manifest.json``: format, version, kind, dim, count, ``fields`` (in
    their order), files. Written last, so that a folder with a manifest is complete."""
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "dim": dim,
        "count": count,
        **fields,
        "files": files,
    }
    atomic_write_json(Path(directory) / MANIFEST_FILE, manifest, indent=1)
    return manifest


# ---------------------------------------------------------------------------------------
# Staged writes
# ---------------------------------------------------------------------------------------


def staging_path(directory: Path, stage: str, token: str) -> Path:
    """``.<name>.<stage>-<token>`` beside ``directory``: ``WRITING`` for the new folder being
    built, ``REPLACED`` for the old one moved aside."""
    return directory.parent / f".{directory.name}.{stage}-{token}"


def staged_copies(directory, stage: str) -> list[Path]:
    """The folders of ``stage`` that publishing ``directory`` left beside it, newest first."""
    directory = Path(directory)
    found = directory.parent.glob(f".{directory.name}.{stage}-*")
    return sorted(found, key=os.path.getmtime, reverse=True)


def staging_token(path: Path) -> str:
    """The token of a `staging_path` (it pairs a ``WRITING`` folder with its ``REPLACED``)."""
    return Path(path).name.rpartition("-")[2]


@contextlib.contextmanager
def staged_index_dir(directory: Path):
    """Writes an index folder aside, then puts it in place of ``directory`` whole.

    ``directory`` must be absent, an empty folder or an index (which is replaced). Yields
    ``.<name>.tmp-<token>`` beside it; when the block ends without an error, the old folder
    is renamed to ``.<name>.old-<token>``, the new one into place, and the old one removed,
    with no interrupt between the two renames (``changelog.recover_interrupted_save`` puts
    things right after a crash there). On an error the staging folder is removed.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{directory} exists and is not a directory")
    if (
        directory.is_dir()
        and not (directory / MANIFEST_FILE).is_file()
        and any(directory.iterdir())
    ):
        raise OutputExistsError(
            f"{directory} is a non-empty directory that is not an index; refusing to replace it"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = staging_path(directory, WRITING, token)
    staging.mkdir()
    try:
        yield staging
        with uninterruptible():
            if directory.exists():
                old = staging_path(directory, REPLACED, token)
                os.replace(directory, old)
                os.replace(staging, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
