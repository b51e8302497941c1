"""The measuring wing stays a wing: no library module imports ``bpjax.bench``.

The rule is in ``bpjax/bench/__init__.py``: only ``experiments/``, the tests and
the notebook import it. Checked on the source with ``ast`` (no import runs),
with a negative control that a planted import of each form is found.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "bpjax"


def bench_imports(source: str, module: str = "bpjax.x") -> list[str]:
    """The imports of ``bpjax.bench`` (or anything in it) in ``source``, as written.

    ``module`` is the importing module's dotted name, to resolve relative imports.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import bench / from .bench import x
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found += [n for n in names if n == "bpjax.bench" or n.startswith("bpjax.bench.")]
    return found


@pytest.mark.parametrize(
    "source",
    [
        "import bpjax.bench",
        "import bpjax.bench.timing as timing",
        "from bpjax.bench import sweep",
        "from bpjax.bench.timing import compare_fns",
        "from bpjax import bench",
        "from . import bench",
        "from .bench.report import write_json",
        "def f():\n    from bpjax.bench.steps import sgd_step\n",
    ],
)
def test_checker_finds_a_planted_import(source):
    assert bench_imports(source, module="bpjax.training"), source


def test_checker_ignores_lookalikes():
    source = "import bpjax.benchmarks\nfrom bpjax import config\ntext = 'import bpjax.bench'\n"
    assert bench_imports(source) == []


def test_no_library_module_imports_the_bench_wing():
    modules = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "bench")
    assert len(modules) > 10 and PACKAGE / "training.py" in modules
    offenders = {}
    for path in modules:
        dotted = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found = bench_imports(path.read_text(), module=dotted)
        if found:
            offenders[str(path.relative_to(PACKAGE.parent))] = found
    assert offenders == {}, f"library modules import the measuring wing: {offenders}"
