"""Files a user asked to keep (metrics, results, caches) are never left half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile


def write_atomic(
    path: str | os.PathLike[str], data: str | bytes | memoryview, *, sync_dir: bool = True
) -> None:
    """Writes ``data`` to ``path`` so that readers see the old or the new file, never half.

    ``data``: text, or bytes (a ``memoryview`` of a buffer is written without a copy).

    The bytes go to a temporary file in the same directory (created if missing),
    are flushed to disk, and then renamed over ``path``, which is atomic on POSIX.
    With ``sync_dir`` the directory is then fsynced too, so that the rename itself
    survives a crash (best effort: not every file system allows it).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w" if isinstance(data, str) else "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # as open() would make it; mkstemp's 0o600 hides it from others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Flushes ``directory``'s entries (a rename in it) to disk; OSError is ignored."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
