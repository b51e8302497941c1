"""bpjax.files.write_atomic: metrics and results are whole or absent, never half."""

import os
import stat

import pytest

from bpjax import files
from bpjax.files import write_atomic


def test_writes_text_and_bytes_creating_the_directory(tmp_path):
    write_atomic(str(tmp_path / "new" / "a.json"), '{"x": 1}\n')
    write_atomic(str(tmp_path / "new" / "b.png"), b"\x89PNG")
    assert (tmp_path / "new" / "a.json").read_text() == '{"x": 1}\n'
    assert (tmp_path / "new" / "b.png").read_bytes() == b"\x89PNG"
    umask = os.umask(0)
    os.umask(umask)  # read it back: the mode a plain open() would give
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "a.json").st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    write_atomic(str(path), "old\n")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(str(path), "new\n")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch, path) -> list[tuple[bool, str | None]]:
    """Records each fsync as (on a directory?, the content of ``path`` at that moment)."""
    seen: list[tuple[bool, str | None]] = []
    real_fsync = os.fsync

    def fsync(fd):
        content = path.read_text() if path.exists() else None
        seen.append((stat.S_ISDIR(os.fstat(fd).st_mode), content))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    return seen


def test_the_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    seen = _record_fsyncs(monkeypatch, path)
    write_atomic(path, "new\n")
    # The file's bytes before the rename, then its directory once the rename is done.
    assert seen == [(False, None), (True, "new\n")]


def test_sync_dir_false_skips_the_directory(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    seen = _record_fsyncs(monkeypatch, path)
    write_atomic(path, "new\n", sync_dir=False)
    assert seen == [(False, None)]
    assert path.read_text() == "new\n"


def test_a_directory_that_refuses_fsync_is_ignored(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")  # as some file systems answer
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    write_atomic(tmp_path / "a.txt", b"bytes")
    assert (tmp_path / "a.txt").read_bytes() == b"bytes"
    assert os.listdir(tmp_path) == ["a.txt"]
