"""Every python block of the README runs as written (in a temporary directory)."""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = _blocks()
    if not blocks:
        pytest.fail("the README has no python block")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for code in blocks:  # blocks build on each other, as a reader runs them
        exec(compile(code, "README.md", "exec"), ns)
