"""Where and with what a run ran: written into its ``config.json`` and its events.

A run directory is a record of an experiment; without the code version, the
library versions and the machine, its numbers cannot be trusted or repeated.
``provenance(device)`` collects them when a run starts and when it resumes;
every value is plain JSON. The git commit is read only when bpjax runs from a checkout (an
installed wheel has none), with ``dirty`` telling whether the tree had
uncommitted changes.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import shlex
import socket
import subprocess
import sys
from typing import Any

import jax

_PACKAGES = ("bpjax", "jax", "jaxlib", "optax", "numpy", "orbax-checkpoint")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state() -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the checkout bpjax runs from, or None."""
    directory = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True,
                              timeout=10, check=True)  # fmt: skip
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None  # no git, or not a checkout
    return {"commit": commit, "dirty": dirty}


def provenance(device: jax.Device | None = None) -> dict[str, Any]:
    """The code, libraries, machine, time and command line of this process.

    ``device``: the run's (its platform and kind are recorded); default JAX's first.
    """
    device = device if device is not None else jax.devices()[0]
    return {
        "versions": {p: _version(p) for p in _PACKAGES},
        "python": sys.version.split()[0],
        "git": git_state(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(device.platform),
        "process_count": jax.process_count(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "cwd": os.getcwd(),
    }
