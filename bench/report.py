"""Writes one benchmark's section of docs/benchmarks.md, leaving the others untouched."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

from remap_tf.io import atomic_write_text

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine_line() -> str:
    """One line naming the machine, for the section header."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} logical CPUs ({cpu}), {platform.system()} {platform.release()}"


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replaces the text between ``<!-- section: name -->`` markers (appends if absent).

    The file is rewritten atomically (temporary file, then rename).
    """
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    stamp = time.strftime("%Y-%m-%d")
    block = f"<!-- section: {name} -->\n{body.rstrip()}\n\n_Measured {stamp}._\n"
    block += f"<!-- /section: {name} -->"
    pattern = re.compile(
        rf"<!-- section: {re.escape(name)} -->.*?<!-- /section: {re.escape(name)} -->", re.S
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)
