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
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from bpjax.bench.measure import host_params, measure_batch
from bpjax.bench.peers import HostParams, torch_available, torch_cuda_available
from bpjax.bench.report import Measurement, Row, derive
from bpjax.bench.steps import measure_matmul_peak
from bpjax.bench.sweep_config import SweepConfig
from bpjax.bench.timing import available_platforms, matmul_precision_scope, peak_memory_bytes
from bpjax.config import (
    ConfigError,
)
from bpjax.errors import is_out_of_memory

_WORKER = "from bpjax.bench.sweep import _worker_main; _worker_main()"


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
