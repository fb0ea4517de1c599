"""Size limits of the library's code: no module in fimfast/ over 450 lines, no function over 80.

A function's length counts its ``def`` line to its last line, docstring included.
Triton kernel bodies (functions decorated with ``triton.jit``) are exempt: a kernel is one
compiled unit whose loads, loops and stores read best in one place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
PACKAGE = Path(__file__).resolve().parent.parent / "fimfast"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _is_triton_kernel(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if ast.unparse(target) in ("triton.jit", "jit", "tl.jit"):
            return True
    return False


def long_functions(source: str) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, length)`` of each function over the limit in ``source``."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}."
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = child.end_lineno - child.lineno + 1
                if length > MAX_FUNCTION_LINES and not _is_triton_kernel(child):
                    found.append((name[:-1], child.lineno, length))
            visit(child, name)

    visit(ast.parse(source), "")
    return found


def test_the_package_is_found():
    assert (PACKAGE / "__init__.py").is_file()
    assert len(MODULES) > 10


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_module_and_function_sizes(path):
    source = path.read_text(encoding="utf-8")
    lines = len(source.splitlines())
    assert lines <= MAX_MODULE_LINES, (
        f"{path.relative_to(PACKAGE.parent)} has {lines} lines (limit {MAX_MODULE_LINES}): "
        "split it into modules"
    )
    long = long_functions(source)
    assert not long, "functions over {} lines: {}".format(
        MAX_FUNCTION_LINES,
        ", ".join(f"{n} (line {first}: {n_lines})" for n, first, n_lines in long),
    )


def test_the_checker_sees_long_functions_and_exempts_kernels():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = (
        f"import triton\n\n\ndef long():\n{body}\n\n\n"
        f"class A:\n    def method(self):\n{body.replace('    ', '        ')}\n\n\n"
        f"@triton.jit\ndef kernel():\n{body}\n\n\n"
        f"def short():\n{body.splitlines()[0]}\n"
    )
    assert [(n, size) for n, _, size in long_functions(source)] == [
        ("long", MAX_FUNCTION_LINES + 1),
        ("A.method", MAX_FUNCTION_LINES + 1),
    ]
