"""One batch size of the sweep: compile entries -> time entries -> measurements.

:func:`measure_batch` is the sweep's unit of work, run in the sweep's process or
in a fresh one (``bpjax.bench.sweep``'s isolation). For each method it first
compiles the step ahead of time (``steps.sgd_step``; a method over its batch
limit, a batch that does not divide over the devices, an OOM or any error
becomes that method's record, and the sweep goes on). Then it times the JAX
steps and the GEMM-only roofline interleaved in one ``timing.compare_fns``
(A B C, C A B, ...: machine noise hits them alike; an XLA compilation while
timing is an error, and so is a step compiled or traced other than once), and
the host peers after them, each apart, so their thread pools (OpenBLAS,
OpenMP) never spin while XLA is timed. Last, one ``report.Measurement`` per
method, built once from what was measured.

Everything is traced and compiled under the sweep's ``matmul_precision``
(``timing.matmul_precision_scope``), and each record says which precision was in
effect. A bfloat16 sweep is the mixed precision of ``bpjax.methods``: float32
params and update, x in bfloat16, y in float32, the step's products (and the
roofline's) in bfloat16.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from bpjax import parallel
from bpjax.bench.peers import PEER_STEPS, PEERS, HostParams
from bpjax.bench.report import Measurement
from bpjax.bench.steps import gemm_only_args, gemm_only_fn, random_batch, sgd_state, sgd_step
from bpjax.bench.timing import (
    COMPILES,
    Timing,
    compare_fns,
    compile_fn,
    matmul_precision_scope,
    peak_memory_bytes,
)
from bpjax.errors import first_line, is_out_of_memory
from bpjax.network import Net, init_params
from bpjax.step import compiler_options

if TYPE_CHECKING:
    from bpjax.bench.sweep_config import SweepConfig

_ROOF = "_gemm_only"  # the roofline's entry among the timed functions


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A method at one batch size, ready to time (``fn``), or why not (``status``)."""

    status: str = "ok"
    reason: str = ""
    fn: Callable | None = None
    args: tuple = ()
    compile_s: float | None = None
    n_compiles: int | None = None
    traces: Sequence[int] = ()  # the step's live trace counter
    xla_temp_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class _Timed:
    timings: dict[str, Timing]
    roofline_s: float
    paired: dict[str, float]  # median of per-round autodiff / method ratios


def _data(config: SweepConfig, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([config.seed, batch])  # y float32 under bfloat16:
    return random_batch(config.sizes, batch, rng, config.dtype, config.param_dtype)


def host_params(config: SweepConfig) -> HostParams:
    """The initial parameters of ``config`` (float32 under bfloat16), on the host.

    Each configuration places a copy.
    """
    with jax.default_device(jax.devices("cpu")[0]):
        params = init_params(jax.random.key(config.seed), config.sizes, config.param_dtype)
    return [{k: np.asarray(v) for k, v in p.items()} for p in params]


def _placement(devices: Sequence[jax.Device]) -> Callable:
    """``place(state, x, y)`` on one device, or data parallel over several."""
    if len(devices) == 1:
        return lambda *tree: jax.device_put(tree, devices[0])
    mesh = parallel.make_data_mesh(devices)
    rep, rows = parallel.replicated(mesh), parallel.row_sharded(mesh)
    return lambda state, x, y: (jax.device_put(state, rep), *jax.device_put((x, y), rows))


def _compile_step(config: SweepConfig, method: str, devices: Sequence[jax.Device],
                  params: HostParams, x: np.ndarray, y: np.ndarray) -> _Entry:  # fmt: skip
    place = _placement(devices)
    options = compiler_options(devices[0].platform, x.shape[0] // len(devices))
    net = Net.mlp(config.sizes, config.activation, config.loss)
    step, traces = sgd_step(net, method, lr=config.lr, compute_dtype=config.dtype,
                            compiler_options=options)  # fmt: skip
    args = place(sgd_state(params), x, y)
    compiled, compile_s, n_compiles = compile_fn(step, *args)
    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
    jax.block_until_ready(compiled(*args))  # probe: an OOM shows here
    args = place(sgd_state(params), x, y)  # the probe consumed the donated state
    return _Entry(fn=compiled, args=args, compile_s=compile_s, n_compiles=n_compiles,
                  traces=traces, xla_temp_bytes=temp)  # fmt: skip


def _peer_step(config: SweepConfig, method: str, device: jax.Device, params: HostParams,
               x: np.ndarray, y: np.ndarray) -> Callable[[], None]:  # fmt: skip
    """A peer's step: on the host, or (PyTorch) on the CUDA device the JAX methods use."""
    if method == "torch" and device.platform == "gpu":
        return PEER_STEPS["torch"](params, x, y, config.lr, device="cuda", dtype=config.dtype,
                                   matmul_precision=config.matmul_precision)  # fmt: skip
    return PEER_STEPS[method](params, x, y, config.lr)


def _compile_entry(config: SweepConfig, method: str, devices: Sequence[jax.Device],
                   params: HostParams, x: np.ndarray, y: np.ndarray) -> _Entry:  # fmt: skip
    """The method's timed function at this batch; a limit or a failure becomes the entry."""
    batch, limit = x.shape[0], config.max_batch(method)
    if limit is not None and batch > limit:
        return _Entry("skipped", f"batch > max_batch_per_method[{method}]={limit}")
    if batch % len(devices):
        return _Entry("skipped", f"batch does not divide over {len(devices)} devices")
    try:
        if method in PEERS:  # not JAX: nothing to compile
            return _Entry(fn=_peer_step(config, method, devices[0], params, x, y),
                          compile_s=0.0, n_compiles=0, traces=(0,))  # fmt: skip
        return _compile_step(config, method, devices, params, x, y)
    except Exception as err:  # any failure becomes the entry; the sweep goes on
        status = "oom" if is_out_of_memory(err) else "error"
        return _Entry(status, f"{type(err).__name__}: {first_line(err, 300)}")


def _roofline_entry(config: SweepConfig, devices: Sequence[jax.Device],
                    batch: int) -> tuple[Callable, tuple]:  # fmt: skip
    """The GEMM-only products of one device's share of the batch, compiled, and their operands."""
    rng = np.random.default_rng([config.seed, batch, 1])
    args = gemm_only_args(config.sizes, max(batch // len(devices), 1), config.dtype, rng,
                          devices[0])  # fmt: skip
    compiled, _, _ = compile_fn(jax.jit(gemm_only_fn(len(config.sizes) - 1)), *args)
    return compiled, args


def _time_entries(config: SweepConfig, devices: Sequence[jax.Device], batch: int,
                  entries: Mapping[str, _Entry]) -> _Timed:  # fmt: skip
    """JAX steps and the roofline interleaved, then each peer apart."""
    ready = {m: e for m, e in entries.items() if e.status == "ok"}
    timed = {m: (e.fn, e.args) for m, e in ready.items() if m not in PEERS}
    timed[_ROOF] = _roofline_entry(config, devices, batch)  # takes its turn among them
    before = COMPILES.count
    timings = compare_fns(timed, repeats=config.repeats, warmup=config.warmup,
                          carry=set(timed) - {_ROOF}, min_time_s=config.min_time_s)  # fmt: skip
    if COMPILES.count - before:
        raise RuntimeError(f"{COMPILES.count - before} XLA compilation(s) while timing batch "
                           f"{batch} on {len(devices)} device(s)")  # fmt: skip
    roofline_s = timings.pop(_ROOF).median_s
    # Round r timed every JAX method once, back to back: the median of the per-round
    # ratios cancels noise that drifts slower than a round (the shared CPU's load),
    # which the ratio of two medians, each taken over the whole run, does not.
    paired = {}
    if "autodiff" in timings:
        auto = np.asarray(timings["autodiff"].times_s)
        paired = {m: float(np.median(auto / np.asarray(t.times_s))) for m, t in timings.items()}
    for m in (m for m in ready if m in PEERS):
        timings |= compare_fns({m: (ready[m].fn, ())}, repeats=config.repeats,
                               warmup=config.warmup, min_time_s=config.min_time_s / 4)  # fmt: skip
    for m, e in ready.items():
        if m not in PEERS and (e.n_compiles, e.traces[0]) != (1, 1):
            raise RuntimeError(f"{m} at batch {batch}: {e.n_compiles} compilations and "
                               f"{e.traces[0]} traces, expected exactly 1 each")  # fmt: skip
    return _Timed(timings, roofline_s, paired)


def measure_batch(
    config: SweepConfig,
    platform: str,
    devices: Sequence[jax.Device],
    batch: int,
    methods: Sequence[str],
    params: HostParams,
    *,
    read_peak_memory: bool = False,
) -> list[Measurement]:
    """One record per method (JAX ones and peers) at ``batch`` on ``devices``.

    ``params``: :func:`host_params`; ``read_peak_memory``: record the device
    allocator's peak (true per configuration only in a process of its own).
    """
    x, y = _data(config, batch)
    with matmul_precision_scope(config.matmul_precision) as precision:
        entries = {m: _compile_entry(config, m, devices, params, x, y) for m in methods}
        timed = _time_entries(config, devices, batch, entries)
    peak = peak_memory_bytes(devices[0]) if read_peak_memory else None
    return [
        Measurement(
            platform=platform, device_kind=devices[0].device_kind, method=m, batch=batch,
            num_devices=len(devices), status=e.status, reason=e.reason,
            timing=timed.timings.get(m), compile_s=e.compile_s, n_compiles=e.n_compiles,
            n_traces=e.traces[0] if e.traces else None, xla_temp_bytes=e.xla_temp_bytes,
            peak_memory_bytes=peak, roofline_s=timed.roofline_s,
            paired_ratio_to_autodiff=timed.paired.get(m), matmul_precision=precision,
        )
        for m, e in entries.items()
    ]
