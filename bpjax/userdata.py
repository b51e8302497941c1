"""Your own data: arrays from an npz, CSV or IDX file, or from Python, checked and fingerprinted.

``--dataset`` names a built-in dataset (``bpjax.data.DATASETS``) or a file:

* ``npz:PATH``: arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (optional 0-d
  ``num_classes``), read with ``np.load(..., allow_pickle=False)``, never unpickled;
* ``csv:TRAIN,TEST``: two CSV files, one example a row, the label in the last column
  (or the one ``--label_column`` names; the files then need a header row);
* ``idx:DIR``: the four IDX files of ``bpjax.idx.IDX_FILES`` (plain or ``.gz``), any number
  of examples, any element type.

Inputs ``x``: one example a row, any trailing shape (images ``(N, H, W, C)`` are
flattened); uint8 is scaled by 1/255, a float dtype is used as given; any other
dtype is refused. Targets ``y``: integer class labels ``(N,)`` in ``[0, classes)``
(classification; ``classes`` is ``num_classes`` when given, else the largest label
plus one), or float targets ``(N,)`` / ``(N, k)`` (regression). In a CSV a label
column of integers is classes, anything else regression targets. Missing arrays,
lengths that differ, labels out of range, NaN or inf, a wrong dtype and an empty
split are each one :class:`~bpjax.errors.DataError` line.

Each dataset carries its ``record`` (what a run writes to ``config.json`` as
``data``): the spec as given, the files' total byte size, the SHA-256 of the decoded
arrays (each array's name, dtype and shape, then its C-order bytes, in the order
x_train, y_train, x_test, y_test), their shapes, the classes and the scaling.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from bpjax.arraycheck import KEYS, checked_fields
from bpjax.data import DATASETS, Dataset, dataset_shape
from bpjax.errors import ConfigError, DataError
from bpjax.idx import IDX_FILES, find_idx, read_idx

__all__ = [
    "FILE_KINDS",
    "arrays_dataset",
    "check_data_settings",
    "data_widths",
    "load_file",
    "parse_spec",
]

FILE_KINDS = ("npz", "csv", "idx")
FORMS = "npz:PATH, csv:TRAIN,TEST or idx:DIR"


def parse_spec(spec: str) -> tuple[str, str] | None:
    """``(kind, path)`` of a file dataset, None for a built-in name; ConfigError otherwise."""
    if spec in DATASETS:
        return None
    kind, sep, path = spec.partition(":")
    if sep and kind in FILE_KINDS and path:
        if kind == "csv" and len(path.split(",")) != 2:
            raise ConfigError(f"--dataset={spec}: csv takes two files, csv:TRAIN,TEST (a"
                              " training and a test CSV, one example a row)")  # fmt: skip
        return kind, path
    raise ConfigError(f"--dataset={spec!r} is not one of: {', '.join(DATASETS)}, nor a file:"
                      f" {FORMS}")  # fmt: skip


def data_widths(spec: str) -> tuple[int, int]:
    """``(n_0, n_L)`` of the dataset ``spec``: a built-in one's definition, or the file read."""
    if parse_spec(spec) is None:
        shape = dataset_shape(spec)
        return shape.n_in, shape.n_out
    data = load_file(spec)
    return data.x_train.shape[1], data.num_classes or data.y_train.shape[1]


def load_file(spec: str, *, label_column: str | None = None) -> Dataset:
    """The dataset in the file(s) ``spec`` names (``npz:``, ``csv:``, ``idx:``), checked.

    Raises:
      DataError: unreadable or malformed files (one line naming the file and the fault).
    """
    parsed = parse_spec(spec)
    if parsed is None:
        raise ConfigError(f"--dataset={spec} is a built-in dataset, not a file: load_dataset")
    kind, path = parsed
    if kind == "npz":
        arrays, size, classes = _read_npz(path)
    elif kind == "csv":
        arrays, size, classes = _read_csv_pair(path, label_column), _size(path.split(",")), None
    else:
        arrays, size, classes = _read_idx_dir(path), None, None
        size = _size(str(find_idx(pathlib.Path(path), base)) for base in IDX_FILES.values())
    return arrays_dataset(**arrays, name=spec, num_classes=classes, origin={"bytes": size})


def arrays_dataset(x_train: Any, y_train: Any, x_test: Any, y_test: Any, *, name: str,
                   num_classes: int | None = None,
                   origin: Mapping[str, Any] | None = None) -> Dataset:  # fmt: skip
    """The checked arrays (``bpjax.arraycheck``) as a :class:`Dataset`, ``origin`` recorded."""
    return Dataset(**checked_fields(x_train, y_train, x_test, y_test, name=name,
                                    num_classes=num_classes, origin=origin))  # fmt: skip


# ----------------------------------------------------------------------- files


def _size(paths: Any) -> int:
    return sum(os.path.getsize(p) for p in paths)


def _read_npz(path: str) -> tuple[dict[str, np.ndarray], int, int | None]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"npz:{path}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"npz:{path}: not an npz file bpjax can read ({_why(e)})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"npz:{path}: holds one array (.npy), not an npz of {', '.join(KEYS)}")
    with loaded as z:
        missing = [k for k in KEYS if k not in z.files]
        if missing:
            raise DataError(f"npz:{path}: no array {', '.join(missing)} (it holds:"
                            f" {', '.join(z.files) or 'nothing'}); bpjax reads"
                            f" {', '.join(KEYS)}")  # fmt: skip
        try:
            arrays = {k: z[k] for k in KEYS}
            classes = z["num_classes"] if "num_classes" in z.files else None
        except ValueError as e:  # an object array: only pickle could read it
            raise DataError(f"npz:{path}: {_why(e)}; bpjax never unpickles: save numeric"
                            " arrays") from None  # fmt: skip
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"npz:{path}: damaged ({_why(e)})") from None
    if classes is not None and (classes.shape != () or classes.dtype.kind not in "iu"):
        raise DataError(f"npz:{path}: num_classes must be one integer, got {classes!r}")
    return arrays, os.path.getsize(path), None if classes is None else int(classes)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


_INT = re.compile(r"^[+-]?\d+$")


def _read_csv(path: str, label_column: str | None) -> tuple[list[str] | None, np.ndarray, Any]:
    """``(header or None, features (N, d) float64, labels (N,) int64 or float64)``."""
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"csv {path}: cannot read ({_why(e)})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    first = [c.strip() for c in lines[0].split(",")] if lines else []
    header = first if first and any(not _number(c) for c in first) else None
    rows = lines[1:] if header else lines
    if not rows:
        raise DataError(f"csv {path}: empty (no example rows)")
    try:
        table = np.loadtxt(io.StringIO("\n".join(rows)), delimiter=",", dtype=str, ndmin=2)
    except ValueError as e:
        raise DataError(f"csv {path}: rows of different lengths ({_why(e)})") from None
    if table.shape[1] < 2:
        raise DataError(f"csv {path}: {table.shape[1]} column: need features and a label")
    col = table.shape[1] - 1
    if label_column is not None:
        if header is None or label_column not in header:
            raise DataError(f"csv {path}: no column {label_column!r} (--label_column) in the"
                            f" header row {header or '(none: the first row is numbers)'}")
        col = header.index(label_column)
    labels = np.char.strip(table[:, col])
    try:
        x = np.delete(table, col, axis=1).astype(np.float64)
        y = labels.astype(np.int64) if all(_INT.match(v) for v in labels) else labels.astype(
            np.float64)
    except ValueError as e:
        raise DataError(f"csv {path}: not all numbers ({_why(e)})") from None
    return header, x, y


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv_pair(spec_path: str, label_column: str | None) -> dict[str, np.ndarray]:
    train, test = spec_path.split(",")
    (h_train, x_train, y_train), (h_test, x_test, y_test) = (
        _read_csv(p, label_column) for p in (train, test))
    if h_train != h_test:
        raise DataError(f"csv {train} and {test}: the header rows differ ({h_train} vs"
                        f" {h_test})")  # fmt: skip
    if y_train.dtype != y_test.dtype:  # 3 in one file, 3.5 in the other: targets in both
        y_train, y_test = y_train.astype(np.float64), y_test.astype(np.float64)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _read_idx_dir(directory: str) -> dict[str, np.ndarray]:
    """The four IDX files of ``directory`` as they are: any size, any element type."""
    root = pathlib.Path(directory)
    if not root.is_dir():
        raise DataError(f"idx:{directory}: not a directory")
    paths = {key: find_idx(root, base) for key, base in IDX_FILES.items()}
    missing = [f"{IDX_FILES[k]}[.gz]" for k, p in paths.items() if p is None]
    if missing:
        raise DataError(f"idx:{directory}: missing {', '.join(missing)}")
    return {key: read_idx(path) for key, path in paths.items() if path is not None}


# ----------------------------------------------------------------------- settings


def train_rows(config: Any) -> float:
    """Training rows a built-in dataset leaves after the hold-out (inf for a file: unknown)."""
    if parse_spec(config.dataset) is not None:
        return math.inf
    return dataset_shape(config.dataset).n_train - config.validation_examples


def check_data_settings(config: Any) -> None:
    """The data settings of a ``Config``, alone and together (one ConfigError line)."""
    file = parse_spec(config.dataset)
    if config.data_dir is not None and file is not None:
        raise ConfigError(f"--data_dir holds the IDX files of a built-in dataset;"
                          f" --dataset={config.dataset} names its own: drop --data_dir")
    held = config.validation_examples
    if held < 0:
        raise ConfigError(f"--validation_examples must be 0 (none) or a positive integer,"
                          f" got {held!r}")  # fmt: skip
    if file is None and held >= dataset_shape(config.dataset).n_train:
        raise ConfigError(f"--validation_examples={held} leaves none of the"
                          f" {dataset_shape(config.dataset).n_train} training examples of"
                          f" {config.dataset} to train on: hold out fewer")  # fmt: skip
    if config.target_split == "validation" and not held:
        raise ConfigError("--target_split=validation needs a validation set: pass"
                          " --validation_examples=N")  # fmt: skip
    shape = config.data_shape
    if shape is not None and min(shape) < 1:
        raise ConfigError(f"--data_shape must be two positive widths (n_0, n_L), got {shape}")


def with_data_shape(record: dict[str, Any]) -> dict[str, Any]:
    """A ``config.json`` record with ``data_shape`` from its ``sizes`` where it has none.

    Runs recorded before ``data_shape`` existed (or on a Dataset given in Python, with
    ``dataset`` naming another): their network's sizes are the truth of the record.
    """
    sizes = record.get("sizes")
    if "data_shape" in record or not isinstance(sizes, list) or len(sizes) < 2:
        return record
    return record | {"data_shape": [sizes[0], sizes[-1]]}
