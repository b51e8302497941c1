"""Loading and running ``experiments/`` scripts from the tests.

A script defines its absl flags at import (``cli.define_flags``); importing it twice,
or beside another script, into the one global ``FlagValues`` would clash. Here its flags
go to a private ``FlagValues``, so a test can call the script's functions directly
(:func:`load_script`, or a module's fixture from :func:`script_fixture`). End-to-end
tests run a script as a user does, in a subprocess from the repository root
(:func:`run_script`); :func:`one_error_line` checks a refusal is one ``error:`` line.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
from types import ModuleType
from unittest import mock

import pytest
from absl import flags

from bpjax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


def load_script(name: str) -> tuple[ModuleType, flags.FlagValues]:
    """``experiments/<name>.py`` imported as ``<name>_under_test``, and its private flags."""
    fresh, define = flags.FlagValues(), cli.define_flags
    private = lambda cls, **kw: define(cls, flag_values=fresh, **kw)  # noqa: E731
    with mock.patch.object(cli, "define_flags", private):
        spec = importlib.util.spec_from_file_location(f"{name}_under_test",
                                                      EXPERIMENTS / f"{name}.py")  # fmt: skip
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve annotations through it
        spec.loader.exec_module(module)
    return module, fresh


def script_fixture(name: str, defines: str, absent: str):
    """A module-scoped fixture: ``experiments/<name>.py`` loaded by :func:`load_script`.

    It checks the flags stayed private: the flag ``defines`` is on the script's own
    ``FlagValues``, and the flag ``absent`` is not on the global ``FLAGS``. Assign it
    to the fixture's name in the test module: ``script = script_fixture(...)``.
    """

    @pytest.fixture(scope="module")
    def fixture() -> ModuleType:
        module, fresh = load_script(name)
        assert defines in fresh and absent not in flags.FLAGS
        return module

    return fixture


def run_script(name: str, *args: str, timeout: float = 300,
               check: bool = True) -> subprocess.CompletedProcess:  # fmt: skip
    """``python experiments/<name>.py *args`` from the repository root, output captured.

    ``check``: assert it exited 0 (the assertion shows the ends of its output).
    """
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / f"{name}.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          check=False)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a refused command (exit status 2, no traceback)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]
