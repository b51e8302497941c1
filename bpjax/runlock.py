"""One writer per run directory: an exclusive lock on ``<workdir>/.lock``.

Two processes training into one workdir would interleave checkpoints and
metrics. The first to open the run holds an ``flock`` on ``.lock`` for as long
as it runs and writes its pid, host and start time into it; a second process is
refused with one line naming the live one. The kernel releases an ``flock``
when its holder dies, however it dies, so a lock file left behind by a killed
run is free: the next run takes it over and says whose it was. (On a network
file system, ``flock`` needs the file system's lock support; NFSv4 has it.)

In a multi-process data-parallel run only process 0 writes files, so only
process 0 takes the lock.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from collections.abc import Callable

from bpjax.errors import RunError

LOCK = ".lock"


class RunLock:
    """The held lock of one workdir; ``release()`` (or process exit) frees it."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, workdir: str, warn: Callable[[str], None]) -> RunLock:
        """Takes the lock of ``workdir`` or raises RunError naming its holder."""
        path = os.path.join(workdir, LOCK)
        try:
            os.makedirs(workdir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"cannot write to --workdir={workdir}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunError(
                f"--workdir={workdir} is in use by {holder}: wait for that run to end (or stop"
                " it), or choose another --workdir"
            ) from None
        previous = _read(fd)
        if previous and previous.get("pid") != os.getpid():
            warn(f"warning: took over the lock of {_describe(previous)}, which is no longer"
                 " running")  # fmt: skip
        mine = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now().isoformat(timespec="seconds")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        os.fsync(fd)
        return cls(fd, path)

    def release(self) -> None:
        """Empties and unlocks the lock file (kept: removing it would race a new holder)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # the lock is still released by closing
        os.close(fd)


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}"
            f" (since {holder.get('since')})")  # fmt: skip
