"""Loading an ``experiments/`` script as a module, its flags kept out of the global FLAGS.

A script defines its absl flags at import (``cli.define_flags``); importing it twice,
or beside another script, into the one global ``FlagValues`` would clash. Here its flags
go to a private ``FlagValues``, so a test can call the script's functions directly.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType
from unittest import mock

from absl import flags

from bpjax import cli

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


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
