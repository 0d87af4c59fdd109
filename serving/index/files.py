"""The on-disk side of every index kind: format constants, input checks, verification, staging.

Every saved index is a folder with a ``manifest.json`` (`remap_tf.serving.manifest.MANIFEST_FILE`)::

    {"format": "remap-index", "format_version": 1, "kind": <a registered kind>, "dim": D,
     "count": N, ...kind-specific fields..., "files": {relative path: {"sha256", "bytes"}}}

`read_manifest` checks what all kinds share (the folder, the format and its version, the kind);
`check_fields` and `check_listed` check the rest, the listed files' sizes and SHA-256 included.
`write_manifest` writes one in that key order. `staged_index_dir` publishes a folder whole:
built aside as ``.<name>.tmp-<token>``, the old one renamed to ``.<name>.old-<token>`` and then
removed (`staged_copies` finds what a crash between the renames leaves behind). A published
folder carries the output marker of ``remap index build`` (`remap_tf.outputs`); only a folder
with that marker, or a verified index of an earlier version, is ever replaced
(`check_index_output`), and the files in it that are not remap's are carried over.

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
from remap_tf.errors import BadPathError, FileFormatError, InvalidInputError, OutputExistsError
from remap_tf.io import atomic_write_json, uninterruptible
from remap_tf.outputs import MARKER, claim, listed, owned, record
from remap_tf.serving.manifest import IndexFormatError, check_files, read_json, sha256_file

FORMAT = "remap-index"
FORMAT_VERSION = 1
# Stages of a folder being published by `staged_index_dir` (see `staging_path`).
WRITING, REPLACED = "tmp", "old"
# The output marker (`remap_tf.outputs`) of every published index folder: written by
# ``remap index build``; ``index add``, ``delete`` and ``compact`` keep it.
INDEX_COMMAND = "index build"
INDEX_OUTPUT = "index"
# Top-level names an index of any kind writes (a sharded one adds shard-NNNNN-<token>/):
# a user's file of such a name is never replaced, even with --overwrite.
INDEX_NAMES = frozenset(
    {MANIFEST_FILE, "ids.json", "config.json", "metadata.json", "descriptors.npy", "scann"}
)


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


# ---------------------------------------------------------------------------------------
# Whose files: the output marker of an index folder
# ---------------------------------------------------------------------------------------


def _manifest_entries(manifest: dict) -> set[str]:
    """The top-level names a manifest accounts for: itself, its files, its shard folders."""
    names = {MANIFEST_FILE}
    names.update(str(name).split("/")[0] for name in manifest.get("files") or {})
    for shard in manifest.get("shards") or []:
        if isinstance(shard, dict) and isinstance(shard.get("dir"), str):
            names.add(shard["dir"])
    return names


def _verified_entries(directory: Path) -> set[str] | None:
    """The names of a saved index whose manifest verifies (format, every SHA-256, each
    shard's manifest and files), written with or without a marker; None otherwise."""
    try:
        manifest = read_manifest(directory)
        check_fields(directory, manifest, {"files": dict})
        check_listed(directory, manifest, ())
        for shard in manifest.get("shards") or []:
            folder = directory / shard["dir"]
            if sha256_file(folder / MANIFEST_FILE) != shard["manifest_sha256"]:
                return None
            verify_index(folder)
    except (OSError, FileFormatError, KeyError, TypeError):
        return None
    return _manifest_entries(manifest)


def remap_entries(directory) -> set[str] | None:
    """The top-level names in ``directory`` that are remap's own index files; None when the
    folder is not an index remap wrote.

    An index folder is remap's when it carries the marker of ``remap index build``
    (`INDEX_COMMAND`, `INDEX_OUTPUT`; add, delete and compact keep it): its listed files and
    what its manifest accounts for are remap's. A folder without the marker is remap's only
    when it holds a verified index (saved by an earlier version, before markers): every
    checksum of its manifest matches. A ``manifest.json`` alone proves nothing.
    """
    directory = Path(directory)
    if not owned(directory, INDEX_COMMAND, INDEX_OUTPUT):
        return _verified_entries(directory)
    names = {entry.rstrip("/").split("/")[0] for entry in listed(directory)}
    if MANIFEST_FILE not in names:  # claimed with --overwrite: the index there is remap's
        return names | (_verified_entries(directory) or set())  # only if it verifies
    manifest = read_json(directory / MANIFEST_FILE, MANIFEST_FILE)
    return names | (_manifest_entries(manifest) if isinstance(manifest, dict) else set())


def check_index_output(directory, overwrite: bool = False) -> set[str]:
    """Raises unless an index may be published at ``directory``; returns remap's names there.

    Absent, empty, or an index remap wrote (`remap_entries`); any other folder only with
    ``overwrite``, and even then a file of one of `INDEX_NAMES` that is not remap's is
    refused (publishing would replace it): the user moves it away.

    Raises:
        OutputExistsError: one line naming the folder and what is in the way.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{str(directory)!r} is a file, not a folder for an index")
    if not directory.is_dir() or not any(directory.iterdir()):
        return set()
    ours = remap_entries(directory)
    if ours is None and not overwrite:
        raise OutputExistsError(
            f"{str(directory)!r} holds other files, not an index remap wrote (no {MARKER} of "
            f"remap {INDEX_COMMAND} and no verified {MANIFEST_FILE}); refusing to replace it: "
            "give a new or empty folder, or add --overwrite to write the index beside them "
            "(they are kept; an index saved by an older remap needs --overwrite once)"
        )
    clash = sorted(p.name for p in directory.iterdir() if p.name in INDEX_NAMES - (ours or set()))
    if clash:
        raise OutputExistsError(
            f"{str(directory / clash[0])!r} is not remap's, and an index writes a file of that "
            "name; move it away (--overwrite keeps a folder's other files, never replaces them)"
        )
    return ours or set()


def claim_index_output(directory, overwrite: bool = False) -> None:
    """Checks ``directory`` for an index before the work (`check_index_output`). With
    ``overwrite``, a folder holding other files is claimed for `INDEX_COMMAND` now (the
    marker lists none of them, so they are kept), so that `staged_index_dir` publishes the
    index there, carrying them over."""
    check_index_output(directory, overwrite)
    directory = Path(directory)
    foreign = overwrite and directory.is_dir() and any(directory.iterdir())
    if foreign and remap_entries(directory) is None:
        claim(directory, INDEX_COMMAND, INDEX_OUTPUT, overwrite=True)


def _move(names, source: Path, target: Path) -> None:
    for name in names:
        os.replace(source / name, target / name)


def _publish(directory: Path, staging: Path, ours: set[str], token: str) -> None:
    """Marks ``staging`` as remap's index, carries the other files of ``directory`` over into
    it (a user's files written beside an index with --overwrite survive every save), and
    swaps it into place; no interrupt in between."""
    claim(staging, INDEX_COMMAND, INDEX_OUTPUT, overwrite=True)
    record(staging, [p.name for p in staging.iterdir() if p.name != MARKER], overwrite=True)
    with uninterruptible():
        if not directory.exists():
            os.replace(staging, directory)
            return
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in ours | {MARKER})
        clash = [n for n in foreign if (staging / n).exists() or (staging / n).is_symlink()]
        if clash:
            raise OutputExistsError(
                f"{str(directory / clash[0])!r} is not remap's, and the new index has a file of "
                "that name; move it away and run again (nothing was replaced)"
            )
        _move(foreign, directory, staging)
        old = staging_path(directory, REPLACED, token)
        try:
            os.replace(directory, old)
            try:
                os.replace(staging, directory)
            except BaseException:
                os.replace(old, directory)
                raise
        except BaseException:
            _move(foreign, staging, directory)  # the user's files go back where they were
            raise
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_index_dir(directory: Path):
    """Writes an index folder aside, then puts it in place of ``directory`` whole.

    ``directory`` must be absent, empty or an index remap wrote (`check_index_output`: its
    marker, or a verified index of an earlier version). Yields ``.<name>.tmp-<token>``
    beside it; when the block ends without an error, the staged folder gets the marker of
    `INDEX_COMMAND` listing its files, the files in ``directory`` that are not remap's are
    moved into it (they are kept), the old folder is renamed to ``.<name>.old-<token>``, the
    new one into place, and the old one removed, with no interrupt between the renames
    (``changelog.recover_interrupted_save`` puts things right after a crash there). On an
    error the staging folder is removed.
    """
    directory = Path(directory)
    ours = check_index_output(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = staging_path(directory, WRITING, token)
    staging.mkdir()
    try:
        yield staging
        _publish(directory, staging, ours, token)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
