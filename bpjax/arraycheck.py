"""Checks a dataset's four arrays and hashes them: one line for every fault.

A dataset is four arrays, ``x_train, y_train, x_test, y_test``. ``x``: one example a row
(images ``(N, H, W, C)`` are flattened), uint8 (scaled by 1/255, float32) or float (used
as given); ``y``: integer labels ``(N,)`` in ``[0, classes)`` or float targets ``(N,)`` /
``(N, k)``. Every fault (a wrong dtype, an empty split, lengths that differ, splits of
other shapes, labels out of range, NaN or inf) is a one-line ``DataError`` naming the
source. ``sha256_arrays`` is the hash a run records of its data. Used by
``bpjax.data.Dataset.from_arrays`` and the file loaders of ``bpjax.userdata``; this module
imports neither, so neither imports the other back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from bpjax.errors import DataError

KEYS = ("x_train", "y_train", "x_test", "y_test")


def sha256_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over each array's name, dtype and shape, then its C-contiguous bytes."""
    h = hashlib.sha256()
    for key, a in arrays.items():
        a = np.ascontiguousarray(a)
        h.update(f"{key} {a.dtype.str} {a.shape}\n".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def checked_fields(x_train: Any, y_train: Any, x_test: Any, y_test: Any, *, name: str,
                   num_classes: int | None = None,
                   origin: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Checks raw arrays (see the module docstring): the fields of a ``bpjax.Dataset``.

    The record's ``sha256`` is of the arrays as given, before any scaling: the same
    bytes give the same hash whichever file or call they came from.
    """
    arrays = {k: np.asarray(v) for k, v in zip(KEYS, (x_train, y_train, x_test, y_test),
                                                strict=True)}  # fmt: skip
    classes = _check(arrays, name, num_classes)
    x_tr, x_te = (_inputs(arrays[k]) for k in ("x_train", "x_test"))
    y_tr, y_te = (_targets(arrays[k], classes) for k in ("y_train", "y_test"))
    record = {"dataset": name, **(origin or {"origin": "arrays given in Python"}),
              "sha256": sha256_arrays(arrays),
              "shapes": {k: list(a.shape) for k, a in arrays.items()},
              "dtypes": {k: a.dtype.name for k, a in arrays.items()}, "classes": classes,
              "scaling": "uint8 / 255" if arrays["x_train"].dtype == np.uint8 else "as given"}
    return dict(name=name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                num_classes=classes, record=record)  # fmt: skip


# ----------------------------------------------------------------------- checks


def _check(arrays: Mapping[str, np.ndarray], where: str, num_classes: int | None) -> int | None:
    """Raises DataError for any fault of the module docstring; returns the classes (or None)."""
    for key, a in arrays.items():
        kind = a.dtype.kind
        if key[0] == "x" and not (a.dtype == np.uint8 or kind == "f"):
            raise DataError(f"{where}: {key} has dtype {a.dtype}: expected uint8 (images,"
                            " scaled by 1/255) or a float dtype (used as given)")  # fmt: skip
        if key[0] == "y" and kind not in "iuf":
            raise DataError(f"{where}: {key} has dtype {a.dtype}: expected integer class labels"
                            " or float regression targets")  # fmt: skip
        if a.ndim == 0 or a.size == 0:
            raise DataError(f"{where}: {key} is empty (shape {a.shape}): each split needs at"
                            " least one example with at least one value")  # fmt: skip
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise DataError(f"{where}: x_{split} has {len(x)} examples but y_{split} has"
                            f" {len(y)}: one label (or target row) per example")  # fmt: skip
    (xa, ya), (xb, yb) = ((arrays[f"x_{s}"], arrays[f"y_{s}"]) for s in ("train", "test"))
    if xa.shape[1:] != xb.shape[1:] or ya.shape[1:] != yb.shape[1:]:
        raise DataError(f"{where}: the splits differ in shape: x_train {xa.shape}, y_train"
                        f" {ya.shape}, x_test {xb.shape}, y_test {yb.shape}")  # fmt: skip
    if (ya.dtype.kind == "f") != (yb.dtype.kind == "f"):
        raise DataError(f"{where}: y_train is {ya.dtype} but y_test {yb.dtype}: both integer"
                        " class labels or both float targets")  # fmt: skip
    for key, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            rows = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))
            raise DataError(f"{where}: {key} has NaN or infinite values in {len(rows)} rows"
                            f" (the first: row {rows[0]}): remove or impute them")  # fmt: skip
    return None if ya.dtype.kind == "f" else _classes(ya, yb, where, num_classes)


def _classes(y_train: np.ndarray, y_test: np.ndarray, where: str, given: int | None) -> int:
    """The number of classes: ``given``, else the largest label plus one; labels checked."""
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        if y.ndim != 1:
            raise DataError(f"{where}: {key} has shape {y.shape}: integer class labels are one"
                            " per example, (N,); float targets may be (N, k)")  # fmt: skip
    top = max(int(y_train.max()), int(y_test.max()))
    classes = top + 1 if given is None else int(given)
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        bad = np.flatnonzero((y < 0) | (y >= classes))
        if len(bad):
            raise DataError(f"{where}: {key} has labels outside [0, {classes}): {y[bad[0]]} at"
                            f" row {bad[0]} ({len(bad)} such rows)")  # fmt: skip
    return classes


def _inputs(x: np.ndarray) -> np.ndarray:
    """``(N, d)``: uint8 scaled by 1/255 in one pass (float32), floats as given."""
    flat = x.reshape(len(x), -1)
    if x.dtype == np.uint8:
        return np.divide(flat, np.float32(255.0), dtype=np.float32)
    return _float(flat)


def _targets(y: np.ndarray, classes: int | None) -> np.ndarray:
    if classes is not None:
        return y.astype(np.int32, copy=False)
    return _float(y.reshape(len(y), -1))


def _float(a: np.ndarray) -> np.ndarray:
    """float32 and float64 kept as given (a float64 run computes on the exact values)."""
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)
