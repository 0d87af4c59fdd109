"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every module that writes a result file (configs, reports, figures, manifests, benchmark
sections) goes through these, so a crash or Ctrl-C never leaves a truncated file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` via a temporary file in the same folder, then a rename.

    The parent folder is created if missing. On any failure the temporary file is removed
    and ``path`` is left as it was.

    Returns:
        ``path`` as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    """`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, value, indent: int = 2) -> Path:
    """`atomic_write_text` of ``value`` as JSON with a final newline."""
    return atomic_write_text(path, json.dumps(value, indent=indent) + "\n")
