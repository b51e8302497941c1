"""Batch-size sweep of one training step: every method, every platform, timed alike.

The library half of ``experiments/batch_sweep.py`` (which only parses flags):
importable from a notebook, no absl here.

    >>> from bpjax.sweep import SweepConfig, run_sweep, write_results, sweep_metadata
    >>> cfg = SweepConfig(batches=(1, 64, 4096), methods=("manual", "autodiff"))
    >>> rows = run_sweep(cfg)
    >>> write_results(rows, sweep_metadata(cfg), cfg.out_dir)

What one row measures: one SGD step (gradient by ``method`` + ``W -= lr * dW``,
lr 0.1) of the ``sizes`` network at one batch size, jitted with the params
donated, on ``jax.devices(platform)[0]``. Compile time is measured apart
(``lower().compile()``, exactly one XLA compilation per (method, batch), which
the sweep asserts); the step time is the median of interleaved repeats
(``bpjax.timing.compare_fns``: at each batch size the JAX methods take turns,
A B C A B C ..., so machine noise hits them alike). Beside it:

* ``gflops``: useful FLOPs / median time. A step's FLOPs are the matrix
  products of section 7: forward Z^l = W^l A^{l-1} (2 M n_l n_{l-1} each), dW^l
  for every layer, dA^{l-1} = (W^l)^T dZ^l for every layer but the first.
* ``roofline_s``: the time of just those matrix products at this batch,
  measured in the same run (``gemm_only_fn``); ``frac_of_roofline`` =
  roofline_s / median_s. The plot draws batch / roofline_s dashed.
* ``frac_of_matmul_peak``: gflops over the FLOP/s of XLA's own square matmul
  (the largest of 512², 1024², ... that runs in about a quarter second),
  measured in the same run on the same device.
* ``ratio_to_autodiff``: autodiff's median / this row's median (> 1: faster).
* ``peak_memory_bytes``: the allocator's peak where the backend reports one
  (GPU, TPU; the CPU client reports none). The peak never resets, so on such
  backends each configuration runs in its own subprocess (``isolate``);
  ``xla_temp_bytes`` is XLA's static scratch estimate, on every backend.

Scaling over devices (``device_counts``, e.g. ``(1, 2, 4, 8)``): with D > 1 the
same jitted step runs data parallel (``bpjax.parallel``): parameters replicated
over a mesh ``("data",)`` of the platform's first D devices, the batch split by
rows, XLA inserting the all-reduce of the section 6 sums. Its ``roofline_s`` is
then one device's share (batch / D) of the products: perfect scaling, no
communication. The peers run at D = 1 only; a batch that does not divide by D
is a ``skipped`` row. On a CPU host, simulate devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (they share the host's
cores, so this shows the plumbing and the all-reduce cost, not a speed-up).

Peers, on the host: ``numpy``, the first document's NumPy code (column
layout, ``e2 = probs - labels``, ...), and ``torch`` (autograd + SGD step)
when PyTorch is importable. A configuration that runs out of memory becomes
a row with ``status="oom"`` and the sweep goes on; one over
``max_batch_per_method`` becomes ``status="skipped"`` with the reason.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bpjax import parallel
from bpjax.files import write_atomic
from bpjax.methods import METHODS, grad_fn
from bpjax.network import init_params
from bpjax.timing import COMPILES, compare_fns, compile_fn, device_info, peak_memory_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure  # matplotlib is imported only to plot

PEERS = ("numpy", "torch")
PLATFORMS = ("cpu", "gpu", "tpu")
_ROOF = "_gemm_only"  # the roofline's entry among the timed functions
DEFAULT_BATCHES = tuple(2**k for k in range(14))  # 1, 2, 4, ..., 8192
DTYPES = ("float32", "float64", "bfloat16")

ROW_FIELDS = (
    "platform", "device_kind", "method", "batch", "num_devices", "status", "reason",
    "median_s", "p10_s", "p90_s", "min_s", "spread", "cpu_median_s", "repeats",
    "compile_s", "n_compiles", "n_traces",
    "samples_per_s", "flops_per_step", "gflops",
    "roofline_s", "roofline_samples_per_s", "frac_of_roofline",
    "matmul_peak_gflops", "frac_of_matmul_peak", "ratio_to_autodiff", "paired_ratio_to_autodiff",
    "peak_memory_bytes", "xla_temp_bytes", "sizes", "dtype",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What to sweep. Frozen (hashable); flag names in the script equal these.

    Attributes:
      sizes: layer widths ``(n_0, ..., n_L)``.
      batches: batch sizes M, each timed for every method.
      methods: JAX gradient methods (``bpjax.methods.METHODS``).
      platforms: JAX platforms to run on; ``None`` means every one JAX finds.
      repeats: at least this many timed (interleaved) rounds per batch size.
      warmup: untimed rounds first.
      min_time_s: more rounds until this much time was timed per batch size
        (small batches get hundreds of repeats, a stable median).
      dtype: params and data dtype (float64 needs ``jax_enable_x64``).
      seed: PRNG seed of params and data.
      lr: SGD learning rate of the step.
      activation, loss: of the network (the peers support relu + softmax
        cross-entropy only and are skipped otherwise).
      device_counts: numbers of devices D to run every JAX method on (data
        parallel when D > 1; see the module docstring).
      include_numpy, include_torch: time the host peers (torch when importable).
      max_batch_per_method: ``{method: largest batch}``; bigger batches are
        recorded as skipped (per-sample loops are slow at 8192).
      isolate: ``"auto"`` runs each configuration in its own subprocess on
        backends that report peak memory (a true per-configuration peak),
        ``"always"`` / ``"never"`` force it.
      matmul_max_n: largest square matmul tried for the peak reference.
      out_dir: where ``write_results`` puts JSON, CSV and PNG.
    """

    sizes: tuple[int, ...] = (784, 500, 10)
    batches: tuple[int, ...] = DEFAULT_BATCHES
    methods: tuple[str, ...] = METHODS
    platforms: tuple[str, ...] | None = None
    repeats: int = 10
    warmup: int = 2
    min_time_s: float = 1.0
    dtype: str = "float32"
    seed: int = 0
    lr: float = 0.1
    activation: str = "relu"
    loss: str = "softmax_cross_entropy"
    device_counts: tuple[int, ...] = (1,)
    include_numpy: bool = True
    include_torch: bool = True
    max_batch_per_method: tuple[tuple[str, int], ...] = (("per_sample", 1024),)
    isolate: str = "auto"
    matmul_max_n: int = 8192
    out_dir: str = "experiments/results"

    def __post_init__(self):
        # Accept lists and dicts from a notebook; store tuples (hashable).
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        object.__setattr__(self, "batches", tuple(int(b) for b in self.batches))
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "device_counts", tuple(int(d) for d in self.device_counts))
        if self.platforms is not None:
            object.__setattr__(self, "platforms", tuple(self.platforms))
        mb = self.max_batch_per_method
        items = mb.items() if isinstance(mb, Mapping) else mb
        object.__setattr__(
            self, "max_batch_per_method", tuple(sorted((str(k), int(v)) for k, v in items))
        )
        if len(self.sizes) < 2 or min(self.sizes) < 1:
            raise ValueError(f"sizes must be at least two positive widths, got {self.sizes}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batches must be positive integers, got {self.batches}")
        if len(set(self.batches)) != len(self.batches):
            raise ValueError(f"batches must not repeat, got {self.batches}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}: choose from {', '.join(METHODS)}")
        bad = [m for m, _ in self.max_batch_per_method if m not in METHODS + PEERS]
        if bad:
            raise ValueError(f"max_batch_per_method names unknown methods {bad}")
        if self.platforms is not None:
            bad = [p for p in self.platforms if p not in PLATFORMS]
            if bad or not self.platforms:
                raise ValueError(f"platforms must be some of {PLATFORMS}, got {self.platforms}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError("dtype float64 needs jax_enable_x64 (--jax_enable_x64)")
        if not self.device_counts or min(self.device_counts) < 1 or (
            len(set(self.device_counts)) != len(self.device_counts)
        ):
            raise ValueError(
                f"device_counts must be distinct positive integers, got {self.device_counts}"
            )
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats >= 1 and warmup >= 0, got {self.repeats}, {self.warmup}")
        if self.isolate not in ("auto", "always", "never"):
            raise ValueError(f"isolate must be auto, always or never, got {self.isolate!r}")

    def max_batch(self, method: str) -> int | None:
        return dict(self.max_batch_per_method).get(method)


# ---------------------------------------------------------------------------
# FLOPs, the GEMM-only roofline, the square-matmul reference.


def step_flops(sizes: Sequence[int], batch: int) -> int:
    """Useful FLOPs of one forward + backward pass (matrix products only).

    Forward Z^l = W^l A^{l-1}: 2 M n_l n_{l-1}; backward dW^l (7.3): the same;
    dA^{l-1} = (W^l)^T dZ^l (7.2) for l >= 2 only (nobody needs dC/dX).
    """
    pairs = list(itertools.pairwise(sizes))
    per_sample = sum(2 * 2 * i * o for i, o in pairs) + sum(2 * i * o for i, o in pairs[1:])
    return int(batch) * per_sample


def _dot_nt(a, b):
    """a @ b.T without materialising b.T (contract both minor dimensions)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())))


def gemm_only_fn(n_layers: int) -> Callable:
    """The matrix products of one ``manual`` step, and nothing else.

    Same shapes and orientations as ``formulas.manual_grad_and_output``
    (column layout, (W^l)^T materialised); operands are independent inputs,
    so the time is a pure GEMM lower bound for the step. Signature:
    ``(Ws, W_Ts, x, As, dZs) -> products`` with ``As[l]``, ``dZs[l]``: ``(n_l, M)``.
    """

    def products(Ws, W_Ts, x, As, dZs):
        out = [_dot_nt(Ws[0], x)]                                    # Z^1 = W^1 X
        out += [Ws[l] @ As[l - 1] for l in range(1, n_layers)]       # Z^l = W^l A^{l-1}
        out += [dZs[0] @ x]                                          # dW^1 = dZ^1 X^T
        out += [_dot_nt(dZs[l], As[l - 1]) for l in range(1, n_layers)]  # dW^l (7.3)
        out += [W_Ts[l - 1] @ dZs[l] for l in range(1, n_layers)]    # (W^l)^T dZ^l (7.2)
        return out

    return products


def gemm_only_args(sizes, batch, dtype, rng, device):
    """Random operands for ``gemm_only_fn`` at ``batch``, on ``device``."""
    n_layers = len(sizes) - 1
    Ws = [rng.standard_normal((sizes[l + 1], sizes[l])).astype(dtype) for l in range(n_layers)]
    W_Ts = [np.ascontiguousarray(W.T) for W in Ws[1:]]
    x = rng.standard_normal((batch, sizes[0])).astype(dtype)
    As = [rng.standard_normal((sizes[l], batch)).astype(dtype) for l in range(1, n_layers)]
    dZs = [rng.standard_normal((sizes[l + 1], batch)).astype(dtype) for l in range(n_layers)]
    return jax.device_put((Ws, W_Ts, x, As, dZs), device)


def measure_matmul_peak(
    device: jax.Device,
    dtype: str = "float32",
    max_n: int = 8192,
    target_s: float = 0.25,
    min_time_s: float = 1.0,
) -> dict[str, Any]:
    """FLOP/s of XLA's own square matmul on ``device``: the peak reference.

    Tries n = 512, 1024, ... (up to ``max_n``) while the previous size ran in
    under ``target_s``; returns the best ``{"n", "median_s", "gflops"}``.
    """
    rng = np.random.default_rng(0)
    best: dict[str, Any] = {"n": 0, "median_s": float("nan"), "gflops": 0.0}
    n = 512
    while n <= max_n:
        a, b = jax.device_put(
            (rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)),
            device,
        )
        t = compare_fns({"mm": (jax.jit(jnp.matmul), (a, b))}, repeats=5, min_time_s=min_time_s,
                        max_time_s=3 * min_time_s)["mm"]  # fmt: skip
        gflops = 2 * n**3 / t.median_s / 1e9
        if gflops > best["gflops"]:
            best = {"n": n, "median_s": t.median_s, "gflops": gflops}
        if t.median_s > target_s:
            break
        n *= 2
    return best


# ---------------------------------------------------------------------------
# The JAX step and the peers.


def make_step(method: str, *, activation: str, loss: str, lr: float) -> tuple[Callable, list[int]]:
    """A fresh jitted SGD step ``params -> params`` (donated) and its trace counter.

    ``traces[0]`` counts how often the body was traced: once per compile.
    """
    grads_of = grad_fn(method, activation=activation, loss=loss)
    traces = [0]

    def step(params, x, y):
        traces[0] += 1
        grads, _ = grads_of(params, x, y)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads)  # SGD, W -= lr dW

    return jax.jit(step, donate_argnums=0), traces


def numpy_grads(
    params: Sequence[tuple[np.ndarray, np.ndarray]], x: np.ndarray, labels: np.ndarray
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """The first document's NumPy backward (section 3), for any depth.

    Column layout as in the document: ``x: (n_0, n)``, ``labels: (n_L, n)``
    one-hot, ``params[l] = (W: (n_out, n_in), b: (n_out, 1))``; ReLU hidden
    layers, softmax output. Returns ``([(dw, db) per layer], probs)``.
    """
    hs = [x]                                                 # h0 = x
    for W, b in params[:-1]:
        hs.append(np.maximum(W @ hs[-1] + b, 0.0))           # h1 = relu(w1 x + b1)
    W, b = params[-1]
    logits = W @ hs[-1] + b                                  # h2 = w2 h1 + b2
    logits = logits - logits.max(axis=0, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=0, keepdims=True)                # probs = softmax(h2)
    n = probs.shape[1]
    e = probs - labels                                       # e2 = probs - labels
    grads: list[tuple[np.ndarray, np.ndarray]] = []
    for l in reversed(range(len(params))):
        dw = np.dot(e, hs[l].T) / n                          # dw2 = e2 h1^T / n
        db = np.mean(e, axis=1)[:, np.newaxis]               # db2 = mean(e2, axis=1)
        grads.append((dw, db))
        if l > 0:
            e = np.dot(params[l][0].T, e)                    # e1 = w2^T e2
            e[hs[l] <= 0.0] = 0.0                            # e1[h1 <= 0] = 0
    return grads[::-1], probs


def make_numpy_step(params, x_rows: np.ndarray, y_rows: np.ndarray, lr: float) -> Callable:
    """The NumPy baseline step, in place: ``() -> None``; ``step.params`` holds (W, b).

    Data are put in the document's column layout once, outside the timed step.
    """
    cols = [(np.array(p["W"]), np.array(p["b"])[:, None]) for p in params]
    x, labels = np.ascontiguousarray(x_rows.T), np.ascontiguousarray(y_rows.T)

    def step():
        grads, _ = numpy_grads(cols, x, labels)
        for (W, b), (dw, db) in zip(cols, grads, strict=True):
            W -= lr * dw
            b -= lr * db

    step.params = cols  # type: ignore[attr-defined]  # for inspection
    return step


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def make_torch_step(
    params, x_rows: np.ndarray, y_rows: np.ndarray, lr: float, device: str = "cpu"
) -> Callable:
    """PyTorch autograd peer: same network, ``torch.nn.functional``, SGD; ``() -> None``.

    ``step.params`` holds the ``(W, b)`` tensors it updates in place.
    """
    import torch
    from torch.nn import functional

    torch.set_num_threads(os.cpu_count() or 1)
    ws = [torch.tensor(np.array(p["W"]), device=device, requires_grad=True) for p in params]
    bs = [torch.tensor(np.array(p["b"]), device=device, requires_grad=True) for p in params]
    x = torch.tensor(x_rows, device=device)
    labels = torch.tensor(np.argmax(y_rows, axis=1), device=device)
    leaves = [t for pair in zip(ws, bs, strict=True) for t in pair]

    def step():
        a = x
        for l, (W, b) in enumerate(zip(ws, bs, strict=True)):
            a = functional.linear(a, W, b)
            if l < len(ws) - 1:
                a = functional.relu(a)
        loss = functional.cross_entropy(a, labels)
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            for p, g in zip(leaves, grads, strict=True):
                p.sub_(g, alpha=lr)
        if device != "cpu":
            torch.cuda.synchronize()

    step.params = list(zip(ws, bs, strict=True))  # type: ignore[attr-defined]  # for inspection
    return step


# ---------------------------------------------------------------------------
# The sweep.


def available_platforms() -> tuple[str, ...]:
    """The platforms JAX can run on here, in ``PLATFORMS`` order."""
    found = []
    for p in PLATFORMS:
        try:
            if jax.devices(p):
                found.append(p)
        except RuntimeError:
            pass
    return tuple(found)


def _is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text


def _data(config: SweepConfig, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([config.seed, batch])
    x = rng.standard_normal((batch, config.sizes[0])).astype(config.dtype)
    y = np.eye(config.sizes[-1], dtype=config.dtype)[rng.integers(0, config.sizes[-1], batch)]
    return x, y


def _host_params(config: SweepConfig) -> list[dict[str, np.ndarray]]:
    with jax.default_device(jax.devices("cpu")[0]):
        params = init_params(jax.random.PRNGKey(config.seed), config.sizes, config.dtype)
    return [{k: np.asarray(v) for k, v in p.items()} for p in params]


def _base_row(config, platform, device_kind, method, batch, num_devices=1) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
    row.update(platform=platform, device_kind=device_kind, method=method, batch=batch,
               num_devices=num_devices, sizes="-".join(map(str, config.sizes)),
               dtype=config.dtype, reason="")  # fmt: skip
    return row


def _placement(devices: Sequence[jax.Device]) -> Callable:
    """``place(params, x, y)`` on one device, or data parallel over several."""
    if len(devices) == 1:
        return lambda *tree: jax.device_put(tree, devices[0])
    mesh = parallel.make_data_mesh(devices)
    rep, rows = parallel.replicated(mesh), parallel.row_sharded(mesh)
    return lambda params, x, y: (jax.device_put(params, rep), *jax.device_put((x, y), rows))


def _time_group(
    config: SweepConfig,
    platform: str,
    devices: Sequence[jax.Device],
    batch: int,
    methods: Sequence[str],
    host_params,
) -> list[dict[str, Any]]:
    """Rows of ``methods`` (JAX ones and peers) at one batch size on ``devices``.

    JAX methods are compiled one by one (each failure becomes its row), then
    timed interleaved; peers are timed after them, each in its own block, so
    their thread pools (OpenBLAS, OpenMP) never spin while XLA is timed.
    """
    x, y = _data(config, batch)
    device, n_dev = devices[0], len(devices)
    kind = device.device_kind
    place = _placement(devices)
    rows, entries, traces, jax_rows = [], {}, {}, {}
    for method in methods:
        row = _base_row(config, platform, kind, method, batch, n_dev)
        rows.append(row)
        limit = config.max_batch(method)
        if limit is not None and batch > limit:
            row.update(status="skipped", reason=f"batch > max_batch_per_method[{method}]={limit}")
            continue
        if batch % n_dev:
            row.update(status="skipped", reason=f"batch does not divide over {n_dev} devices")
            continue
        try:
            if method in PEERS:
                make = make_numpy_step if method == "numpy" else make_torch_step
                entries[method] = (make(host_params, x, y, config.lr), ())
                row.update(compile_s=0.0, n_compiles=0, n_traces=0)
            else:
                step, traces[method] = make_step(
                    method, activation=config.activation, loss=config.loss, lr=config.lr
                )
                args = place(host_params, x, y)
                compiled, compile_s, n_compiles = compile_fn(step, *args)
                mem = compiled.memory_analysis()
                row.update(compile_s=compile_s, n_compiles=n_compiles, n_traces=traces[method][0],
                           xla_temp_bytes=getattr(mem, "temp_size_in_bytes", None))  # fmt: skip
                jax.block_until_ready(compiled(*args))  # probe: an OOM shows here
                args = place(host_params, x, y)  # the probe consumed the donated params
                entries[method] = (compiled, args)
                jax_rows[method] = row
        except Exception as err:  # any failure becomes the row; the sweep goes on
            first_line = (str(err).splitlines() or [""])[0][:300]
            row.update(status="oom" if _is_oom(err) else "error",
                       reason=f"{type(err).__name__}: {first_line}")  # fmt: skip
            entries.pop(method, None)
            jax_rows.pop(method, None)

    # The GEMM-only roofline (one device's share of the batch) takes its turn among
    # the JAX methods.
    rng = np.random.default_rng([config.seed, batch, 1])
    share = max(batch // n_dev, 1)
    roof_args = gemm_only_args(config.sizes, share, config.dtype, rng, device)
    roof_fn, _, _ = compile_fn(jax.jit(gemm_only_fn(len(config.sizes) - 1)), *roof_args)
    jax_entries = {m: e for m, e in entries.items() if m not in PEERS}
    jax_entries[_ROOF] = (roof_fn, roof_args)
    before = COMPILES.count
    timings = compare_fns(jax_entries, repeats=config.repeats, warmup=config.warmup,
                          carry=set(jax_entries) - {_ROOF},
                          min_time_s=config.min_time_s)  # fmt: skip
    recompiles = COMPILES.count - before
    if recompiles:
        raise RuntimeError(
            f"{recompiles} XLA compilation(s) while timing batch {batch} on {n_dev} device(s)"
        )
    roofline_s = timings.pop(_ROOF).median_s
    # Round r timed every JAX method once, back to back: the median of the per-round
    # ratios cancels noise that drifts slower than a round (the shared CPU's load),
    # which the ratio of two medians, each taken over the whole run, does not.
    paired = {}
    if "autodiff" in timings:
        auto = np.asarray(timings["autodiff"].times_s)
        paired = {m: float(np.median(auto / np.asarray(t.times_s))) for m, t in timings.items()}
    for method in (m for m in entries if m in PEERS):
        timings.update(compare_fns({method: entries[method]}, repeats=config.repeats,
                                   warmup=config.warmup,
                                   min_time_s=config.min_time_s / 4))  # fmt: skip

    for row in rows:
        row["roofline_s"] = roofline_s
        t = timings.get(row["method"])
        if t is None:
            continue
        row.update({k: v for k, v in t.as_dict().items() if k != "compile_s"}, status="ok")
        if row["method"] in paired:
            row["paired_ratio_to_autodiff"] = paired[row["method"]]
    for method, row in jax_rows.items():
        if row["n_compiles"] != 1 or traces[method][0] != 1:
            raise RuntimeError(
                f"{method} at batch {batch}: {row['n_compiles']} compilations and "
                f"{traces[method][0]} traces, expected exactly 1 each"
            )
    return rows


def _finish_rows(rows: list[dict[str, Any]], config, peak_gflops) -> None:
    auto = {(r["batch"], r["num_devices"]): r["median_s"] for r in rows
            if r["method"] == "autodiff" and r["status"] == "ok"}  # fmt: skip
    for row in rows:
        flops = step_flops(config.sizes, row["batch"])
        roofline_s = row["roofline_s"]
        row.update(flops_per_step=flops, matmul_peak_gflops=peak_gflops,
                   roofline_samples_per_s=row["batch"] / roofline_s if roofline_s else None)
        key = (row["batch"], row["num_devices"])
        if row["status"] != "ok":
            continue
        med = row["median_s"]
        row.update(samples_per_s=row["batch"] / med, gflops=flops / med / 1e9,
                   frac_of_roofline=roofline_s / med if roofline_s else None,
                   frac_of_matmul_peak=flops / med / 1e9 / peak_gflops)  # fmt: skip
        if key in auto:
            row["ratio_to_autodiff"] = auto[key] / med


def _methods_for(config: SweepConfig, platform: str, num_devices: int) -> list[str]:
    methods = list(config.methods)
    relu_xent = config.activation == "relu" and config.loss == "softmax_cross_entropy"
    if platform == "cpu" and relu_xent and num_devices == 1 and config.dtype != "bfloat16":
        if config.include_numpy:
            methods.append("numpy")
        if config.include_torch and torch_available():
            methods.append("torch")
    return methods


def _wants_isolation(config: SweepConfig, device: jax.Device) -> bool:
    if config.isolate == "never":
        return False
    return config.isolate == "always" or peak_memory_bytes(device) is not None


def run_sweep(config: SweepConfig, log: Callable[[str], None] | None = print) -> list[dict]:
    """Runs the sweep; returns one row (a flat dict, ``ROW_FIELDS``) per configuration."""
    log = log or (lambda _: None)
    platforms = config.platforms or available_platforms()
    host_params = _host_params(config)
    all_rows: list[dict[str, Any]] = []
    for platform in platforms:
        all_devices = jax.devices(platform)
        if max(config.device_counts) > len(all_devices):
            hint = (
                f"; on a CPU host set XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{max(config.device_counts)} before JAX starts" if platform == "cpu" else ""
            )
            raise ValueError(
                f"device_counts {config.device_counts} but JAX sees {len(all_devices)} "
                f"{platform} device(s){hint}"
            )
        device = all_devices[0]
        peaks = [measure_matmul_peak(device, config.dtype, config.matmul_max_n,
                                     min_time_s=config.min_time_s)]  # fmt: skip
        log(f"[{platform}] {device.device_kind}: square matmul n={peaks[0]['n']} "
            f"{peaks[0]['gflops']:.1f} GFLOP/s")  # fmt: skip
        isolate = _wants_isolation(config, device)
        rows_here: list[dict[str, Any]] = []
        for n_dev, batch in itertools.product(config.device_counts, sorted(config.batches)):
            methods = _methods_for(config, platform, n_dev)
            t0 = time.perf_counter()
            if isolate:
                rows = [_run_isolated(config, platform, batch, m, n_dev) for m in methods]
            else:
                rows = _time_group(config, platform, all_devices[:n_dev], batch, methods,
                                   host_params)  # fmt: skip
            rows_here.extend(rows)
            log(f"[{platform} x{n_dev}] batch {batch:5d}: " + "  ".join(
                f"{r['method']} {r['median_s'] * 1e3:.3f}ms" if r["status"] == "ok"
                else f"{r['method']} {r['status']}" for r in rows
            ) + f"  ({time.perf_counter() - t0:.1f}s)")  # fmt: skip
        # Measured again at the end; the better of the two is the reference (a busy
        # machine can only lower a measurement, never raise it).
        peaks.append(measure_matmul_peak(device, config.dtype, config.matmul_max_n,
                                         min_time_s=config.min_time_s))  # fmt: skip
        peak = max(peaks, key=lambda p: p["gflops"])
        log(f"[{platform}] square matmul again: n={peaks[1]['n']} {peaks[1]['gflops']:.1f} "
            f"GFLOP/s; reference {peak['gflops']:.1f} GFLOP/s")  # fmt: skip
        _finish_rows(rows_here, config, peak["gflops"])
        all_rows.extend(rows_here)
    return all_rows


# ---------------------------------------------------------------------------
# One configuration per process (true peak memory).


def _run_isolated(
    config: SweepConfig, platform: str, batch: int, method: str, num_devices: int = 1
) -> dict[str, Any]:
    """Runs one (platform, batch, method, device count) in a fresh Python process."""
    job = {"config": dataclasses.asdict(config), "platform": platform, "batch": batch,
           "method": method, "num_devices": num_devices}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", "from bpjax.sweep import _worker_main; _worker_main()"],
        input=json.dumps(job), capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        row = _base_row(config, platform, "", method, batch, num_devices)
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        row.update(status="oom" if "RESOURCE_EXHAUSTED" in proc.stderr else "error", reason=tail)
        return row
    return json.loads(lines[-1][4:])


def _worker_main() -> None:
    job = json.loads(sys.stdin.read())
    fields = job["config"]
    fields["isolate"] = "never"
    fields["max_batch_per_method"] = [tuple(kv) for kv in fields["max_batch_per_method"]]
    config = SweepConfig(**fields)
    devices = jax.devices(job["platform"])[: job["num_devices"]]
    rows = _time_group(config, job["platform"], devices, job["batch"], [job["method"]],
                       _host_params(config))  # fmt: skip
    rows[0]["peak_memory_bytes"] = peak_memory_bytes(devices[0])
    print("ROW " + json.dumps(rows[0]), flush=True)


# ---------------------------------------------------------------------------
# Output: table, JSON, CSV, PNG.


def sweep_metadata(config: SweepConfig) -> dict[str, Any]:
    """Everything needed to read the numbers later: config, devices, versions, threads."""
    platforms = config.platforms or available_platforms()
    meta: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "devices": {p: device_info(jax.devices(p)[0]) for p in platforms},
        "argv": sys.argv,
    }
    if torch_available():
        import torch

        meta["torch_version"] = torch.__version__
        meta["torch_num_threads"] = torch.get_num_threads()
    return meta


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def format_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """A fixed-width text table of the rows (what the script prints)."""
    head = (f"{'platform':8} {'method':13} {'batch':>5} {'dev':>3} {'status':7} {'step ms':>9} "
            f"{'spread':>6} "
            f"{'compile s':>9} {'samples/s':>10} {'GFLOP/s':>8} {'%roof':>6} {'%mm':>5} "
            f"{'vs auto':>7}")  # fmt: skip
    out = [head, "-" * len(head)]
    for r in rows:
        pct = lambda v: None if v is None else 100 * v  # noqa: E731
        ms = None if r.get("median_s") is None else 1e3 * r["median_s"]
        out.append(
            f"{r['platform']:8} {r['method']:13} {r['batch']:5d} {r.get('num_devices') or 1:3d} "
            f"{r['status']:7} "
            f"{_fmt(ms, '9.3f')} {_fmt(r.get('spread'), '6.2f')} "
            f"{_fmt(r.get('compile_s'), '9.2f')} "
            f"{_fmt(r.get('samples_per_s'), '10.0f')} {_fmt(r.get('gflops'), '8.1f')} "
            f"{_fmt(pct(r.get('frac_of_roofline')), '6.1f')} "
            f"{_fmt(pct(r.get('frac_of_matmul_peak')), '5.1f')} "
            f"{_fmt(r.get('ratio_to_autodiff'), '7.3f')}"
        )
    return "\n".join(out)


def _floor_line(platform: str, name: str, ratios: list[tuple[int, float]], floor: float,
                unit: str = "x") -> str:  # fmt: skip
    if not ratios:
        return f"[{platform}] {name}: no data"
    batch, value = min(ratios, key=lambda t: t[1])
    verdict = "met" if value >= floor else "MISSED"
    below = [f"{b}: {v:.2f}{unit}" for b, v in ratios if v < floor]
    return (f"[{platform}] {name}: {verdict} (worst {value:.2f}{unit} at batch {batch}"
            + (f"; below at {', '.join(below)}" if below else "") + ")")  # fmt: skip


def floor_report(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per benchmark floor of issue 4, per platform, with the numbers."""
    lines = []
    for platform in sorted({r["platform"] for r in rows}):
        here = [r for r in rows if r["platform"] == platform and r["status"] == "ok"]
        ok = {(r["method"], r["batch"]): r for r in here if (r.get("num_devices") or 1) == 1}
        manual = {b: r for (m, b), r in ok.items() if m == "manual"}

        lines.append(_floor_line(platform, "manual >= 1.00x autodiff, every batch",
                          [(b, r["ratio_to_autodiff"]) for b, r in sorted(manual.items())
                           if r.get("ratio_to_autodiff")], 1.0))  # fmt: skip
        lines.append(_floor_line(platform, "manual >= 1.00x autodiff, every batch, paired "
                                 "(median of per-round ratios)",
                          [(b, r["paired_ratio_to_autodiff"]) for b, r in sorted(manual.items())
                           if r.get("paired_ratio_to_autodiff")], 1.0))  # fmt: skip
        torch_rows = {b: r for (m, b), r in ok.items() if m == "torch"}
        if torch_rows:
            lines.append(_floor_line(platform, "manual >= 2x torch, batch >= 8",
                              [(b, torch_rows[b]["median_s"] / r["median_s"])
                               for b, r in sorted(manual.items())
                               if b >= 8 and b in torch_rows], 2.0))  # fmt: skip
        lines.append(_floor_line(platform, "manual >= 85% of square-matmul FLOP/s, batch >= 512",
                          [(b, 100 * r["frac_of_matmul_peak"]) for b, r in sorted(manual.items())
                           if b >= 512], 85.0, "%"))  # fmt: skip
        vmap = [(b, ok[("manual_vmap", b)]["median_s"] / r["median_s"])
                for b, r in sorted(manual.items()) if ("manual_vmap", b) in ok]  # fmt: skip
        if vmap:
            lines.append(f"[{platform}] manual_vmap step time / manual: "
                         + ", ".join(f"{b}: {v:.2f}x" for b, v in vmap))  # fmt: skip
        for n_dev in sorted({r["num_devices"] for r in here} - {1}):
            scale = [(r["batch"], r["samples_per_s"] / manual[r["batch"]]["samples_per_s"])
                     for r in here if r["method"] == "manual" and r["num_devices"] == n_dev
                     and r["batch"] in manual]  # fmt: skip
            lines.append(f"[{platform}] manual on {n_dev} devices, samples/s vs 1 device: "
                         + ", ".join(f"{b}: {v:.2f}x" for b, v in sorted(scale)))  # fmt: skip
    return lines


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v


def write_results(
    rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    out_dir: str,
    name: str = "batch_sweep",
) -> dict[str, str]:
    """Writes ``{name}.json`` (meta + rows), ``{name}.csv`` and ``{name}.png``, atomically."""
    paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "csv", "png")}
    clean = [{k: _jsonable(r.get(k)) for k in ROW_FIELDS} for r in rows]
    payload = {"meta": meta, "rows": clean}
    write_atomic(paths["json"], json.dumps(payload, indent=1, default=str) + "\n")
    buf = io.StringIO()
    buf.write("".join(f"# {k}: {json.dumps(v, default=str)}\n" for k, v in _flat_meta(meta)))
    writer = csv.DictWriter(buf, fieldnames=ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(clean)
    write_atomic(paths["csv"], buf.getvalue())
    plot_sweep(rows, paths["png"], title=_plot_title(meta))
    return paths


def _flat_meta(meta: Mapping[str, Any]):
    for k, v in meta.items():
        if k == "devices":
            for p, info in v.items():
                yield f"device[{p}]", info
        else:
            yield k, v


def _plot_title(meta: Mapping[str, Any]) -> str:
    devices = meta.get("devices", {})
    kinds = ", ".join(f"{p}: {d.get('device_kind')} {d.get('processor', '')}"
                      for p, d in devices.items())  # fmt: skip
    some = next(iter(devices.values()), {})
    sizes = "-".join(map(str, meta.get("config", {}).get("sizes", ())))
    return f"one SGD step, {sizes} MLP ({kinds}; jax {some.get('jax_version', '?')})"


def sweep_figure(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """samples/s against batch, log-log: one line per (method, platform), roofline dashed.

    A bare ``matplotlib.figure.Figure`` (no pyplot): it draws without touching
    the notebook's or the user's matplotlib backend; a notebook displays it with
    ``display(fig)``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6))
    ax = fig.subplots()
    groups: dict[tuple[str, int, str], list] = {}
    for r in rows:
        if r.get("status") == "ok":
            point = (r["batch"], r["samples_per_s"])
            key = (r["platform"], r.get("num_devices") or 1, r["method"])
            groups.setdefault(key, []).append(point)
    multi = len({k[1] for k in groups}) > 1
    where = lambda p, d: f"{p} x{d}" if multi else p  # noqa: E731
    for (platform, n_dev, method), pts in sorted(groups.items()):
        pts.sort()
        batches, speeds = zip(*pts, strict=True)
        ax.plot(batches, speeds, marker="o", ms=3, label=f"{method} ({where(platform, n_dev)})")
    for platform, n_dev in sorted({(r["platform"], r.get("num_devices") or 1) for r in rows}):
        roof = sorted({(r["batch"], r["roofline_samples_per_s"]) for r in rows
                       if (r["platform"], r.get("num_devices") or 1) == (platform, n_dev)
                       and r.get("roofline_samples_per_s")})  # fmt: skip
        if roof and (n_dev == 1 or multi):
            batches, speeds = zip(*roof, strict=True)
            ax.plot(batches, speeds, "--", lw=1, color="k" if n_dev == 1 else "0.6",
                    label=f"GEMM-only roofline ({where(platform, n_dev)})")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size M")
    ax.set_ylabel("samples / s (one training step)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return fig


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str, title: str = "") -> None:
    """``sweep_figure`` saved as a PNG at ``path``, atomically."""
    fig = sweep_figure(rows, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_atomic(path, buf.getvalue())


__all__ = [
    "DEFAULT_BATCHES",
    "PEERS",
    "ROW_FIELDS",
    "SweepConfig",
    "available_platforms",
    "floor_report",
    "format_table",
    "gemm_only_args",
    "gemm_only_fn",
    "make_numpy_step",
    "make_step",
    "make_torch_step",
    "measure_matmul_peak",
    "numpy_grads",
    "plot_sweep",
    "run_sweep",
    "step_flops",
    "sweep_figure",
    "sweep_metadata",
    "write_results",
]
