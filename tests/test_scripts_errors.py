"""The experiments' output paths: a path that cannot work is refused in one line, exit 2.

A folder where a file goes, a file where a folder goes, or a place that cannot be written
is refused before any work (no study trial runs, no data is loaded), as the one
``error:`` line that ``bpjax.cli.run`` prints, never a traceback. Each test runs the
script as a user does, in a subprocess: the point is the exit status and stderr. Tests
run as root, whom ``chmod`` does not stop, so "cannot be written" is a path under a
regular file (ENOTDIR) here; :mod:`bpjax.outputs` is checked in-process for the rest.
"""

from __future__ import annotations

import errno
import os
import pathlib

import numpy as np
import pytest
from script_loader import one_error_line, run_script

import bpjax


@pytest.fixture(scope="module")
def a_run(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A real one-epoch run directory (tiny data), for plot_runs to draw."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12)).astype(np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    data = bpjax.Dataset("mnist", x[:48], y[:48], x[48:], y[48:], 10)
    workdir = tmp_path_factory.mktemp("plot") / "run"
    bpjax.train(bpjax.Config(hidden=(8,), batch=16, epochs=1, dataset="mnist",
                             workdir=str(workdir)), dataset=data, log=None)  # fmt: skip
    return workdir


@pytest.fixture
def a_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "a_file"
    path.write_text("a regular file")
    return path


def test_plot_runs_out_a_directory_is_one_line(a_run, tmp_path):
    """A folder where the PNG goes; a place under a file is refused by the same check
    (``check_out_file``, below, and the other scripts here)."""
    line = one_error_line(run_script("plot_runs", str(a_run), f"--out={tmp_path}", check=False))
    assert line == f"error: --out={tmp_path} is a directory: name a file inside it"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written into it


def test_export_idx_out_under_a_file_is_one_line_before_loading(a_file):
    done = run_script("export_idx", f"--out={a_file / 'mnist'}", check=False)
    line = one_error_line(done)
    assert line == (f"error: --out={a_file / 'mnist'}: {a_file} is a file, so no folder can be"
                    " made under it")  # fmt: skip
    assert "bpjax:" not in done.stderr  # no dataset was loaded or fetched


def test_batch_study_out_dir_a_file_is_refused_before_any_trial(a_file, tmp_path):
    runs = tmp_path / "runs"
    done = run_script("batch_study", "--batches=64", "--lrs_per_batch=1",
                      "--train_examples=256", "--max_epochs=1", "--platforms=cpu",
                      f"--out_dir={a_file}", f"--runs_dir={runs}", check=False)  # fmt: skip
    line = one_error_line(done)
    assert line == (f"error: --out_dir={a_file}: {a_file} is a file, not a directory: choose"
                    " a folder")  # fmt: skip
    assert done.stdout == "" and not runs.exists()  # no trial ran


def test_output_checks_create_nothing_and_name_the_flag(tmp_path, a_file, monkeypatch):
    from bpjax import outputs

    deep = tmp_path / "new" / "deeper"
    outputs.check_out_dir("out_dir", deep)
    outputs.check_out_file("out", deep / "x.png")
    assert not (tmp_path / "new").exists()  # a check creates nothing
    outputs.make_out_dir("out_dir", deep)
    assert deep.is_dir()
    with pytest.raises(bpjax.ConfigError) as e:
        outputs.check_out_file("out", a_file / "curves.png")
    assert str(e.value) == (f"--out={a_file / 'curves.png'}: {a_file} is a file, not a"
                            " directory: choose a folder")  # fmt: skip
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(bpjax.ConfigError, match=f"--out_dir={dangling}/x: {dangling} is a file"):
        outputs.check_out_dir("out_dir", dangling / "x")
    # A read-only file system refuses root too: os.access says so, as stubbed here.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(bpjax.ConfigError) as e:
        outputs.check_out_file("out", deep / "x.png")
    assert str(e.value) == f"--out={deep / 'x.png'}: {deep} is not writable (a read-only place?)"


def test_a_failed_write_is_one_line_naming_the_flag():
    from bpjax import outputs

    with pytest.raises(bpjax.ConfigError) as e, outputs.writing("out", "results/x.png"):
        raise OSError(errno.ENOSPC, "No space left on device", "results/.x.png.tmp")
    assert str(e.value) == ("--out=results/x.png: could not write (results/.x.png.tmp): "
                            "No space left on device")  # fmt: skip
    with pytest.raises(ValueError, match="not an OSError"), outputs.writing("out", "x"):
        raise ValueError("not an OSError")
