"""Timing jitted functions honestly: compile apart, warm-up discarded, medians.

Every benchmark in ``experiments/`` goes through these helpers, so the numbers
they print are measured the same way (STYLE.md, "Running, measuring, logging"):

* compile time is measured apart, with ``jax.jit(f).lower(*args).compile()``;
  the timed calls go to the returned ``Compiled`` object, which can never
  recompile (a shape change raises instead);
* every call blocks on its whole output pytree (``jax.block_until_ready``);
* warm-up calls are discarded; the median and the 10th/90th percentiles of the
  repeats are reported;
* methods are compared *interleaved* (each round calls every function once)
  in one process, so machine noise (other processes on a shared CPU,
  frequency changes) hits all of them alike and their ratio stays meaningful
  even when the absolute times drift; each round's order is a fresh (seeded)
  random permutation, so no function always runs right after the same other
  one (cold caches after a memory-heavy method, sleeping thread pools). A
  rotation (A B C, B C A, ...) would not do: it keeps the cyclic order, and B
  would nearly always follow A.

A step that donates its state (``donate_argnums=0``) cannot be called twice on
the same buffers; ``carry=True`` threads the state it returns back in as the
first argument of the next call, exactly as a training loop does: the first
element of a plain tuple ``(state, metrics)``, or the whole output when that is
the state itself (an array, or a ``NamedTuple`` such as ``bpjax.training.TrainState``).

    >>> t = time_fn(jax.jit(step, donate_argnums=0), state, x, y, carry=True)
    >>> t.median_s, t.compile_s

Matrix-product precision: a jitted function's float32 products are fixed when it
is traced and compiled (``jax.default_matmul_precision`` then), not when it is
called; :func:`matmul_precision_scope` sets it around compilation and says what
was in effect.

The compile counter listens to ``jax.monitoring`` from import on; only the
measuring wing (``bpjax.bench``) imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import jax
import jaxlib
import numpy as np

from bpjax.config import PLATFORMS

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock statistics of one function, in seconds.

    ``times_s`` holds every timed repeat (warm-up excluded); ``compile_s`` is
    the trace + lower + XLA compile time, measured once, apart.
    ``cpu_median_s`` is the median process CPU time per call (all threads):
    on a shared machine it moves less than wall time when other processes
    compete for the cores, so it is a second, steadier view of the work done.
    """

    compile_s: float
    median_s: float
    p10_s: float
    p90_s: float
    min_s: float
    repeats: int
    times_s: tuple[float, ...]
    cpu_median_s: float = float("nan")

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative noise of the repeats."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """The statistics without the raw repeats (for tables and JSON rows)."""
        d = dataclasses.asdict(self)
        d.pop("times_s")
        d["spread"] = self.spread
        return d


def timing_from_times(
    times_s: Sequence[float],
    compile_s: float = float("nan"),
    cpu_times_s: Sequence[float] = (),
) -> Timing:
    """Builds a :class:`Timing` from raw repeat times (and CPU times, if any)."""
    t = np.asarray(times_s, dtype=np.float64)
    if t.size == 0:
        raise ValueError("timing_from_times needs at least one repeat")
    return Timing(
        compile_s=float(compile_s),
        median_s=float(np.median(t)),
        p10_s=float(np.percentile(t, 10)),
        p90_s=float(np.percentile(t, 90)),
        min_s=float(t.min()),
        repeats=int(t.size),
        times_s=tuple(float(v) for v in t),
        cpu_median_s=float(np.median(cpu_times_s)) if len(cpu_times_s) else float("nan"),
    )


class CompileCounter:
    """Counts XLA backend compilations, process-wide, via ``jax.monitoring``.

    ``jax.jit`` records one ``/jax/core/compile/backend_compile_duration``
    event per real XLA compilation (cache hits record nothing), so the
    difference of :attr:`count` around a block of code is the number of
    compilations it caused. Use the module-level :data:`COMPILES`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        del duration_secs, kwargs
        if event == _BACKEND_COMPILE_EVENT:
            with self._lock:
                self._count += 1

    @property
    def count(self) -> int:
        return self._count


COMPILES = CompileCounter()


def compile_fn(fn: Callable, *args: Any) -> tuple[Callable, float, int]:
    """Compiles ``fn`` for ``args`` ahead of time.

    Returns ``(compiled, compile_s, n_compiles)``: a ``jax.stages.Compiled``
    (or ``fn`` itself when it is not jitted, e.g. a NumPy or torch function),
    the trace + lower + compile seconds, and how many XLA compilations that
    took (1 for a jitted function seen for the first time).
    """
    if not hasattr(fn, "lower"):
        return fn, 0.0, 0
    before = COMPILES.count
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    return compiled, compile_s, COMPILES.count - before


def _block(out: Any) -> Any:
    return jax.block_until_ready(out)


def carried_state(out: Any) -> Any:
    """The state a step returns: ``out[0]`` of a plain tuple ``(state, metrics)``, else ``out``.

    A ``NamedTuple`` is a tuple too, but one that is the state itself
    (``TrainState``): it is carried whole, never its first field.
    """
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return out[0]
    return out


def _call_once(fn: Callable, args: list[Any], carry: bool) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = _block(fn(*args))
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    if carry:
        args[0] = carried_state(out)
    return dt, dc


def compare_fns(
    fns: Mapping[str, tuple[Callable, Sequence[Any]]],
    *,
    repeats: int = 20,
    warmup: int = 2,
    carry: bool | Collection[str] = False,
    min_time_s: float = 0.0,
    max_time_s: float = float("inf"),
) -> dict[str, Timing]:
    """Times several functions interleaved: round r calls each of them once.

    Args:
      fns: ``{name: (fn, args)}``; each ``fn`` is compiled ahead of time for
        its ``args`` (when it has ``.lower``) and then called as ``fn(*args)``.
      repeats: timed rounds (at least this many; see ``min_time_s``).
      warmup: untimed rounds first (caches, thread pools, page faults).
      carry: the state each call returns (:func:`carried_state`) replaces its
        first argument (for steps that donate their state): ``True`` for all,
        or the names to carry.
      min_time_s: keep adding rounds until this much total time was timed, so
        microsecond-scale functions get enough samples for a stable median.
      max_time_s: stop adding rounds (beyond ``repeats``) past this total.

    Returns:
      ``{name: Timing}`` with each function's compile time apart.
    """
    carried = {n: (carry if isinstance(carry, bool) else n in carry) for n in fns}
    compiled, compile_s, state = {}, {}, {}
    for name, (fn, args) in fns.items():
        compiled[name], compile_s[name], _ = compile_fn(fn, *args)
        state[name] = list(args)
    for _ in range(warmup):
        for name in fns:
            _call_once(compiled[name], state[name], carried[name])
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    total, rounds = 0.0, 0
    names = list(fns)
    order_rng = np.random.default_rng(0)
    while rounds < repeats or (total < min_time_s and total < max_time_s):
        for i in order_rng.permutation(len(names)):
            name = names[i]
            dt, dc = _call_once(compiled[name], state[name], carried[name])
            times[name].append(dt)
            cpu[name].append(dc)
            total += dt
        rounds += 1
        if rounds > 100 * max(repeats, 1):
            break
    return {name: timing_from_times(times[name], compile_s[name], cpu[name]) for name in fns}


def time_fn(
    fn: Callable,
    *args: Any,
    repeats: int = 20,
    warmup: int = 2,
    carry: bool = False,
    min_time_s: float = 0.0,
) -> Timing:
    """Times one function: ``compare_fns`` with a single entry."""
    return compare_fns(
        {"fn": (fn, args)}, repeats=repeats, warmup=warmup, carry=carry, min_time_s=min_time_s
    )["fn"]


def device_info(device: jax.Device | None = None) -> dict[str, Any]:
    """Where the numbers were measured: to write beside every timing."""
    device = device if device is not None else jax.devices()[0]
    info: dict[str, Any] = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device": str(device),
        "num_devices": len(jax.devices(device.platform)),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", ""),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return info


def machine_line(sizes: Sequence[int]) -> str:
    """A benchmark's first line: the device, processor, cores and load, jax, the network."""
    info = device_info()
    return (f"{info['device_kind']} ({info['processor']}, {info['cpu_count']} cpus, load "
            f"{info['load_average']}), jax {info['jax_version']}, sizes {tuple(sizes)}")


@contextlib.contextmanager
def matmul_precision_scope(precision: str) -> Iterator[str]:
    """``jax.default_matmul_precision(precision)`` for what is traced and compiled inside.

    Yields the precision in effect there (what a compilation inside sees), to
    record beside the numbers; ``device_info`` records the process-wide setting.
    """
    with jax.default_matmul_precision(precision):
        yield jax.config.jax_default_matmul_precision


def available_platforms() -> tuple[str, ...]:
    """The platforms JAX can run on here, in ``bpjax.config.PLATFORMS`` order."""
    found = []
    for p in PLATFORMS:
        try:
            if jax.devices(p):
                found.append(p)
        except RuntimeError:
            pass
    return tuple(found)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def peak_memory_bytes(device: jax.Device) -> int | None:
    """``peak_bytes_in_use`` where the backend reports it (GPU/TPU), else None.

    The peak never resets within a process: measure one configuration per
    process for a true per-configuration peak.
    """
    try:
        stats = device.memory_stats()
    except Exception:  # backends without allocator stats raise various errors
        return None
    if not stats:
        return None
    peak = stats.get("peak_bytes_in_use")
    return int(peak) if peak is not None else None
