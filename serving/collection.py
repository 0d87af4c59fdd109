"""Which images a collection holds: a folder, or a manifest listing them (and what a glob of
them looks like, for ``remap embed``).

Standard library only, so the ``remap`` command checks ``--images`` before it loads a model.
"""

from __future__ import annotations

import csv
from pathlib import Path

from remap_tf.contract import IMAGE_EXTENSIONS
from remap_tf.errors import BadPathError, FileFormatError, InvalidInputError

MANIFEST_SUFFIXES = (".txt", ".lst", ".csv", "")
GLOB_CHARACTERS = "*?["


def is_glob(source) -> bool:
    """True when ``source`` is a pattern (``photos/**.jpg``), not a folder or a list."""
    return any(char in str(source) for char in GLOB_CHARACTERS)


def glob_base(pattern: str) -> str:
    """The fixed folder of a glob, before its first wildcard ("" when it starts with one): the
    ids of the files it matches are relative to it."""
    cut = min(pattern.find(char) for char in GLOB_CHARACTERS if char in pattern)
    return pattern[:cut].rpartition("/")[0]


def list_images(source) -> tuple[list[str], list[str]]:
    """The images of a folder (recursive, sorted) or of a manifest file.

    A manifest is a ``.txt`` file (one path per line, ``#`` comments) or a ``.csv`` file with
    a ``path`` column (the training manifests' format); relative paths are relative to the
    manifest's folder.

    Returns:
        ``(paths, ids)``: paths to read and the ids to index them under (the path relative to
        the folder, or as written in the manifest).
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(
            p
            for p in source.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(source).parts)
        )
        if not paths:
            raise BadPathError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under the folder {source}"
            )
        return [str(p) for p in paths], [p.relative_to(source).as_posix() for p in paths]
    if not source.is_file():
        raise BadPathError(f"image source {source} is neither a folder nor a manifest file")
    entries = _manifest_entries(source)
    if not entries:
        raise InvalidInputError(f"the manifest {source} lists no images")
    if len(set(entries)) != len(entries):
        raise InvalidInputError(f"the manifest {source} lists some images more than once")
    paths = [str(Path(e) if Path(e).is_absolute() else source.parent / e) for e in entries]
    return paths, entries


def _manifest_entries(source: Path) -> list[str]:
    """The paths a .txt (one per line, ``#`` comments) or .csv (``path`` column) manifest lists."""
    suffix = source.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise InvalidInputError(
            f"{source}: a manifest must be a .txt (one path per line) or a .csv with a "
            "'path' column"
        )
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FileFormatError(f"{source} is not a text manifest (not UTF-8 text)") from None
    if suffix != ".csv":
        lines = text.splitlines()
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "path" not in reader.fieldnames:
        raise InvalidInputError(f"{source}: a CSV manifest needs a 'path' column")
    return [row["path"].strip() for row in reader if (row["path"] or "").strip()]
