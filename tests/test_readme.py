"""Every python block of the README and of the docs (docs/*.md) runs as written.

Each block runs on its own, in a fresh namespace and a temporary directory: a reader may copy any
one of them. A block that goes on from the blocks before it on the same page (a walk-through) is
preceded by the line ``<!-- fimfast: continued -->`` and runs in their namespace; a block that must
not run is preceded by ``<!-- fimfast: no-run -->`` (both invisible in the rendered page); the
test checks the markers are used only right before a block.

Shell blocks are not executed (they install packages or run for minutes), but every ``fimfast``
command line in them must parse with the real command-line parser.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NO_RUN = "<!-- fimfast: no-run -->"
CONTINUED = "<!-- fimfast: continued -->"
_FENCE = re.compile(
    r"(?:<!-- fimfast: (?P<marker>no-run|continued) -->\n)?```(?P<lang>[\w-]*)\n(?P<code>.*?)```",
    re.S,
)


def markdown_files() -> list[Path]:
    """README.md and every page of the docs site."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path) -> list[tuple[str, str, bool]]:
    """``(language, code, runs)`` of every fenced block of ``path``, in order."""
    return [(lang, code, runs) for lang, code, runs, _ in _marked(path)]


def _marked(path: Path) -> list[tuple[str, str, bool, bool]]:
    """``(language, code, runs, continues the previous blocks)`` of every fenced block."""
    text = path.read_text()
    return [
        (m["lang"], m["code"], m["marker"] != "no-run", m["marker"] == "continued")
        for m in _FENCE.finditer(text)
    ]


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


PY_FILES = [p for p in markdown_files() if any(lang == "python" for lang, _, _ in blocks(p))]


def test_readme_has_python_blocks():
    assert any(lang == "python" for lang, _, _ in blocks(ROOT / "README.md"))


@pytest.mark.parametrize("path", PY_FILES, ids=_ids(PY_FILES))
def test_python_blocks_run_each_on_its_own(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, (lang, code, runs, continued) in enumerate(_marked(path)):
        if lang != "python" or not runs:
            continue
        if not continued:
            ns = {"__name__": "__main__"}
        exec(compile(code, f"{path.name} block {i + 1}", "exec"), ns)


@pytest.mark.parametrize("path", markdown_files(), ids=_ids(markdown_files()))
def test_no_run_marker_only_before_a_block(path):
    text = path.read_text()
    for marker in (NO_RUN, CONTINUED):
        for m in re.finditer(re.escape(marker), text):
            assert text[m.end() :].startswith("\n```"), f"{path.name}: {marker} not before a block"


def _fimfast_commands(code: str) -> list[list[str]]:
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        for prefix in ("fimfast ", "python -m fimfast.cli ", "python -m fimfast "):
            if line.startswith(prefix):
                out.append(shlex.split(line[len(prefix) :]))
    return out


def test_fimfast_command_lines_in_shell_blocks_parse(monkeypatch):
    from fimfast import cli

    seen = 0
    for path in markdown_files():
        for lang, code, _ in blocks(path):
            if lang not in ("bash", "sh", "console", "shell"):
                continue
            for argv in _fimfast_commands(code):
                seen += 1
                if argv[:1] == ["bench"]:
                    continue  # forwarded to the benchmarks as they are
                parser = cli.build_parser()
                args, unknown = parser.parse_known_args(argv)
                assert not unknown, f"{path.name}: fimfast {' '.join(argv)}: unknown {unknown}"
    assert seen > 0
