"""The house's size limits: short modules, short functions, one room per concern.

No module of ``bpjax/`` is over 450 lines; no function (or method) in ``bpjax/``,
``launch.py`` or ``experiments/`` is over 80 lines. A long function becomes a
recipe of named steps; a long module, two modules. Each checker has a negative
control, so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
import pathlib
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function or method in ``source`` longer than ``limit``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - first + 1
            if length > limit:
                found.append((node.name, length))
    return found


def python_files() -> list[pathlib.Path]:
    return [
        *sorted((REPO / "bpjax").rglob("*.py")),
        REPO / "launch.py",
        *sorted((REPO / "experiments").glob("*.py")),
    ]


def test_no_library_module_is_over_the_limit():
    sizes = {p.relative_to(REPO): len(p.read_text().splitlines())
             for p in (REPO / "bpjax").rglob("*.py")}  # fmt: skip
    assert len(sizes) >= 10, sizes  # the walk found the package
    over = {str(p): n for p, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"


def test_no_function_is_over_the_limit():
    files = python_files()
    assert len(files) >= 15
    over = {f"{p.relative_to(REPO)}:{name}": n
            for p in files for name, n in long_functions(p.read_text())}  # fmt: skip
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines: {over}"


def test_the_function_checker_sees_long_functions_and_methods():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = f"def f():\n{body}\n\nclass C:\n    @staticmethod\n" + textwrap.indent(
        f"def g():\n{body}\n", "    "
    )
    assert long_functions(source) == [
        ("f", MAX_FUNCTION_LINES + 1), ("g", MAX_FUNCTION_LINES + 2)
    ]  # fmt: skip
    assert long_functions("def short():\n    return 1\n") == []
