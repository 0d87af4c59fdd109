"""The README's Python example runs as written (in a temporary folder)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## The whole path in Python") :]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    found = re.search(r"mAP ([0-9.]+)", printed)
    assert found and 0.0 <= float(found.group(1)) <= 1.0
    assert (tmp_path / "example/models/remap/1/saved_model.pb").is_file()
    assert (tmp_path / "example/index").is_dir()
    assert (tmp_path / "example/model.keras").is_file()
