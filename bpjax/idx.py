"""The IDX file format, in which MNIST and Fashion-MNIST are distributed.

An IDX file is a 4-byte magic number ``0x0000TTNN`` (TT the element type: 08
uint8, 09 int8, 0b int16, 0c int32, 0d float32, 0e float64; NN the number of
dimensions), then NN big-endian uint32 sizes, then the elements, big-endian, in
C order. The datasets ship four of them (:data:`IDX_FILES`), often gzip-compressed.

Importing this module touches no file and no network.
"""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import zlib

import numpy as np

from bpjax.errors import DataError

__all__ = ["IDX_FILES", "find_idx", "read_idx", "read_idx_dir", "write_idx"]

# The four arrays of an image dataset (also the npz keys of bpjax's cache) and their IDX files.
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

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


def read_idx_dir(
    directory: str | os.PathLike[str],
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads the four :data:`IDX_FILES` of ``directory``, each plain or ``.gz``.

    Returns:
      ``(arrays, origins)``, both keyed like :data:`IDX_FILES`: uint8 images
      flattened to ``(N, rows * cols)`` and ``(N,)`` labels, and the file each came from.

    Raises:
      DataError: not a directory, a file missing or unreadable, not uint8 images
        and labels, or image and label counts that differ.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise DataError(f"data_dir {directory}: not a directory")
    paths = {key: find_idx(directory, base) for key, base in IDX_FILES.items()}
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


def find_idx(directory: pathlib.Path, base: str) -> pathlib.Path | None:
    """``directory/base``, else ``directory/base.gz``, else None."""
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _parse_idx(raw: bytes, where: str) -> np.ndarray:
    """The array held by the IDX bytes ``raw`` (gunzipped first if gzip); ``where`` names them."""
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
    """Decompresses ``raw``; a stream that ends early says how many bytes it lacks."""
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
