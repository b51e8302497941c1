"""bpjax.idx against IDX bytes written out here with ``struct`` (issue 20: a round trip
through write_idx and read_idx alone cannot see a bug both share, such as a wrong byte
order for one type code). Every type code, plain and gzip; every header error is one
line naming the file.

IDX (LeCun's format): magic 0x0000TTNN (TT the type, NN the number of dimensions), NN
big-endian uint32 sizes, then the elements big-endian in C order.
"""

from __future__ import annotations

import gzip
import math
import struct

import numpy as np
import pytest

from bpjax.errors import DataError
from bpjax.idx import IDX_FILES, read_idx, read_idx_dir, write_idx

# type code, numpy dtype, struct format of one element, sample values (extremes included)
TYPES = [
    (0x08, np.uint8, "B", [0, 1, 127, 128, 255, 7]),
    (0x09, np.int8, "b", [-128, -1, 0, 1, 127, 5]),
    (0x0B, np.int16, "h", [-32768, -2, 0, 300, 32767, 1]),
    (0x0C, np.int32, "i", [-(2**31), -70000, 0, 1, 2**31 - 1, 65536]),
    (0x0D, np.float32, "f", [-1.5, 0.0, 3.25, 1e-30, -2.0**100, 0.1]),
    (0x0E, np.float64, "d", [-1.5, 0.0, 3.25, 1e-300, 2.0**1000, 0.1]),
]
IDS = [np.dtype(t[1]).name for t in TYPES]


def idx_bytes(code: int, shape: tuple[int, ...], fmt: str, values: list) -> bytes:
    """An IDX file's bytes, from the format's definition."""
    header = bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
    return header + struct.pack(f">{len(values)}{fmt}", *values)


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and isinstance(e.value, DataError)
    return message


@pytest.mark.parametrize(("code", "dtype", "fmt", "values"), TYPES, ids=IDS)
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_every_type_code_reads_and_writes_the_formats_bytes(tmp_path, code, dtype, fmt, values,
                                                            gz):  # fmt: skip
    shape = (2, 3)
    raw = idx_bytes(code, shape, fmt, values)
    array = np.asarray(values, dtype).reshape(shape)  # C order: row 0 first

    given = tmp_path / ("given.gz" if gz else "given")
    given.write_bytes(gzip.compress(raw) if gz else raw)
    back = read_idx(given)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative and back.shape == shape
    np.testing.assert_array_equal(back, array)
    back[0, 0] = 0  # an array of its own, writable

    written = tmp_path / ("written-idx2-ubyte.gz" if gz else "written-idx2-ubyte")
    write_idx(written, array)
    data = written.read_bytes()
    assert data[:2] == (b"\x1f\x8b" if gz else b"\x00\x00")
    assert (gzip.decompress(data) if gz else data) == raw
    # Other byte orders and layouts of the same values write the same file.
    for variant in (array.astype(np.dtype(dtype).newbyteorder(">")),
                    array.astype(np.dtype(dtype).newbyteorder("<")),
                    np.asfortranarray(array)):  # fmt: skip
        again = tmp_path / "again"
        write_idx(again, variant)
        assert again.read_bytes() == raw


def test_shapes_of_one_to_four_dimensions_and_zero_length(tmp_path):
    for shape in [(5,), (2, 3), (2, 1, 3), (1, 2, 1, 2), (0,), (3, 0)]:
        values = list(range(math.prod(shape)))
        raw = idx_bytes(0x0C, shape, "i", values)
        path = tmp_path / "a"
        path.write_bytes(raw)
        np.testing.assert_array_equal(read_idx(path), np.arange(len(values)).reshape(shape))
        write_idx(path, np.arange(len(values), dtype=np.int32).reshape(shape))
        assert path.read_bytes() == raw


def test_a_transposed_array_is_written_in_its_own_c_order(tmp_path):
    array = np.arange(6, dtype=np.int16).reshape(2, 3).T  # (3, 2), not C-contiguous
    path = tmp_path / "t"
    write_idx(path, array)
    assert path.read_bytes() == idx_bytes(0x0B, (3, 2), "h", array.ravel().tolist())


def test_gzip_files_are_reproducible(tmp_path):
    a, b = tmp_path / "a.gz", tmp_path / "b.gz"
    write_idx(a, np.arange(10, dtype=np.uint8))
    write_idx(b, np.arange(10, dtype=np.uint8))
    assert a.read_bytes() == b.read_bytes()  # no timestamp in the gzip header


@pytest.mark.parametrize("dtype", [np.uint16, np.int64, np.float16, np.bool_, np.complex64])
def test_types_idx_cannot_hold_are_refused_in_one_line(tmp_path, dtype):
    with pytest.raises(ValueError, match=r"^IDX holds 1-255 dims of .*, got") as e:
        write_idx(tmp_path / "x", np.zeros(3, dtype))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"got uint8 \(\)"):
        write_idx(tmp_path / "x", np.uint8(3))  # no dimensions
    assert not (tmp_path / "x").exists()


GOOD = idx_bytes(0x0B, (2, 3), "h", [1, 2, 3, 4, 5, 6])  # 4 + 8 + 12 = 24 bytes


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "truncated: expected at least 4 bytes (IDX header), got 0"),
        (b"\x00\x00\x08", "truncated: expected at least 4 bytes (IDX header), got 3"),
        (b"\x01" + GOOD[1:], "bad magic number 0x01000b02"),
        (b"\x00\x01" + GOOD[2:], "bad magic number 0x00010b02"),
        (b"\x00\x00\x0a\x02" + GOOD[4:], "bad magic number 0x00000a02"),  # no type 0x0a
        (b"\x00\x00\x07\x02" + GOOD[4:], "bad magic number 0x00000702"),
        (b"\x00\x00\x0f\x02" + GOOD[4:], "bad magic number 0x00000f02"),
        (b"\x00\x00\x0b\x00" + GOOD[4:], "bad magic number 0x00000b00"),  # zero dimensions
        (GOOD[:11], "truncated: expected at least 12 bytes (header), got 11"),
        (GOOD[:4], "truncated: expected at least 12 bytes (header), got 4"),
        (GOOD[:-1], "truncated: expected 24 bytes, got 23"),
        (GOOD[:12], "truncated: expected 24 bytes, got 12"),
        (GOOD + b"\x00", "expected 24 bytes, got 25 (trailing data)"),
        # The header's dimensions disagree with the data: (2, 4) needs 28 bytes, (2, 2) 20.
        (GOOD[:8] + struct.pack(">I", 4) + GOOD[12:], "truncated: expected 28 bytes, got 24"),
        (GOOD[:8] + struct.pack(">I", 2) + GOOD[12:], "expected 20 bytes, got 24 (trailing data)"),
        # 3 dims: 2, 3, and the first data word 0x00010002 = 65538 read as the third.
        (b"\x00\x00\x0b\x03" + GOOD[4:],
         f"truncated: expected {4 + 12 + 2 * 3 * 65538 * 2} bytes, got 24"),
    ],
    ids=["empty", "3 bytes", "byte 0", "byte 1", "type 0a", "type 07", "type 0f", "0 dims",
         "header cut", "header missing", "data short 1", "no data", "trailing", "dims larger",
         "dims smaller", "3 dims read from 2"],
)  # fmt: skip
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_each_header_error_is_one_data_error_line_naming_the_file(tmp_path, raw, expected, gz):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError) as e:
        read_idx(path)
    message = one_line(e)
    if expected.startswith("bad magic"):  # then what a magic number should be
        message = message.split(": expected 0x0000TTNN")[0]
    assert message == f"{path}: {expected}"


def test_a_damaged_gzip_is_one_line(tmp_path):
    data = gzip.compress(GOOD)
    path = tmp_path / "a.gz"
    for damaged in (data[: len(data) - 4], data[:12], data[:-8] + b"\x00" * 8):
        path.write_bytes(damaged)
        with pytest.raises(DataError) as e:
            read_idx(path)
        message = one_line(e)
        assert message.startswith(f"{path}: ")
        assert "truncated" in message or "corrupt gzip" in message


def _write_dir(directory, arrays, gz=()):
    directory.mkdir(exist_ok=True)
    for key, base in IDX_FILES.items():
        write_idx(directory / (base + (".gz" if key in gz else "")), arrays[key])


def _arrays(n_train=4, n_test=3):
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (n_train, 2, 3), dtype=np.uint8),
            "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
            "x_test": rng.integers(0, 256, (n_test, 2, 3), dtype=np.uint8),
            "y_test": rng.integers(0, 10, n_test, dtype=np.uint8)}  # fmt: skip


def test_a_directory_of_idx_files_reads_plain_before_gz(tmp_path):
    arrays = _arrays()
    _write_dir(tmp_path / "d", arrays, gz=("x_train", "y_test"))
    got, origins = read_idx_dir(tmp_path / "d")
    for key, array in arrays.items():  # images flattened to rows
        np.testing.assert_array_equal(got[key], array.reshape(len(array), -1) if
                                      key.startswith("x") else array)  # fmt: skip
    assert origins["x_train"].endswith(".gz") and not origins["y_train"].endswith(".gz")
    # With both present, the plain file is the one read.
    write_idx(tmp_path / "d" / (IDX_FILES["y_train"] + ".gz"), arrays["y_train"][::-1].copy())
    assert not read_idx_dir(tmp_path / "d")[1]["y_train"].endswith(".gz")


@pytest.mark.parametrize(
    ("key", "array", "expected"),
    [
        ("y_train", np.zeros(5, np.uint8), "4 images but"),  # counts differ
        ("y_test", np.zeros((3, 1), np.uint8), "expected uint8 (N,), got uint8 (3, 1)"),
        ("x_test", np.zeros((3, 6), np.uint8), "expected uint8 (N, rows, cols), got uint8"),
        ("x_train", np.zeros((4, 2, 3), np.float32), "expected uint8 (N, rows, cols), got"),
    ],
)
def test_a_directory_that_does_not_hold_a_dataset_is_one_line(tmp_path, key, array, expected):
    arrays = _arrays()
    arrays[key] = array
    _write_dir(tmp_path / "d", arrays)
    with pytest.raises(DataError) as e:
        read_idx_dir(tmp_path / "d")
    assert expected in one_line(e)
    (tmp_path / "d" / IDX_FILES["x_test"]).unlink()
    with pytest.raises(DataError) as e:
        read_idx_dir(tmp_path / "d")
    assert one_line(e) == f"data_dir {tmp_path / 'd'}: missing {IDX_FILES['x_test']}[.gz]"
