"""Files a user asked to keep (metrics, results) are never left half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile


def write_atomic(path: str, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old or the new file, never half.

    The bytes go to a temporary file in the same directory (created if missing),
    are flushed to disk, and then renamed over ``path``, which is atomic on POSIX.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # as open() would make it; mkstemp's 0o600 hides it from others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
