"""No function in the project is longer than a reader can hold in mind (80 lines).

A longer function needs a one-line reason on its ``def`` line or the line above it:
``# long: <reason>``. Tests are exempt (a table of cases is long by nature).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("remap_tf", "training", "export", "serving", "remap_cli", "bench")
MAX_LINES = 80


def long_functions(folders=FOLDERS, max_lines: int = MAX_LINES) -> list[str]:
    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = path.read_text(encoding="utf-8").splitlines()
            for node in ast.walk(ast.parse("\n".join(lines), str(path))):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                length = node.end_lineno - node.lineno + 1
                reason = " ".join(lines[max(node.lineno - 2, 0) : node.lineno])
                if length > max_lines and "# long:" not in reason:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length}")
    return found


def test_no_function_over_80_lines_without_a_reason():
    found = long_functions()
    assert not found, "functions over 80 lines:\n" + "\n".join(found)


def test_the_size_check_finds_a_long_function(tmp_path, monkeypatch):
    body = "\n".join(f"    x{i} = {i}" for i in range(90))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    pass\n")
    (tmp_path / "pkg" / "b.py").write_text(f"# long: a table\ndef table():\n{body}\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert long_functions(("pkg",)) == ["pkg/a.py:1 long: 91"]
