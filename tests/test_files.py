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
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "a.json").st_mode) == 0o644


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
