"""Checksummed file manifests, shared by saved indexes, sharded indexes and embedding outputs.

A manifest lists files relative to a folder as ``{relative path: {"sha256", "bytes"}}``;
`check_files` refuses a missing, truncated or altered file with an error naming it.
Index folders (`remap_tf.serving.index.files`) are built on these helpers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from remap_tf.errors import FileFormatError


class IndexFormatError(FileFormatError):
    """A saved index is missing, truncated, altered or not an index at all."""


def sha256_file(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entries(directory, relative_paths=None) -> dict:
    """``{relative path: {"sha256", "bytes"}}`` of every file under ``directory`` (sorted), or
    of ``relative_paths`` only."""
    directory = Path(directory)
    if relative_paths is None:
        paths = sorted(p for p in directory.rglob("*") if p.is_file())
    else:
        paths = [directory / rel for rel in relative_paths]
    return {
        path.relative_to(directory).as_posix(): {
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
        }
        for path in paths
    }


def read_json(path: Path, what: str, error=IndexFormatError):
    """Parsed JSON of ``path``; ``error`` naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: {what} is not valid JSON ({exc})") from None


def check_files(directory, files: dict, where: str, error=IndexFormatError, hashes=True) -> None:
    """Checks that each listed file exists inside ``directory`` with its size and SHA-256.

    Args:
        directory: the folder the paths are relative to.
        files: ``{relative path: {"sha256", "bytes"}}``.
        where: the manifest's name, for messages.
        error: the exception type raised.
        hashes: also compare SHA-256 (False: sizes only, for a cheap resume check).
    """
    directory = Path(directory)
    root = directory.resolve()
    for rel, entry in files.items():
        path = (directory / rel).resolve()
        if root not in path.parents:
            raise error(f"{where} lists a path outside {directory}: {rel!r}")
        if not isinstance(entry, dict) or "sha256" not in entry or "bytes" not in entry:
            raise error(f"{where}: entry for {rel!r} is invalid")
        if not path.is_file():
            raise error(f"{directory}: file {rel} is missing (incomplete)")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise error(
                f"{directory}: {rel} has {size} bytes but the manifest says {entry['bytes']} "
                "(truncated or altered)"
            )
        if hashes and sha256_file(path) != entry["sha256"]:
            raise error(
                f"{directory}: {rel} does not match its SHA-256 checksum (altered or corrupt)"
            )
