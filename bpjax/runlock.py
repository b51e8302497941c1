"""One writer per run directory: an exclusive lock on ``<workdir>/.lock``.

Two processes training into one workdir would interleave checkpoints and
metrics. The first to open the run holds an ``flock`` on ``.lock`` for as long
as it runs and writes its pid, host and start time into it; a second process is
refused with one line naming the live one. The kernel releases an ``flock``
when its holder dies, however it dies, so a lock file left behind by a killed
run is free: the next run takes it over and says whose it was. (On a network
file system, ``flock`` needs the file system's lock support; NFSv4 has it.)

The lock file is opened with ``O_NOFOLLOW``: a ``.lock`` that is a symbolic
link (a run directory from elsewhere) is refused in one line instead of
emptying the file it points to.

In a multi-process data-parallel run only process 0 writes files, so only
process 0 takes the lock.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Callable

from bpjax.errors import RunError
from bpjax.files import link_error, open_nofollow, write_all

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
        fd = _open(workdir, path)
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
            warn(_taken_over(previous))
        mine = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now().isoformat(timespec="seconds")}  # fmt: skip
        try:
            os.ftruncate(fd, 0)
            write_all(fd, (json.dumps(mine) + "\n").encode(), offset=0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise RunError(f"cannot write {path}: {e.strerror or e}") from None
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


def _open(workdir: str, path: str) -> int:
    """The lock file's descriptor, created if missing (``0o666`` less the umask).

    A workdir that is a dangling link or a link loop, a ``.lock`` that is a
    directory or a symbolic link: each is refused in one line that says so.
    """
    if os.path.islink(workdir) and not os.path.exists(workdir):
        try:
            os.stat(workdir)
        except OSError as e:
            why = "a loop of symbolic links" if e.errno == errno.ELOOP else (
                f"a symbolic link to {os.readlink(workdir)}, which does not exist")
            raise RunError(f"--workdir={workdir} is {why}: point it at a directory, or choose"
                           " another --workdir") from None  # fmt: skip
    try:
        os.makedirs(workdir, exist_ok=True)
        return open_nofollow(path, os.O_RDWR | os.O_CREAT)
    except IsADirectoryError:
        raise RunError(f"{path} is a directory, not the run's lock file (a regular file): remove"
                       " it, or choose another --workdir") from None  # fmt: skip
    except RunError:  # a symbolic link
        raise link_error(path, "choose another --workdir") from None
    except OSError as e:
        raise RunError(f"cannot write to --workdir={workdir}: {e.strerror or e}") from None


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw) if raw.strip() else {}
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}"
            f" (since {holder.get('since')})")  # fmt: skip


def _taken_over(previous: dict) -> str:
    """The warning for a lock file that names a process which no longer holds the lock.

    The lock was free, so that process holds nothing; whether it still runs is
    only known on this host (``kill(pid, 0)``): a pid reused by another process,
    or a run directory copied from another machine, must not be called dead.
    """
    pid, host = previous.get("pid"), previous.get("host")
    who = _describe(previous)
    if host != socket.gethostname():
        return (f"warning: took over the lock of {who}: the lock was free here; whether that"
                " process still runs on its host is unknown (a copied run directory?)")
    if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 and _alive(pid):
        return (f"warning: took over the lock of {who}: the lock was free, so that run has"
                f" ended (pid {pid} is running, but does not hold the lock)")
    return f"warning: took over the lock of {who}, which is no longer running"


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    except OSError:
        return False
    return True
