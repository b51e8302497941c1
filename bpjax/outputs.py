"""Where a command writes its results, checked before any work: a bad path costs nothing.

A study that trains for minutes and then cannot write its results has wasted them, and
a traceback from ``os.makedirs`` does not say which flag to change. Entry points check
their output paths first (a file where a folder should be, a folder where a file should
be, a read-only place) and refuse in one :class:`~bpjax.errors.ConfigError` line naming
the flag; what goes wrong later while writing (a full disk) is one line too
(:func:`writing`).

The checks create nothing: they inspect the path's deepest existing ancestor, so a
refused command leaves no empty folder behind. Root ignores file permissions, so for
root ``os.access`` reports "not writable" only on a read-only file system (EROFS); a
folder root cannot write into is not a case to check for.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from bpjax.errors import ConfigError

__all__ = ["check_out_dir", "check_out_file", "make_out_dir", "writing"]


def check_out_dir(flag: str, path: str | os.PathLike[str]) -> None:
    """Refuses ``--flag=path`` unless it is, or can be created as, a writable folder."""
    _check_folder(flag, path, os.path.abspath(path))


def check_out_file(flag: str, path: str | os.PathLike[str]) -> None:
    """Refuses ``--flag=path`` unless a file can be written there (its folder made if needed)."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ConfigError(f"--{flag}={os.fspath(path)} is a directory: name a file inside it")
    _check_folder(flag, path, os.path.dirname(target))


def make_out_dir(flag: str, path: str | os.PathLike[str]) -> None:
    """Creates the folder ``--flag=path`` (checked first); any failure is one line."""
    check_out_dir(flag, path)
    with writing(flag, path):
        os.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def writing(flag: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """An ``OSError`` inside (a full disk, a path changed since the check) as one line."""
    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise ConfigError(
            f"--{flag}={os.fspath(path)}: could not write{where}: {e.strerror or e}"
        ) from e


def _check_folder(flag: str, path: str | os.PathLike[str], folder: str) -> None:
    """``folder`` (the flag's folder, or the folder of its file) exists or can be made."""
    existing = folder
    while not os.path.lexists(existing):  # lexists: a dangling symlink is in the way too
        existing = os.path.dirname(existing)
    value = f"--{flag}={os.fspath(path)}"
    if not os.path.isdir(existing):
        if existing == folder:
            raise ConfigError(f"{value}: {existing} is a file, not a directory: choose a folder")
        raise ConfigError(f"{value}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{value}: {existing} is not writable (a read-only place?)")
