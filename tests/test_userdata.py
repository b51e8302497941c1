"""Your own data (issue 23): npz, CSV and IDX files and arrays from Python, checked,
recorded by SHA-256, resumed bit-identically, refused when changed; a validation hold-out.

Most cases run in-process on tiny float64 data; a handful drive ``launch.py`` (a real
process), where the point is the command line: exit status 2, one line, no workdir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import bpjax
from bpjax import rundata
from bpjax.evaluation import meets_target
from bpjax.idx import IDX_FILES, write_idx
from bpjax.userdata import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "run_before_open_backward")
SMALL = dict(hidden=(8,), batch=16, dtype="float64", checkpoint_every=1)


def launch(*args, timeout=240):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)  # fmt: skip


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stderr[-2000:])
    return lines[0]


def classes(n=240, d=6, k=3, seed=0):
    """Labels a linear teacher gives: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return x, np.argmax(x @ rng.normal(size=(d, k)), axis=1)


def images(n=240, seed=1):
    """uint8 ``(n, 4, 4, 1)`` images whose class is the brighter half."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 4, 4, 1), dtype=np.uint8)
    top, bottom = (x[:, rows].astype(int).sum((1, 2, 3)) for rows in (slice(2), slice(2, None)))
    return x, (top > bottom).astype(np.int64)


def save_npz(path, x, y, n_train=180, **more):
    np.savez(path, x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:],
             y_test=y[n_train:], **more)  # fmt: skip
    return f"npz:{path}"


def save_csv(directory, x, y, n_train=180, header=True):
    names = [f"f{i}" for i in range(x.shape[1])]
    paths = []
    for split, rows in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        path = directory / f"{split}.csv"
        table = np.column_stack([y[rows], x[rows]])  # the label first: --label_column
        lines = [",".join(["target", *names])] if header else []
        lines += [",".join(f"{v:.17g}" for v in row) for row in table]
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return "csv:" + ",".join(paths)


def save_idx(directory, x, y, n_train=180):
    directory.mkdir(exist_ok=True)
    arrays = {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:],
              "y_test": y[n_train:]}  # fmt: skip
    for key, base in IDX_FILES.items():
        write_idx(directory / f"{base}.gz", arrays[key])
    return f"idx:{directory}"


# ------------------------------------------------------------------ malformed files


def _malformed(tmp):
    """``(spec, the words its one-line error must hold)`` for each fault."""
    x, y = classes(40)
    row = np.arange(40)
    cases = [(save_npz(tmp / "nan.npz", np.where(row[:, None] == 35, np.nan, x), y, n_train=30),
              "x_test has NaN or infinite values in 1 rows (the first: row 5)"),
             (save_npz(tmp / "inf.npz", x, np.where(row == 3, np.inf, y * 1.0), n_train=30),
              "y_train has NaN or infinite values"),
             (save_npz(tmp / "labels.npz", x, y, n_train=30, num_classes=2),
              "y_train has labels outside [0, 2)"),
             (save_npz(tmp / "negative.npz", x, y - 1, n_train=30), "labels outside [0, 2)"),
             (save_npz(tmp / "dtype.npz", x.astype(np.int64), y, n_train=30),
              "x_train has dtype int64: expected uint8"),
             (save_npz(tmp / "bool.npz", x, y.astype(bool), n_train=30),
              "y_train has dtype bool: expected integer class labels"),
             (save_npz(tmp / "empty.npz", x, y, n_train=0), "x_train is empty")]  # fmt: skip
    np.savez(tmp / "missing.npz", x_train=x, y_train=y, x_test=x)
    np.savez(tmp / "lengths.npz", x_train=x, y_train=y[:-1], x_test=x, y_test=y)
    np.savez(tmp / "pickle.npz", x_train=np.array([{"a": 1}] * 3, dtype=object), y_train=y,
             x_test=x, y_test=y)  # fmt: skip
    (tmp / "text.npz").write_text("not a zip")
    (tmp / "bad.csv").write_text("a,b\n1,x\n")
    cases += [("npz:" + str(tmp / "missing.npz"), "no array y_test"),
              ("npz:" + str(tmp / "lengths.npz"), "x_train has 40 examples but y_train has 39"),
              ("npz:" + str(tmp / "pickle.npz"), "bpjax never unpickles"),
              ("npz:" + str(tmp / "text.npz"), "not an npz file"),
              ("npz:" + str(tmp / "absent.npz"), "no such file"),
              (f"csv:{tmp / 'bad.csv'},{tmp / 'bad.csv'}", "not all numbers"),
              (f"idx:{tmp / 'nowhere'}", "not a directory")]  # fmt: skip
    return cases


def test_every_malformed_file_is_one_data_error_line(tmp_path):
    for spec, words in _malformed(tmp_path):
        with pytest.raises(bpjax.DataError) as e:
            load_file(spec)
        assert words in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))
    x, y = classes(40)
    with pytest.raises(bpjax.DataError, match="x_test has 40 examples but y_test has 39"):
        bpjax.Dataset.from_arrays(x, y, x, y[:-1])


def test_a_malformed_file_through_launch_is_one_line_exit_2_and_writes_nothing(tmp_path):
    x, y = classes(40)
    spec = save_npz(tmp_path / "nan.npz", np.where(x > 2.5, np.inf, x), y, n_train=30)
    workdir = tmp_path / "run"
    line = one_line(launch(f"--dataset={spec}", f"--workdir={workdir}", "--batch=8",
                           "--hidden=4", "--epochs=1"))  # fmt: skip
    assert line.startswith(f"error: {spec}: x_") and "NaN or infinite" in line
    assert not workdir.exists()


# ------------------------------------------------------------------ scaling and splits


def test_uint8_is_scaled_floats_are_given_and_standardize_uses_training_rows_only(tmp_path):
    x, y = images(60)
    data = load_file(save_npz(tmp_path / "im.npz", x, y, n_train=40))
    assert data.x_train.shape == (40, 16) and data.x_train.dtype == np.float32
    np.testing.assert_array_equal(data.x_train, x[:40].reshape(40, -1) / np.float32(255))
    assert data.record["scaling"] == "uint8 / 255" and data.num_classes == 2
    f, t = classes(60)
    given = load_file(save_npz(tmp_path / "f.npz", f, t, n_train=40))
    np.testing.assert_array_equal(given.x_train, f[:40])  # float64 as given
    config = bpjax.Config(**SMALL, validation_examples=10, train_examples=20, standardize=True)
    rows = rundata.split(given, config)
    val, rest = rundata._split_rows(40, 10, config.seed)
    assert sorted([*val, *rest]) == list(range(40))
    train = f[:40][rest][:20]  # hold-out first, then --train_examples of the rest
    mean, std = train.mean(0), train.std(0)
    np.testing.assert_allclose(rows.x_train, (train - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(rows.x_val, (f[:40][val] - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(rows.x_test, (f[40:] - mean) / std, rtol=1e-6)
    np.testing.assert_array_equal(rows.y_val, t[:40][val])
    other = rundata._split_rows(40, 10, config.seed + 1)[0]
    assert not np.array_equal(val, other)  # seeded
    with pytest.raises(bpjax.ConfigError, match="exceeds the 30 training examples of"):
        rundata.split(given, config.replace(train_examples=31))


# ------------------------------------------------------------------ runs in-process


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory):
    """Two epochs on a 6-feature npz with a validation hold-out, target on validation."""
    tmp = tmp_path_factory.mktemp("npz")
    spec = save_npz(tmp / "data.npz", *classes())
    config = bpjax.Config(**SMALL, dataset=spec, epochs=2, workdir=str(tmp / "run"),
                          validation_examples=36, target_split="validation",
                          target_accuracy=0.999)  # fmt: skip
    return config, bpjax.train(config, log=None)


def test_a_run_on_a_file_records_its_data_and_loads_with_matching_sizes(npz_run):
    config, result = npz_run
    record = json.loads(open(os.path.join(config.workdir, "config.json")).read())
    data = record["data"]
    path = config.dataset.split(":", 1)[1]
    assert data["dataset"] == config.dataset and data["bytes"] == os.path.getsize(path)
    with np.load(path) as z:
        assert data["sha256"] == bpjax.data.sha256_arrays({k: z[k] for k in rundata.KEYS})
    assert data["shapes"]["x_train"] == [180, 6] and data["classes"] == 3
    assert data["validation"]["examples"] == 36 and record["sizes"] == [6, 8, 3]
    run = bpjax.load_run(config.workdir)
    assert run.config.sizes == (6, 8, 3) == tuple(
        [run.params[0]["W"].shape[1], 8, run.params[-1]["W"].shape[0]])
    for m in result.history:  # 180 - 36 = 144 rows: 9 steps an epoch
        assert m["step"] == 9 * m["epoch"] and 0 <= m["val_accuracy"] <= 1
        assert m["val_loss"] > 0 and m["test_accuracy"] is not None


def test_the_target_can_watch_the_validation_split(npz_run):
    config, result = npz_run
    first = result.history[0]
    reached = bpjax.train(config.replace(workdir=config.workdir + "-t", epochs=2,
                                         target_accuracy=first["val_accuracy"]), log=None)
    assert (reached.target["epoch"], reached.target["step"]) == (1, first["step"])
    record = {"test_accuracy": 1.0, "test_loss": 0.0, "val_accuracy": 0.5, "val_loss": 9.0}
    assert not meets_target(record, 0.9, None, "validation") and meets_target(record, 0.9, None)
    assert meets_target(record, None, 9.0, "validation") and not meets_target(record, 0.6, 8.0,
                                                                              "validation")
    with pytest.raises(bpjax.ConfigError, match="--target_split=validation needs a validation"):
        config.replace(validation_examples=0)


def test_python_arrays_are_checked_recorded_and_refused_when_they_change(tmp_path):
    x, y = classes()
    data = bpjax.Dataset.from_arrays(x[:180], y[:180], x[180:], y[180:], name="mine")
    config = bpjax.Config(**SMALL, epochs=1, workdir=str(tmp_path / "run"))
    bpjax.train(config, dataset=data, log=None)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["data"]["sha256"] == data.record["sha256"] and record["data_shape"] == [6, 3]
    assert bpjax.load_run(config.workdir).config.sizes == (6, 8, 3)
    edited = bpjax.Dataset.from_arrays(x[:180] + 1, y[:180], x[180:], y[180:], name="mine")
    before = sorted(os.listdir(config.workdir))
    again = config.replace(resume=True, epochs=2)
    with pytest.raises(bpjax.DataError, match="the data changed since the run recorded it"):
        bpjax.train(again, dataset=edited, log=None)
    assert sorted(os.listdir(config.workdir)) == before
    bpjax.train(again.replace(accept_data_change=True), dataset=edited, log=None)
    events = [json.loads(line) for line in open(os.path.join(config.workdir, "events.jsonl"))]
    assert [e["sha256"] for e in events if e["event"] == "data_changed"] == [
        edited.record["sha256"]]
    bpjax.train(again.replace(epochs=3), dataset=edited, log=None)  # accepted: no flag again
    wider = bpjax.Dataset.from_arrays(np.c_[x, x[:, :1]][:180], y[:180], np.c_[x, x[:, :1]][180:],
                                      y[180:], name="mine")  # fmt: skip
    with pytest.raises(bpjax.ConfigError, match=r"--data_shape: recorded \(6, 3\), given \(7, 3\)"):
        bpjax.train(again.replace(epochs=4, accept_data_change=True), dataset=wider, log=None)
    with pytest.raises(bpjax.ConfigError, match=r"--data_shape=6,3 .* has 7 features"):
        bpjax.train(config.replace(workdir=str(tmp_path / "new"), data_shape=(6, 3)),
                    dataset=wider, log=None)  # fmt: skip
    with pytest.raises(bpjax.ConfigError, match="--label_column names a CSV column"):
        bpjax.train(config.replace(workdir=str(tmp_path / "new"), label_column="y"), log=None)
    assert not (tmp_path / "new").exists()


def test_settings_that_do_not_fit_the_data_are_refused_before_the_workdir_exists(tmp_path):
    x, y = classes()
    data = bpjax.Dataset.from_arrays(x[:180], y[:180], x[180:], y[180:], name="mine")
    workdir = tmp_path / "run"
    for bad in (dict(batch=200), dict(validation_examples=100, batch=100)):
        with pytest.raises(bpjax.ConfigError, match="larger than the training set"):
            bpjax.train(bpjax.Config(**{**SMALL, **bad}, workdir=str(workdir)), dataset=data,
                        log=None)  # fmt: skip
        assert not workdir.exists()  # no .lock, no checkpoints/: nothing to clean up
    regression = bpjax.Dataset.from_arrays(x[:180], x[:180, :2], x[180:], x[180:, :2], name="r")
    with pytest.raises(bpjax.ConfigError, match="use --loss=squared_error"):
        bpjax.train(bpjax.Config(**SMALL, workdir=str(workdir)), dataset=regression, log=None)
    assert not workdir.exists()
    bpjax.train(bpjax.Config(**SMALL, epochs=1, workdir=str(workdir)), dataset=data, log=None)


def test_a_run_made_before_data_was_recorded_loads_with_its_recorded_sizes(tmp_path):
    old = str(tmp_path / "old")
    shutil.copytree(FIXTURE, old)
    run = bpjax.load_run(old)  # dataset "mnist", trained on a 6-feature Dataset given in Python
    assert run.config.sizes == run.sizes == (6, 8, 3)


def test_validation_on_mnist_holds_out_10000_and_trains_on_the_rest(tmp_path):
    lines = []
    config = bpjax.Config(validation_examples=10000, hidden=(4,), batch=1000, epochs=1,
                          workdir=str(tmp_path / "mnist"))  # fmt: skip
    result = bpjax.train(config, log=lines.append)
    header = "mnist: 50000 train / 10000 validation / 10000 test examples"
    assert any(line.startswith(header) for line in lines)
    (m,) = result.history
    assert m["step"] == 50 and {"val_loss", "val_accuracy", "test_loss", "test_accuracy"} <= set(m)
    sliced = bpjax.Config(validation_examples=10000, train_examples=1000, hidden=(4,),
                          batch=500, epochs=1, workdir=str(tmp_path / "slice"))  # fmt: skip
    assert bpjax.train(sliced, log=None).history[0]["step"] == 2  # hold-out, then the slice
    with pytest.raises(bpjax.ConfigError, match="training set \\(50000 examples of mnist left"):
        bpjax.Config(validation_examples=10000, batch=50001)


# ------------------------------------------------------------------ the command line


def params_of(workdir):
    return jax.tree.leaves(bpjax.load_run(str(workdir)).params)


def test_npz_images_resume_bit_identically_and_a_changed_file_is_refused(tmp_path):
    spec = save_npz(tmp_path / "im.npz", *images())
    args = [f"--dataset={spec}", "--batch=20", "--hidden=8", "--dtype=float64", "--lr=0.3",
            "--validation_examples=20"]  # fmt: skip
    workdir = tmp_path / "run"
    assert launch(*args, "--epochs=1", f"--workdir={workdir}").returncode == 0
    done = launch(f"--workdir={workdir}", "--resume", "--epochs=2")
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = bpjax.train(bpjax.Config(dataset=spec, batch=20, hidden=(8,), dtype="float64",
                                     lr=0.3, validation_examples=20, epochs=2,
                                     workdir=str(tmp_path / "fresh")), log=None)  # fmt: skip
    for a, b in zip(params_of(workdir), jax.tree.leaves(fresh.params), strict=True):
        np.testing.assert_array_equal(a, b)
    x, y = images()
    save_npz(tmp_path / "im.npz", 255 - x, y)
    before = sorted(os.listdir(workdir))
    line = one_line(launch(f"--workdir={workdir}", "--resume", "--epochs=3"))
    assert "the data changed since the run recorded it" in line and "--accept_data_change" in line
    assert sorted(os.listdir(workdir)) == before


def test_csv_regression_and_idx_classification_from_the_command_line(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(240, 5))
    target = x @ rng.normal(size=5) + 0.5
    spec = save_csv(tmp_path, x, target)  # float targets: regression
    first = tmp_path / "csv"
    done = launch(f"--dataset={spec}", "--label_column=target", "--loss=squared_error",
                  "--batch=20", "--hidden=8", "--epochs=1", "--standardize",
                  f"--workdir={first}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    run = bpjax.load_run(str(first))
    assert run.config.sizes == (5, 8, 1) and run.metrics[0]["test_accuracy"] is None
    assert run.config.standardize and json.loads((first / "config.json").read_text())["data"][
        "standardize"]
    save_csv(tmp_path, x, target + 0.25)  # the same files, other targets
    line = one_line(launch(f"--config={first}", f"--workdir={tmp_path / 'again'}"))
    assert "the data changed since the run recorded it" in line
    assert not (tmp_path / "again").exists()
    im, labels = images()
    idx = save_idx(tmp_path / "idx", im[..., 0], labels.astype(np.uint8))
    done = launch(f"--dataset={idx}", "--batch=20", "--hidden=8", "--epochs=1",
                  f"--workdir={tmp_path / 'idxrun'}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert bpjax.load_run(str(tmp_path / "idxrun")).config.sizes == (16, 8, 2)
