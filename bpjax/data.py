"""Datasets: MNIST, Fashion-MNIST (verified, cached) and the synthetic regression task.

``load_dataset(name)`` returns a :class:`Dataset` of NumPy arrays, one sample per
row: ``x`` is ``(N, d)`` float32, images scaled to ``[0, 1]``; ``y`` is ``(N,)``
int32 class labels, or ``(N, k)`` float32 targets for regression.

Where MNIST and Fashion-MNIST come from, in order:

1. ``data_dir``, if given: the four canonical IDX files
   (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
   ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), each plain or ``.gz``,
   read by :mod:`bpjax.idx`. Nothing else is tried and nothing is cached: an error
   there is raised.
2. The cache, ``<cache_dir>/<name>.npz`` (uncompressed ``np.savez`` of the uint8
   arrays ``x_train (N, 784)``, ``y_train (N,)``, ``x_test``, ``y_test``),
   ``cache_dir`` defaulting to :func:`default_cache_dir`. A cache file that cannot
   be read or whose arrays fail the hash check is reported with a warning,
   deleted, and fetched again; one that cannot be deleted (a read-only disk), or a
   directory in its place, is left and named in the warning, and the data is
   fetched without caching it.
3. The chain of sources in :mod:`bpjax.sources` (HTTP mirrors, a PyPI wheel, a
   Debian package), tried in order; when every one fails, one :class:`DataError`
   lists each with its reason and says where to put the files.

Every array, whatever its origin (data_dir, cache or a source), is checked by
SHA-256 of its decoded, C-contiguous uint8 bytes before use; fetched arrays are
written to the cache atomically (:func:`bpjax.files.write_atomic`).

Importing this module touches no file and no network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import os
import pathlib
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from bpjax.arraycheck import checked_fields, sha256_arrays
from bpjax.errors import DataError
from bpjax.files import write_atomic
from bpjax.idx import IDX_FILES, read_idx, read_idx_dir, write_idx
from bpjax.sources import fetch, say

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "DatasetShape",
    "dataset_shape",
    "default_cache_dir",
    "load_dataset",
    "make_regression",
    "read_idx",
    "write_idx",
]

DATASETS = ("mnist", "fashion_mnist", "regression")

# The four arrays of an image dataset: the npz keys of its cache (see bpjax.idx.IDX_FILES).
_KEYS = tuple(IDX_FILES)

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

_NUM_CLASSES = 10  # digits, or Fashion-MNIST's ten kinds of garment

# The synthetic regression task's defaults (``make_regression``).
_REGRESSION = {"n_train": 10000, "n_test": 2000, "sizes": (784, 32, 10)}


class DatasetShape(NamedTuple):
    """Sizes of a dataset, known without loading it."""

    n_train: int
    n_test: int
    n_in: int  # features per sample: the network's n_0
    n_out: int  # classes (one-hot width) or regression targets: the network's n_L


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def dataset_shape(name: str) -> DatasetShape:
    """The sizes of dataset ``name`` (one of :data:`DATASETS`), read off its definition."""
    if name == "regression":
        sizes = _REGRESSION["sizes"]
        return DatasetShape(_REGRESSION["n_train"], _REGRESSION["n_test"], sizes[0], sizes[-1])
    _check_name(name)
    (n_train, n_in), _ = _EXPECTED[name]["x_train"]
    (n_test, _), _ = _EXPECTED[name]["x_test"]
    return DatasetShape(n_train, n_test, n_in, _NUM_CLASSES)


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
      record: what a run records of the data (``config.json``'s ``data``): origin, byte
        size, SHA-256, shapes, classes, scaling; None: a run hashes the arrays as given.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None
    record: Mapping[str, Any] | None = None

    @classmethod
    def from_arrays(cls, x_train: Any, y_train: Any, x_test: Any, y_test: Any, *,
                    name: str = "arrays", num_classes: int | None = None) -> Dataset:  # fmt: skip
        """Your own arrays, checked as files are (``bpjax.arraycheck``), ready for ``train``.

        ``x``: one example a row (images ``(N, H, W, C)`` are flattened), uint8 (scaled
        by 1/255) or float (as given); ``y``: integer labels ``(N,)`` in ``[0, classes)``
        or float targets ``(N,)`` / ``(N, k)``. Raises DataError (one line) for a fault.
        """
        return cls(**checked_fields(x_train, y_train, x_test, y_test, name=name,
                                    num_classes=num_classes))  # fmt: skip


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
    _check_name(name)
    if name == "regression":
        data = make_regression(seed)
        return dataclasses.replace(data, record=builtin_record(data, seed))
    if data_dir is not None:
        arrays, origins = read_idx_dir(data_dir)
        _verify(name, arrays, origins)
        return _image_dataset(name, arrays)

    cache_path = pathlib.Path(cache_dir if cache_dir is not None else default_cache_dir())
    cache_path = cache_path.expanduser() / f"{name}.npz"
    arrays = _load_cache(name, cache_path)
    if arrays is None:
        arrays = fetch(name, verify=_verify, cache_path=cache_path, progress=progress)
        if cache_path.exists():  # an unusable cache that could not be removed: warned already
            return _image_dataset(name, arrays)
        try:
            _write_cache(cache_path, arrays)
        except OSError as e:
            warnings.warn(
                f"bpjax: could not write the cache {cache_path} ({e}); "
                "the data will be fetched again next time",
                stacklevel=2,
            )
        else:
            say(progress, f"cached {name} at {cache_path}")
    return _image_dataset(name, arrays)


# ---------------------------------------------------------------- verification


def _sha256(array: np.ndarray) -> str:
    """SHA-256 of the array's C-contiguous bytes, as hex."""
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
    """The verified arrays of the cache file, or None: absent, or unusable (warned).

    An unusable cache file is deleted so the fetched data can replace it. One that
    cannot be deleted (a read-only disk) and a directory in its place (never deleted:
    it may hold anything) are left, with a warning saying what to remove; the data is
    then fetched without caching it.
    """
    if not path.exists():
        return None
    if path.is_dir():
        warnings.warn(
            f"bpjax: cache {path} is a directory, not a file: remove or rename it; "
            f"fetching {name} without caching it",
            stacklevel=3,
        )
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in _KEYS}
        _verify(name, arrays, str(path))
        return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, DataError) as e:
        reason = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        warnings.warn(
            f"bpjax: cache {path} is unusable ({reason}) and could not be deleted "
            f"({e.strerror or type(e).__name__}): delete it by hand; fetching {name} without "
            "caching it",
            stacklevel=3,
        )
        return None
    warnings.warn(
        f"bpjax: cache {path} is unusable ({reason}); deleted it, fetching again", stacklevel=3
    )
    return None


def _write_cache(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically writes ``arrays`` as an uncompressed npz at ``path``.

    The npz is built in memory and handed to :func:`~bpjax.files.write_atomic`:
    if anything fails, ``path`` is left as it was and no temporary file remains.
    """
    buf = io.BytesIO()
    np.savez(buf, **{key: np.ascontiguousarray(arrays[key]) for key in _KEYS})
    write_atomic(path, buf.getbuffer())


def _image_dataset(name: str, arrays: Mapping[str, np.ndarray]) -> Dataset:
    """The uint8 arrays as a Dataset: images scaled to ``[0, 1]`` float32, labels int32."""

    def images(a: np.ndarray) -> np.ndarray:
        # One pass, uint8 cast to float32 inside the ufunc: equal to a.astype(f32) / 255.
        return np.divide(a, np.float32(255.0), dtype=np.float32)

    data = Dataset(
        name=name,
        x_train=images(arrays["x_train"]),
        y_train=arrays["y_train"].astype(np.int32),
        x_test=images(arrays["x_test"]),
        y_test=arrays["y_test"].astype(np.int32),
        num_classes=_NUM_CLASSES,
    )
    return dataclasses.replace(data, record=builtin_record(data))


def builtin_record(data: Dataset, seed: int | None = None) -> dict[str, Any]:
    """What a run records of a built-in dataset: its table's SHA-256 sums, or its seed.

    ``sha256``: of the four arrays' table digests (image datasets, verified on every
    load), or of the generated arrays (regression).
    """
    record: dict[str, Any] = {"dataset": data.name, "classes": data.num_classes,
                              "shapes": {k: list(getattr(data, k).shape) for k in _KEYS}}
    if data.name in _EXPECTED:
        table = "".join(f"{k} {digest}\n" for k, (_, digest) in _EXPECTED[data.name].items())
        return record | {"origin": "bpjax.data, each array verified by SHA-256",
                         "sha256": hashlib.sha256(table.encode()).hexdigest(),
                         "scaling": "uint8 / 255"}  # fmt: skip
    return record | {"origin": f"generated from --seed={seed}", "scaling": "as given",
                     "sha256": sha256_arrays({k: getattr(data, k) for k in _KEYS})}


# ------------------------------------------------------------------ regression


def make_regression(
    seed: int = 0,
    *,
    n_train: int = _REGRESSION["n_train"],
    n_test: int = _REGRESSION["n_test"],
    sizes: tuple[int, ...] = _REGRESSION["sizes"],
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
