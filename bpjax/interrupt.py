"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler, a preempted VM).

    with graceful_stop() as stop:
        result = train(config, stop=stop)
    if stop.signum: ...   # the run ended early; its last epoch is checkpointed

While the block runs, the first SIGINT or SIGTERM only *requests* a stop: one
line on stderr says so, and ``train`` finishes the epoch under way (an epoch is
one compiled call, so that is the next safe point), checkpoints it and returns.
A second signal exits at once with status 128 + signal number and no
traceback: a checkpoint being written then is left in Orbax's temporary
directory, never renamed into place, so the last complete checkpoint is intact.

The handlers are installed only in the main thread (Python delivers signals
there) and the previous ones are restored when the block ends, so a notebook
keeps its own Ctrl-C behaviour outside it. Before the block (``launch.py``
importing JAX, reading settings) nothing is written yet: ``launch.py`` catches
both signals from its first line and exits at once, 128 + signal number.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop:
    """A stop request: ``stop()`` is True once a signal arrived; ``signum`` says which."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def exit_status(self) -> int:
        """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: object) -> None:
        del frame
        if self.signum is not None:  # the second signal: leave now
            _say(f"{signal.Signals(signum).name} again: exiting now")
            os._exit(128 + signum)
        self.signum = signum
        _say(f"{self.name} received: stopping after the current epoch "
             "(send it again to exit at once)")  # fmt: skip


def _say(line: str) -> None:
    sys.stderr.write(f"bpjax: {line}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def graceful_stop() -> Iterator[Stop]:
    """Catches SIGINT and SIGTERM for the block (see the module docstring)."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals reach the main thread only: nothing to install here
        return
    previous = {s: signal.signal(s, stop._handle) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
