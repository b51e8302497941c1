"""Files a user asked to keep (metrics, results, caches) are never left half-written.

Every file is created as ``open()`` creates one, with mode ``0o666`` less the
umask, so a run's records are as readable as the user's other files (a
``umask 077`` keeps them private, ``022`` shares them). Nothing here writes
through a symbolic link: a run directory received from someone else could hold
one pointing anywhere, and following it would write outside the directory.
Appends loop until every byte is written: ``os.write`` may write fewer bytes
than asked (a signal, some file systems), and a record cut short is a lost one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets

from bpjax.errors import RunError

NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def link_error(path: str | os.PathLike[str], instead: str = "write elsewhere") -> RunError:
    """The one-line refusal of a symbolic link where a file of ours belongs."""
    return RunError(
        f"{os.fspath(path)} is a symbolic link; bpjax never writes through one (a run directory"
        f" never writes outside itself): replace it with a regular file, or {instead}"
    )


def refuse_link(path: str | os.PathLike[str], instead: str = "write elsewhere") -> None:
    """Raises :func:`link_error` if ``path`` is a symbolic link (a dangling one included)."""
    if os.path.islink(path):
        raise link_error(path, instead)


def open_nofollow(path: str | os.PathLike[str], flags: int, mode: int = 0o666) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` with one line (``link_error``).

    New files get ``mode`` less the umask; other failures raise their OSError.
    """
    try:
        return os.open(path, flags | NOFOLLOW, mode)
    except OSError:
        if os.path.islink(path):  # ELOOP on Linux, EMLINK on some BSDs
            raise link_error(path) from None
        raise


def write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    """Writes every byte of ``data`` to ``fd`` (at ``offset`` with pwrite, else where it is).

    ``os.write`` returns how many bytes it wrote, which may be fewer than asked:
    the rest is written in further calls until none is left.
    """
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "a write wrote nothing")
        view = view[n:]
        offset = None if offset is None else offset + n


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Appends ``line`` (newline included) to ``path``, creating it; fsynced before returning.

    ``O_APPEND`` puts every write at the end; a short write is completed
    (``write_all``), so the line lands whole unless the process dies mid-way (a
    reader then skips the torn last line, and a resume cuts it off).
    """
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        write_all(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def cut_torn_line(path: str | os.PathLike[str]) -> bytes | None:
    """Cuts a last line left without its newline (a crash mid-append) off a JSON-lines file.

    Returns the bytes cut, or None when there was nothing to cut: no file, a
    whole last line, or one that only lacks its newline (which is then added),
    so the next ``append_line`` starts a line of its own.
    """
    if not os.path.lexists(path):
        return None
    with os.fdopen(open_nofollow(path, os.O_RDWR), "r+b") as f:
        data = f.read()
        start = data.rfind(b"\n") + 1
        tail = data[start:]
        if not tail:
            return None
        try:
            json.loads(tail)
        except ValueError:
            f.truncate(start)
        else:
            f.write(b"\n")  # at the end: read() left the position there
            tail = b""
        f.flush()
        os.fsync(f.fileno())
    return tail or None


def write_atomic(
    path: str | os.PathLike[str], data: str | bytes | memoryview, *, sync_dir: bool = True
) -> None:
    """Writes ``data`` to ``path`` so that readers see the old or the new file, never half.

    ``data``: text (written as UTF-8), or bytes (a ``memoryview`` of a buffer is
    written without a copy).

    The bytes go to a temporary file in the same directory (created if missing),
    are flushed to disk, and then renamed over ``path``, which is atomic on POSIX.
    With ``sync_dir`` the directory is then fsynced too, so that the rename itself
    survives a crash (best effort: not every file system allows it). A ``path``
    that is a symbolic link is refused (RunError, one line): the rename would
    silently turn the link into a file. The file's mode follows the umask.
    """
    refuse_link(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _create_temporary(directory, os.path.basename(path))
    try:
        if isinstance(data, str):
            data = data.encode()
        write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        _fsync_dir(directory)


def _create_temporary(directory: str, name: str) -> tuple[int, str]:
    """A new empty file ``.<name>.<random>.tmp`` in ``directory``: ``(fd, path)``.

    Not ``tempfile.mkstemp``: its mode is 0o600 whatever the umask, and the
    renamed file would keep it. ``O_EXCL`` makes the name ours alone.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        with contextlib.suppress(FileExistsError):
            return open_nofollow(tmp, flags), tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", directory)


def _fsync_dir(directory: str) -> None:
    """Flushes ``directory``'s entries (a rename in it) to disk; OSError is ignored."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
