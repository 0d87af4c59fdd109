"""Output folders that carry their own marker: remap clears or reuses only what it wrote.

A folder "looking like" an earlier output (a ``manifest.json``, a ``config.yaml``, a
``data/`` folder) is no proof that remap wrote it. Every command that may reuse or clear a
folder therefore goes through this module, and the rule is stated once, here:

- `claim(folder, command, output)` takes a folder for one command's output. An absent or
  empty folder is created and gets a marker, `MARKER` (``.remap-output.json``); a folder
  whose marker names the same command and output is reused; anything else (a user's files,
  a folder of an older remap without a marker, another command's output) is refused with an
  `OutputExistsError` unless ``overwrite``, and even then its files are kept.
- `record(folder, paths)` lists the files (or whole folders, ``"backup/"``) the command is
  *about to* write, before it writes them: an interrupt can leave a listed file missing,
  never an unlisted remap file. A path that exists and is not listed (a user's file of the
  same name) is refused unless ``overwrite``; a foreign folder is then written into but never
  listed, so it is never removed.
- `remove_listed(folder, keep)` removes the listed files that are not kept, and the folders
  `record` created once they are empty; nothing else, ever.

The marker::

    {"tool": "remap-tf", "version": "0.1.0", "command": "demo", "output": "photo set",
     "files": ["train.csv", "train/cat/cat_000.jpg", "backup/"],
     "folders": ["train", "train/cat"]}

``files`` are POSIX paths relative to the folder (a trailing ``/``: a folder remap created,
all of whose content is remap's); ``folders`` are the parents `record` created. Standard
library only: importing this module does not import TensorFlow.

Example:
    >>> out = claim("runs/a", "train", "training run")
    >>> record(out, ["config.yaml", "checkpoints/"])
    ['config.yaml', 'checkpoints/']
    >>> owned(out, "train", "training run")
    True
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from remap_tf import __version__
from remap_tf.errors import InvalidInputError, OutputExistsError
from remap_tf.io import atomic_write_json, remove_stale, staging_name

__all__ = [
    "MARKER",
    "REPORT_COMMAND",
    "REPORT_FILES",
    "check_claim",
    "claim",
    "listed",
    "owned",
    "publish_report",
    "read_marker",
    "record",
    "remove_listed",
    "report_files_dir",
]

MARKER = ".remap-output.json"
TOOL = "remap-tf"
# `remap search --report` and `remap evaluate --report` write the same kind of page; either
# may replace the other's (as `remap_cli.paths.output_file` lets the .html be replaced).
REPORT_COMMAND = "search or evaluate"
REPORT_FILES = "report files"
_OVERWRITE_HINT = (
    "give a new or empty folder, or add --overwrite to write beside them (they are kept)"
)


def read_marker(folder) -> dict | None:
    """The marker of ``folder`` as a dict, or None when it has none (or an unreadable one)."""
    try:
        value = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(value, dict) or value.get("tool") != TOOL:
        return None
    for key in ("files", "folders"):
        entries = value.get(key)
        value[key] = [e for e in entries if isinstance(e, str)] if isinstance(entries, list) else []
    return value


def owned(folder, command: str, output: str) -> bool:
    """True when ``folder`` carries a marker of ``remap <command>`` for ``output``."""
    marker = read_marker(folder)
    return marker is not None and (marker.get("command"), marker.get("output")) == (
        command,
        output,
    )


def check_claim(folder, command: str, output: str, overwrite: bool = False) -> Path:
    """Raises the error `claim` would raise, and writes nothing (for checks before the work).

    Returns:
        ``folder`` as a `Path`.
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{str(path)!r} is a file, not a folder for the {output}")
    if overwrite or not path.exists() or owned(path, command, output):
        return path
    entries = list(path.iterdir())
    if not entries:
        return path
    marker = read_marker(path)
    if marker is not None:
        raise OutputExistsError(
            f"{str(path)!r} holds other files: the {marker.get('output')} of remap "
            f"{marker.get('command')}, not the {output} of remap {command}; {_OVERWRITE_HINT}"
        )
    raise OutputExistsError(
        f"{str(path)!r} holds other files, not the {output} of remap {command} (no readable "
        f"{MARKER} in it; written by an older remap? add --overwrite); {_OVERWRITE_HINT}"
    )


def claim(folder, command: str, output: str, overwrite: bool = False) -> Path:
    """Takes ``folder`` for the ``output`` of ``remap <command>`` (see the module doc).

    Args:
        folder: the output folder; created (with its parents) when absent.
        command: the command writing it, e.g. ``"train"``, ``"index build"``.
        output: what it holds, e.g. ``"training run"``, ``"index"``, ``"report files"``.
        overwrite: take a folder holding other files too; they are kept, and only files
            remap lists from now on are ever removed (another command's marker is replaced:
            its files become foreign, so they too are kept).

    Returns:
        ``folder`` as a `Path`, holding a marker of ``command`` and ``output``.

    Raises:
        OutputExistsError: ``folder`` is a file, or holds files remap did not write for this
            command and output (and not ``overwrite``).
    """
    path = check_claim(folder, command, output, overwrite)
    if not owned(path, command, output):
        path.mkdir(parents=True, exist_ok=True)
        marker = {"tool": TOOL, "version": __version__, "command": command, "output": output}
        _write_marker(path, {**marker, "files": [], "folders": []})
    return path


def listed(folder) -> list[str]:
    """The entries the marker of ``folder`` lists (``[]`` without a marker)."""
    marker = read_marker(folder)
    return list(marker["files"]) if marker else []


def record(folder, paths: Iterable, overwrite: bool = False) -> list[str]:
    """Lists ``paths`` in the marker of a claimed ``folder``, before they are written.

    Args:
        folder: a folder `claim` took.
        paths: paths relative to ``folder`` (or absolute paths inside it); a trailing
            ``/`` lists a whole folder remap creates, such as a TensorBoard log folder.
        overwrite: a path that exists and is not listed is replaced anyway (a file is then
            listed; a folder is written into but not listed, so never removed).

    Returns:
        the entries listed now (already listed ones are left out).

    Raises:
        OutputExistsError: a path exists, is not listed, and not ``overwrite``.
        InvalidInputError: a path outside ``folder``.
    """
    root = Path(folder)
    marker = read_marker(root)
    if marker is None:
        raise InvalidInputError(f"{str(root)!r} has no {MARKER}; claim it first")
    known = set(marker["files"])
    new = []
    for entry in dict.fromkeys(_entry(root, p) for p in paths):
        if entry in known:
            continue
        target = root / entry
        if target.exists() or target.is_symlink():
            if not overwrite:
                raise OutputExistsError(
                    f"{str(target)!r} exists and remap did not write it; refusing to replace "
                    "it (move it away, or add --overwrite)"
                )
            if target.is_dir():
                continue  # a foreign folder: written into, never listed, never removed
        new.append(entry)
    made = _missing_parents(root, new) - set(marker["folders"])
    if new or made:
        marker["files"] = sorted(known | set(new))
        marker["folders"] = sorted(set(marker["folders"]) | made)
        _write_marker(root, marker)
    return new


def remove_listed(folder, keep: Iterable = ()) -> list[str]:
    """Removes the files the marker lists that are not in ``keep``; nothing else.

    Listed folders (``"backup/"``) go with their content; then the parent folders `record`
    created are removed if empty. A folder without a marker is left as it is.

    Args:
        folder: a claimed folder.
        keep: paths to keep (relative to ``folder``, or absolute paths inside it).

    Returns:
        the entries removed, sorted.
    """
    root = Path(folder)
    marker = read_marker(root)
    if marker is None:
        return []
    kept = {_entry(root, p).rstrip("/") for p in keep}
    drop = [e for e in marker["files"] if e.rstrip("/") not in kept]
    for entry in drop:
        target = root / entry
        if entry.endswith("/") and target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.is_dir() and not target.is_symlink():
            continue  # a listed file that is now someone's folder: not remap's to remove
        else:
            target.unlink(missing_ok=True)
    gone = []
    for name in sorted(marker["folders"], key=lambda f: f.count("/"), reverse=True):
        target = root / name
        if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
            target.rmdir()
        if not target.exists():
            gone.append(name)
    if drop or gone:
        marker["files"] = [e for e in marker["files"] if e not in drop]
        marker["folders"] = [f for f in marker["folders"] if f not in gone]
        _write_marker(root, marker)
    return sorted(drop)


def report_files_dir(report) -> Path:
    """The folder of an HTML report's side files: ``hits.html`` -> ``hits_files/``."""
    report = Path(report)
    return report.parent / f"{report.stem}_files"


def publish_report(report, write: Callable[[Path], object], overwrite: bool = False) -> Path:
    """Writes an HTML report whose side files go only into remap's own ``<name>_files/``.

    ``write(page)`` writes the page and its side folder in a staging folder beside
    ``report``; the side files are then listed in the side folder's marker (claimed for
    `REPORT_FILES`), moved in, the listed files of an earlier report that are not in this
    one removed, and the page moved last. A user's files in the side folder (with
    ``overwrite``) are never removed.

    Returns:
        ``report`` as a `Path`.
    """
    report = Path(report)
    created = [f for f in (report.parent, *report.parent.parents) if not f.exists()]
    report.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{report.stem}-"
    remove_stale(report.parent, prefix)  # what a killed run left
    staging = report.parent / staging_name(prefix)
    staging.mkdir()
    try:
        page = staging / report.name
        try:
            write(page)
        except OSError as error:  # name the file the user asked for, not the staging copy
            with contextlib.suppress(TypeError, ValueError):
                inside = Path(error.filename).relative_to(staging)
                error.filename = os.fspath(report.parent / inside)
            raise
        side = claim(report_files_dir(report), REPORT_COMMAND, REPORT_FILES, overwrite)
        staged = report_files_dir(page)
        names = sorted(
            p.relative_to(staged).as_posix() for p in staged.rglob("*") if not p.is_dir()
        )
        record(side, names, overwrite=overwrite)
        for name in names:
            (side / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / name, side / name)
        remove_listed(side, keep=names)
        os.replace(page, report)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # deepest first: the folders made for this report, if empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return report


def _entry(root: Path, path) -> str:
    """``path`` (relative to ``root``, or absolute) as a marker entry: POSIX, relative to
    ``root``; a folder ends in ``/``."""
    text = os.fspath(path)
    candidate = Path(text)
    if candidate.is_absolute():
        try:
            candidate = candidate.relative_to(root.absolute())
        except ValueError:
            raise InvalidInputError(f"{text!r} is not inside {str(root)!r}") from None
    posix = PurePosixPath(candidate.as_posix())
    if ".." in posix.parts or str(posix) in ("", ".") or posix.name == MARKER:
        raise InvalidInputError(f"{text!r} is not a path inside {str(root)!r}")
    target = root / posix
    tree = text.endswith(("/", os.sep)) or (target.is_dir() and not target.is_symlink())
    return str(posix) + ("/" if tree else "")


def _missing_parents(root: Path, entries: list[str]) -> set[str]:
    """The folders between ``root`` and each entry that do not exist yet."""
    missing = set()
    for entry in entries:
        for parent in PurePosixPath(entry.rstrip("/")).parents:
            if str(parent) != "." and not (root / parent).exists():
                missing.add(str(parent))
    return missing


def _write_marker(folder: Path, marker: dict) -> None:
    # No fsync: after a power loss the marker may miss the latest entries, which leaves remap
    # files unlisted (kept), never a user's file listed.
    atomic_write_json(folder / MARKER, marker, indent=1, fsync=False)
