"""Batch-size sweep of one training step: every method, every platform, timed alike.

The library half of ``experiments/batch_sweep.py`` (which only turns flags into
a :class:`SweepConfig`): importable from a notebook, no absl here.

    >>> from bpjax.bench.sweep import SweepConfig, run_sweep
    >>> from bpjax.bench.report import sweep_metadata, write_results
    >>> cfg = SweepConfig(batches=(1, 64, 4096), methods=("manual", "autodiff"))
    >>> rows = run_sweep(cfg)
    >>> write_results(rows, sweep_metadata(cfg), cfg.out_dir)

What one row measures: one SGD step (``steps.sgd_step``: the training loop's
step, gradient by ``method``, ``W -= lr * dW``) of the ``sizes`` network at one
batch size, jitted with the state donated, on ``jax.devices(platform)[0]``:
compiled apart, timed interleaved with the other methods and the GEMM-only
roofline (``bpjax.bench.measure``); ``report.derive`` adds the derived columns.

Precision. ``dtype="bfloat16"`` is the mixed precision of a training run
(``bpjax.methods``): float32 params and SGD update, x in bfloat16, y in float32,
the gradient by ``grad_fn(..., compute_dtype="bfloat16")``; the GEMM-only roofline
and the square-matmul peak then run in bfloat16 too, as the step's products do.
``matmul_precision`` (``jax.default_matmul_precision``) is in effect while every
timed function is traced and compiled, and is recorded in the metadata and rows.

Scaling over devices (``device_counts``, e.g. ``(1, 2, 4, 8)``): with D > 1 the
same jitted step runs data parallel: the state replicated over a mesh
``("data",)`` of the platform's first D devices, the batch split by rows, XLA
inserting the all-reduce of the section 6 sums. Its ``roofline_s`` is then one
device's share (batch / D) of the products: perfect scaling, no communication.
The peers run at D = 1 only; a batch that does not divide by D is a
``skipped`` row. On a CPU host, simulate devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (they share the host's
cores, so this shows the plumbing and the all-reduce cost, not a speed-up).

Peak memory: the allocator's peak never resets within a process, so on
backends that report one (GPU, TPU) each configuration runs in a fresh
subprocess (``isolate``). The worker starts from the environment only, so the
parent's JAX settings that change the numbers (``jax_enable_x64``,
``jax_default_matmul_precision``) travel in the job; the worker applies them
and reports them back, and a mismatch is an error rather than a wrong label.
The config travels whole (``matmul_precision`` with it), and the worker's row
says which precision it compiled under: a mismatch is an error too.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import operator
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

from bpjax.activations import ACTIVATIONS
from bpjax.bench.measure import host_params, measure_batch
from bpjax.bench.peers import PEERS, HostParams, torch_available, torch_cuda_available
from bpjax.bench.report import Measurement, Row, derive
from bpjax.bench.steps import measure_matmul_peak
from bpjax.bench.timing import available_platforms, matmul_precision_scope, peak_memory_bytes
from bpjax.config import (
    DTYPES,
    MATMUL_PRECISIONS,
    PLATFORMS,
    Config,
    ConfigError,
    check_choice,
    check_choices,
    check_positive_float,
    check_positive_int,
    check_sizes,
    setting,
)
from bpjax.errors import is_out_of_memory
from bpjax.losses import LOSSES
from bpjax.methods import METHODS

_BASE = Config()  # the network and the update of a training run: the sweep's defaults
DEFAULT_BATCHES = tuple(2**k for k in range(14))  # 1, 2, 4, ..., 8192
ISOLATE = ("auto", "always", "never")
_WORKER = "from bpjax.bench.sweep import _worker_main; _worker_main()"


def _parse_max_batch(items: Iterable[str]) -> tuple[tuple[str, int], ...]:
    """``["per_sample=1024", ...]`` (the command line) -> ``(("per_sample", 1024), ...)``."""
    pairs = []
    for item in items:
        method, _, batch = item.partition("=")
        if not batch.strip().isdigit():
            raise ConfigError(
                f"--max_batch_per_method takes method=batch pairs (per_sample=1024), got {item!r}"
            )
        pairs.append((method.strip(), int(batch)))
    return tuple(pairs)


def _format_max_batch(pairs: Iterable[tuple[str, int]]) -> list[str]:
    return [f"{method}={batch}" for method, batch in pairs]


def _ints(name: str, values: Iterable[Any]) -> tuple[int, ...]:
    try:
        return tuple(operator.index(v) for v in values)
    except TypeError:
        raise ConfigError(f"--{name} must be a list of integers, got {values!r}") from None


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What to sweep. Frozen (hashable); ``bpjax.cli.define_flags`` makes each field a flag."""

    sizes: tuple[int, ...] = setting(_BASE.sizes, "Layer widths n_0,...,n_L.")
    batches: tuple[int, ...] = setting(DEFAULT_BATCHES, "Batch sizes M, each timed per method.")
    methods: tuple[str, ...] = setting(METHODS, "JAX gradient methods to time.", choices=METHODS)
    platforms: tuple[str, ...] | None = setting(
        None, "JAX platforms to run on (default: every one JAX finds).", choices=PLATFORMS
    )
    repeats: int = setting(10, "Timed (interleaved) rounds per batch size, at least.")
    warmup: int = setting(2, "Untimed rounds first.")
    min_time_s: float = setting(
        1.0, "More rounds until this many seconds were timed per batch size (stable medians)."
    )
    dtype: str = setting(
        _BASE.dtype, "Compute dtype, as a training run's (bfloat16: mixed precision, float32"
        " params; float64 needs --jax_enable_x64).", choices=DTYPES,
    )
    matmul_precision: str = setting(
        _BASE.matmul_precision, "Matrix-product precision every timed function is compiled"
        " with (jax.default_matmul_precision).", choices=MATMUL_PRECISIONS,
    )
    seed: int = setting(_BASE.seed, "Seed of the params and the data.")
    lr: float = setting(_BASE.lr, "SGD learning rate of the step.")
    activation: str = setting(_BASE.activation, "Hidden activation σ.", choices=tuple(ACTIVATIONS))
    loss: str = setting(_BASE.loss, "Loss on the output.", choices=tuple(LOSSES))
    device_counts: tuple[int, ...] = setting(
        (1,), "Device counts D to run the JAX methods on, data parallel when D > 1 (e.g. 1,2,4,8;"
        " on a CPU host with XLA_FLAGS=--xla_force_host_platform_device_count=8)."
    )
    peers: tuple[str, ...] = setting(
        PEERS, "Host peers timed on CPU at D = 1 with relu + softmax cross-entropy (torch when"
        " importable); empty for none.", choices=PEERS
    )
    max_batch_per_method: tuple[tuple[str, int], ...] = dataclasses.field(
        default=(("per_sample", 1024),),
        metadata={"help": "method=largest_batch pairs (a dict in Python); larger batches are"
                  " recorded as skipped.", "parse": _parse_max_batch, "format": _format_max_batch},
    )  # fmt: skip
    isolate: str = setting(
        "auto", "One process per configuration: auto = where the backend reports peak memory.",
        choices=ISOLATE,
    )
    matmul_max_n: int = setting(8192, "Largest square matmul tried for the peak reference.")
    out_dir: str = setting("experiments/results", "Where write_results puts JSON, CSV and PNG.")

    def __post_init__(self) -> None:
        # Lists and dicts from a notebook become tuples, so the config stays hashable.
        for name in ("sizes", "batches", "device_counts"):
            object.__setattr__(self, name, _ints(name, getattr(self, name)))
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "peers", tuple(self.peers))
        if self.platforms is not None:
            object.__setattr__(self, "platforms", tuple(self.platforms))
        mb = self.max_batch_per_method
        items = mb.items() if isinstance(mb, Mapping) else mb
        object.__setattr__(self, "max_batch_per_method",
                           tuple(sorted((str(k), int(v)) for k, v in items)))  # fmt: skip
        self._check_axes()
        self._check_settings()

    def _check_axes(self) -> None:
        check_sizes(self.sizes)
        for name in ("batches", "device_counts"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"--{name} must name at least one value")
            for v in values:
                check_positive_int(name, v)
            if len(set(values)) != len(values):
                raise ConfigError(f"--{name} must not repeat, got {values}")
        check_choices("methods", self.methods, METHODS)
        if self.peers:
            check_choices("peers", self.peers, PEERS)
        if self.platforms is not None:
            check_choices("platforms", self.platforms, PLATFORMS)
        if self.max_batch_per_method:
            limited = tuple(m for m, _ in self.max_batch_per_method)
            check_choices("max_batch_per_method", limited, METHODS + PEERS)

    def _check_settings(self) -> None:
        for name in ("dtype", "matmul_precision", "activation", "loss", "isolate"):
            choices = self.__dataclass_fields__[name].metadata["choices"]
            check_choice(name, getattr(self, name), choices)
        check_positive_int("repeats", self.repeats)
        check_positive_int("matmul_max_n", self.matmul_max_n)
        check_positive_float("lr", self.lr)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"--warmup must be an integer >= 0, got {self.warmup!r}")
        if not math.isfinite(self.min_time_s) or self.min_time_s < 0:
            raise ConfigError(f"--min_time_s must be a finite number >= 0, got {self.min_time_s!r}")
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ConfigError("--dtype=float64 needs jax_enable_x64 (--jax_enable_x64)")

    param_dtype = Config.param_dtype  # a training run's: float32 under bfloat16 (master copy)

    def max_batch(self, method: str) -> int | None:
        """The largest batch ``method`` is timed at, or None for no limit."""
        return dict(self.max_batch_per_method).get(method)


# ---------------------------------------------------------------------------
# The sweep.


def _methods_for(config: SweepConfig, platform: str, num_devices: int) -> list[str]:
    """The JAX methods, and the peers that can run here: NumPy and PyTorch on the host
    (float32), PyTorch on a GPU (float32, or bfloat16 under autocast)."""
    relu_xent = config.activation == "relu" and config.loss == "softmax_cross_entropy"
    if not relu_xent or num_devices != 1:
        return list(config.methods)
    if platform == "cpu":
        ok = config.dtype != "bfloat16"
        peers = [p for p in config.peers if ok and (p != "torch" or torch_available())]
    else:
        cuda = platform == "gpu" and config.dtype in ("float32", "bfloat16")
        peers = [p for p in config.peers if p == "torch" and cuda and torch_cuda_available()]
    return [*config.methods, *peers]


def _devices(config: SweepConfig, platform: str) -> list[jax.Device]:
    devices = jax.devices(platform)
    if max(config.device_counts) > len(devices):
        hint = (
            f"; on a CPU host set XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{max(config.device_counts)} before JAX starts" if platform == "cpu" else ""
        )
        raise ConfigError(
            f"device_counts {config.device_counts} but JAX sees {len(devices)} "
            f"{platform} device(s){hint}"
        )
    return devices


def _wants_isolation(config: SweepConfig, device: jax.Device) -> bool:
    if config.isolate == "never":
        return False
    return config.isolate == "always" or peak_memory_bytes(device) is not None


def _progress(platform: str, n_dev: int, batch: int, group: Sequence[Measurement],
              seconds: float) -> str:  # fmt: skip
    done = "  ".join(f"{m.method} {m.timing.median_s * 1e3:.3f}ms" if m.timing
                     else f"{m.method} {m.status}" for m in group)  # fmt: skip
    return f"[{platform} x{n_dev}] batch {batch:5d}: {done}  ({seconds:.1f}s)"


def _sweep_platform(config: SweepConfig, platform: str, params: HostParams,
                    log: Callable[[str], None]) -> list[Row]:  # fmt: skip
    devices = _devices(config, platform)

    def peak() -> dict[str, Any]:
        with matmul_precision_scope(config.matmul_precision):  # in the step's products' dtype
            return measure_matmul_peak(devices[0], config.dtype, config.matmul_max_n,
                                       min_time_s=config.min_time_s)  # fmt: skip

    first = peak()
    log(f"[{platform}] {devices[0].device_kind}: square matmul n={first['n']} "
        f"{first['gflops']:.1f} GFLOP/s")  # fmt: skip
    isolate = _wants_isolation(config, devices[0])
    measured: list[Measurement] = []
    for n_dev, batch in itertools.product(config.device_counts, sorted(config.batches)):
        t0 = time.perf_counter()
        methods = _methods_for(config, platform, n_dev)
        if isolate:
            group = [_run_isolated(config, platform, batch, m, n_dev) for m in methods]
        else:
            group = measure_batch(config, platform, devices[:n_dev], batch, methods, params)
        measured += group
        log(_progress(platform, n_dev, batch, group, time.perf_counter() - t0))
    # Measured again at the end; the better of the two is the reference (a busy
    # machine can only lower a measurement, never raise it).
    again = peak()
    best = max(first, again, key=lambda p: p["gflops"])
    log(f"[{platform}] square matmul again: n={again['n']} {again['gflops']:.1f} GFLOP/s; "
        f"reference {best['gflops']:.1f} GFLOP/s")  # fmt: skip
    return derive(measured, sizes=config.sizes, dtype=config.dtype,
                  matmul_peak_gflops=best["gflops"])  # fmt: skip


def run_sweep(config: SweepConfig, log: Callable[[str], None] | None = print) -> list[Row]:
    """Runs the sweep; returns one :class:`~bpjax.bench.report.Row` per configuration."""
    log = log or (lambda _: None)
    params = host_params(config)
    rows: list[Row] = []
    for platform in config.platforms or available_platforms():
        rows += _sweep_platform(config, platform, params, log)
    return rows


# ---------------------------------------------------------------------------
# One configuration per process (true peak memory).


def jax_settings() -> dict[str, Any]:
    """The JAX settings that change the numbers and that a fresh process would not inherit."""
    return {
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
    }


def _run_isolated(config: SweepConfig, platform: str, batch: int, method: str,
                  num_devices: int = 1) -> Measurement:  # fmt: skip
    """Measures one (platform, batch, method, device count) in a fresh Python process."""
    settings = jax_settings()
    job = {"config": dataclasses.asdict(config), "jax": settings, "platform": platform,
           "batch": batch, "method": method, "num_devices": num_devices}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER], input=json.dumps(job), capture_output=True, text=True,
        check=False, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    worker = [json.loads(ln[4:]) for ln in lines if ln.startswith("JAX ")]
    if worker and worker[-1] != settings:
        raise RuntimeError(f"the sweep's worker ran with JAX settings {worker[-1]}, the sweep "
                           f"with {settings}")  # fmt: skip
    rows = [ln for ln in lines if ln.startswith("ROW ")]
    if proc.returncode == 0 and rows:
        measured = Measurement.from_dict(json.loads(rows[-1][4:]))
        if measured.matmul_precision != config.matmul_precision:
            raise RuntimeError(f"the sweep's worker compiled under matmul precision "
                               f"{measured.matmul_precision!r}, the sweep asked for "
                               f"{config.matmul_precision!r}")  # fmt: skip
        return measured
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    status = "oom" if is_out_of_memory(proc.stderr) else "error"
    return Measurement(platform=platform, device_kind="", method=method, batch=batch,
                       num_devices=num_devices, status=status, reason=tail)  # fmt: skip


def _worker_main() -> None:
    _work(json.loads(sys.stdin.read()))


def _work(job: Mapping[str, Any]) -> None:
    for name, value in job["jax"].items():
        jax.config.update(name, value)
    print("JAX " + json.dumps(jax_settings()), flush=True)
    config = SweepConfig(**{**job["config"], "isolate": "never"})
    devices = jax.devices(job["platform"])[: job["num_devices"]]
    (measured,) = measure_batch(config, job["platform"], devices, job["batch"], [job["method"]],
                                host_params(config), read_peak_memory=True)  # fmt: skip
    print("ROW " + json.dumps(measured.to_dict()), flush=True)
