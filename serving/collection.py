"""Which images a collection holds: a folder, or a manifest listing them (and what a glob of
them looks like, for ``remap embed``).

Standard library only, so the ``remap`` command checks ``--images`` before it loads a model.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path, PurePosixPath

from remap_tf.contract import IMAGE_EXTENSIONS
from remap_tf.errors import BadPathError, FileFormatError, InvalidInputError

MANIFEST_SUFFIXES = (".txt", ".lst", ".csv", "")
MAX_NAME_BYTES = 255  # a path component longer than this cannot be a file (NAME_MAX)

logger = logging.getLogger("remap_tf.serving.collection")


def id_problem(item: str) -> str | None:
    """Why ``item`` cannot name an image of a collection folder, or None if it can.

    The one rule for the ids of a folder: what `list_images` lists, and so what a rebuild of
    the index from the folder finds again. An id is a relative path with ``/`` separators,
    valid UTF-8 without NUL (other control characters are legal in file names and
    are escaped where remap prints them), no empty, ``.`` or ``..`` component, no component
    starting with a dot (hidden files are not listed) or longer than 255 bytes, ending in an
    image extension (`remap_tf.contract.IMAGE_EXTENSIONS`). ``remap serve`` refuses an added
    id that breaks it, since a rebuild would silently drop that image.
    """
    if not isinstance(item, str) or not item:
        return "an id must be a non-empty string"
    try:
        item.encode("utf-8")
    except UnicodeEncodeError:
        return "the name is not valid UTF-8"
    if "\0" in item:
        return "the name contains a NUL character"
    if item.startswith("/") or "\\" in item:
        return "an id is a relative path with '/' separators"
    parts = item.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "an id has no empty, '.' or '..' component"
    if any(part.startswith(".") for part in parts):
        return "a component starting with '.' is a hidden file, which a folder listing skips"
    if any(len(part.encode("utf-8")) > MAX_NAME_BYTES for part in parts):
        return f"a path component is longer than {MAX_NAME_BYTES} bytes"
    if PurePosixPath(item).suffix.lower() not in IMAGE_EXTENSIONS:
        return f"the name does not end in an image extension ({', '.join(IMAGE_EXTENSIONS)})"
    return None


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
        paths = _folder_images(source)
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


def _folder_images(source: Path) -> list[Path]:
    """The image files under ``source`` whose relative path is a valid id (`id_problem`);
    files that look like images but cannot be ids (a name that is not UTF-8, say) are
    skipped with one warning naming them, escaped."""
    paths, unusable = [], []
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if relative.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        if any(part.startswith(".") for part in relative.parts):
            continue  # hidden: never listed
        problem = id_problem(relative.as_posix())
        if problem is None:
            paths.append(path)
        else:
            unusable.append(f"{relative.as_posix()!r} ({problem})")
    if unusable:
        logger.warning(
            "skipped %d file(s) under %s that cannot be indexed: %s",
            len(unusable),
            source,
            ", ".join(unusable[:5]) + (", ..." if len(unusable) > 5 else ""),
        )
    return sorted(paths)


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
