"""The researcher notebook runs top to bottom, and ``import bpjax`` has no side effects.

``experiments/bpjax_tour.ipynb`` is executed in a real Jupyter kernel (nbclient) running
this interpreter; any cell error fails the test (it is never skipped). The import test runs
in a fresh subprocess: importing bpjax defines no absl flags, parses none, reads no
environment variable and opens no network connection, so a notebook can import it and
re-run any cell.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "bpjax_tour.ipynb"
_NUM = r"\d+(?:\.\d*)?(?:e[+-]\d+)?"  # a printed number like 3.1e-07


def _outputs_text(cell) -> str:
    """Everything a code cell printed or displayed as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("display_data", "execute_result"):
            data = out.get("data", {})
            parts.append(data.get("text/markdown", data.get("text/plain", "")))
    return "".join(parts)


def _kernel_manager(kernels_dir: pathlib.Path):
    """A kernel manager whose ``python3`` kernel is this interpreter, whatever is installed.

    A user-level ``python3`` kernelspec could point to another Python; this one is written
    to a private directory and is the only one the manager sees.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = kernels_dir / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(kernels_dir)], ensure_native_kernel=False)
    km = KernelManager(kernel_name="python3", kernel_spec_manager=specs)
    assert km.kernel_spec.argv[0] == sys.executable
    return km


def test_notebook_is_stored_valid_and_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    stored = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.outputs]
    counted = [i for i, c in enumerate(nb.cells) if c.get("execution_count") is not None]
    assert not stored and not counted, (
        f"cells {sorted(set(stored) | set(counted))} carry outputs or execution counts: "
        "clear them before committing (Jupyter: Edit > Clear All Outputs)"
    )
    source = "\n".join(c.source for c in code)
    for forbidden in ("absl", "import launch", "from launch", "jax_enable_x64", "config.update"):
        assert forbidden not in source, f"the notebook uses {forbidden!r}; use the public API"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        km=_kernel_manager(tmp_path / "kernels"),
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO)}},
    )
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path),  # the notebook's tempfile.mkdtemp run dirs land here
        "JAX_NUMPY_RANK_PROMOTION": "raise",  # implicit broadcasting is a bug (STYLE.md 8)
    }
    env.pop("MPLBACKEND", None)  # the kernel's inline backend must render the figures
    t0 = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError, failing the test, if a cell errors
    elapsed = time.perf_counter() - t0
    print(f"notebook executed in {elapsed:.1f}s")
    # Under two minutes on a quiet 2-core CPU; the margin absorbs a loaded CI machine.
    assert elapsed < 300, f"the notebook took {elapsed:.0f}s: shrink its sizes"

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o["output_type"] == "error"]
    assert not errors, errors
    assert all(c.execution_count is not None for c in code), "some cells never ran"
    text = "\n".join(_outputs_text(c) for c in code)

    m = re.search(rf"manual_grad vs jax\.grad: float32 ({_NUM}), float64 ({_NUM})", text)
    assert m, "the gradient-check summary line is missing"
    rel32, rel64 = float(m.group(1)), float(m.group(2))
    assert rel32 < 1e-5 and rel64 < 1e-12, (rel32, rel64)
    assert rel64 > 0 or rel32 > 0, "both differences are exactly 0: was anything compared?"

    routes = re.findall(rf"max relative difference ({_NUM})", text)
    assert len(routes) >= 5, routes  # planted control, 3 vmap checks, accumulation
    planted, *equal = (float(r) for r in routes)
    assert planted > 1e-4 and all(r < 1e-12 for r in equal), routes

    accuracy = re.search(r"done: \d+ epochs, test accuracy ([\d.]+)%", text)
    assert accuracy, "the training run's summary line is missing"
    assert float(accuracy.group(1)) > 85.0, accuracy.group(0)
    assert "traces (compilations) of the epoch function: 1" in text

    fa = re.search(
        rf"feedback alignment: test accuracy ({_NUM})% \(bp ({_NUM})%\), hidden-layer update "
        rf"angle to the true gradient ({_NUM})° \(epoch 1: ({_NUM})°\), W-vs-B angle ({_NUM})°",
        text,
    )
    assert fa, "the feedback-alignment summary line is missing"
    fa_acc, bp_acc, angle, first_angle, weight_angle = map(float, fa.groups())
    assert fa_acc > 80.0 and bp_acc > 85.0, fa.group(0)
    # Below 90°: FA's hidden-layer update is a descent direction; falling: W aligns with B.
    assert 0 < angle < first_angle < 90 and 0 < weight_angle < 90, fa.group(0)

    figures = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 3, "expected the training curves, the sweep plot and the FA figure"
    for method in ("manual", "autodiff", "manual_vmap", "per_sample"):
        row = rf"^\S+\s+{method}\s+256\s+1 ok\b"  # platform method batch devices status
        assert re.search(row, text, re.M), f"no sweep row for {method}"


_IMPORT_PROBE = textwrap.dedent(
    """
    import json, os, socket, sys

    blocked = []

    def refuse(name):
        def refused(*args, **kwargs):
            blocked.append(name)
            raise OSError(f"network access during import ({name})")
        return refused

    socket.socket.connect = refuse("socket.connect")
    socket.socket.connect_ex = refuse("socket.connect_ex")
    socket.create_connection = refuse("socket.create_connection")
    socket.getaddrinfo = refuse("socket.getaddrinfo")
    sys.argv = ["notebook", "--not_a_flag=1"]  # parsing this would raise

    import jax, optax
    from absl import flags

    before = set(flags.FLAGS)
    environ = type(os.environ)
    reads = []
    real_getitem, real_iter = environ.__getitem__, environ.__iter__

    def getitem(self, key):
        reads.append(key)
        return real_getitem(self, key)

    def iterate(self):
        reads.append("<every variable>")
        return real_iter(self)

    environ.__getitem__, environ.__iter__ = getitem, iterate
    import bpjax
    import bpjax.data, bpjax.privacy, bpjax.bench.sweep, bpjax.bench.timing, bpjax.training
    environ.__getitem__, environ.__iter__ = real_getitem, real_iter
    result = {
        "new_flags": sorted(set(flags.FLAGS) - before),
        "parsed": flags.FLAGS.is_parsed(),
        "env_reads": list(reads),
        "blocked": list(blocked),
    }

    # Controls: each probe must see what it looks for.
    environ.__getitem__ = getitem
    os.environ.get("HOME")
    environ.__getitem__ = real_getitem
    flags.DEFINE_bool("planted_flag", False, "control")
    try:
        socket.create_connection(("localhost", 9))
    except OSError:
        pass
    result["controls"] = {
        "env": reads[-1:] == ["HOME"],
        "flags": "planted_flag" in set(flags.FLAGS) - before,
        "socket": blocked[-1:] == ["socket.create_connection"],
    }
    print("RESULT " + json.dumps(result))
    """
)


def test_import_bpjax_defines_parses_reads_and_connects_nothing():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABSL", "FLAGS"))}
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["controls"] == {"env": True, "flags": True, "socket": True}, result
    assert result["new_flags"] == [], f"import bpjax defined absl flags {result['new_flags']}"
    assert result["parsed"] is False, "import bpjax parsed the command line"
    assert result["env_reads"] == [], f"import bpjax read environment {result['env_reads']}"
    assert result["blocked"] == [], f"import bpjax tried the network: {result['blocked']}"
