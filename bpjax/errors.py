"""The project's error types, under one base class.

Every error bpjax raises on purpose is a :class:`BpjaxError` whose message is
one line saying what was wrong and how to fix it; entry points catch that one
class, print ``error: <message>`` and exit non-zero, never a traceback. The
extra bases keep older ``except ValueError`` / ``except RuntimeError`` callers
working.
"""

from __future__ import annotations

import re


def first_line(error: BaseException, limit: int | None = 200, *, otherwise: str = "") -> str:
    """The first line of ``error``'s message (XLA's and Orbax's run long), cut at ``limit``.

    An empty message gives ``otherwise``, by default the error type's name.
    """
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else otherwise or type(error).__name__


def is_out_of_memory(error: BaseException | str) -> bool:
    """An allocation that did not fit: MemoryError, or XLA's RESOURCE_EXHAUSTED / out of memory.

    ``error`` may be the exception or its text (a worker process's stderr).
    """
    if isinstance(error, MemoryError):
        return True
    return re.search(r"RESOURCE_EXHAUSTED|out of memory", str(error), re.IGNORECASE) is not None


class BpjaxError(Exception):
    """Base of every error bpjax raises deliberately; the message is one line."""

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))


class ConfigError(BpjaxError, ValueError):
    """A setting that cannot work; the message names it and how to fix it."""


class DataError(BpjaxError):
    """A dataset could not be read, verified or fetched."""


class CheckpointError(BpjaxError, ValueError):
    """A checkpoint that cannot be used for this run; the message says why."""


class TrainingError(BpjaxError, RuntimeError):
    """A run that had to stop (a loss that diverged, ...); the message says where and why."""


class RunError(BpjaxError):
    """A run directory that is missing or cannot be used as asked."""
