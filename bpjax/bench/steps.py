"""What the benchmarks time: the training step, its FLOPs and its floors.

* :func:`sgd_step`: one SGD step of a gradient method, jitted with the state
  donated. It *is* the training loop's step, ``bpjax.training.train_step`` with
  ``optax.sgd(lr)`` over a ``TrainState`` (gradient, update ``W -= lr dW``, the
  batch's loss sum and correct count), not a second hand-written update beside
  it: a number measured here is the cost of a step that ``train()`` runs, and a
  change to the training step changes the benchmark with it. Under
  ``compute_dtype="bfloat16"`` it is the mixed-precision step of
  ``bpjax.methods``: float32 params and update, bfloat16 products.
* :func:`step_flops`: the useful FLOPs of a step, the matrix products of
  section 7: forward Z^l = W^l A^{l-1} (2 M n_l n_{l-1} each), dW^l for every
  layer, dA^{l-1} = (W^l)^T dZ^l for every layer but the first.
* :func:`gemm_only_fn` / :func:`gemm_only_args`: just those products at a batch
  size, operands independent: the GEMM-only roofline a step cannot beat.
* :func:`measure_matmul_peak`: FLOP/s of XLA's own square matmul on a device,
  the peak reference a step's FLOP/s is compared with.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from bpjax.bench.timing import compare_fns
from bpjax.methods import grad_fn
from bpjax.network import Net, Params
from bpjax.training import TrainState, train_step

Array = jax.Array


def random_batch(
    sizes: Sequence[int], n: int, rng: np.random.Generator, x_dtype: Any = np.float32,
    y_dtype: Any = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` standard-normal inputs ``(n, n_0)`` and one-hot random classes ``(n, n_L)`` (host)."""
    x = rng.standard_normal((n, sizes[0])).astype(x_dtype)
    y = np.eye(sizes[-1], dtype=y_dtype)[rng.integers(0, sizes[-1], n)]
    return x, y


def sgd_state(params: Params) -> TrainState:
    """The step's state before the first step: ``params``, SGD's (empty) state, step 0."""
    return TrainState(params, optax.sgd(1.0).init(params), np.zeros((), np.int32))  # lr: unused


def sgd_step(
    net: Net, method: str, *, lr: float, compute_dtype: str | None = None,
    compiler_options: dict[str, str] | None = None,
) -> tuple[Callable, list[int]]:
    """A fresh jitted step ``(state, x, y) -> (state, metrics)`` (state donated), and its counter.

    ``traces[0]`` counts how often the body was traced: once per compilation.
    The gradient methods take no PRNG key; ``train_step``'s is ``None``.
    ``compute_dtype``: ``grad_fn``'s (bfloat16: mixed precision, float32 state).
    ``compiler_options``: what the training loop compiles its step with at this
    batch (``bpjax.step.compiler_options``), so the step timed is the one trained.
    """
    grads_of = grad_fn(net, method, compute_dtype=compute_dtype)
    step_fn = functools.partial(
        train_step,
        grad=lambda params, x, y, key, feedback=(): grads_of(params, x, y, feedback),
        optimizer=optax.sgd(lr),
        loss=net.loss,
    )
    traces = [0]

    def step(state: TrainState, x: Array, y: Array) -> tuple[TrainState, dict[str, Array]]:
        traces[0] += 1
        return step_fn(state, x, y, None)

    return jax.jit(step, donate_argnums=0, compiler_options=compiler_options), traces


def step_flops(sizes: Sequence[int], batch: int) -> int:
    """Useful FLOPs of one forward + backward pass (matrix products only).

    Forward Z^l = W^l A^{l-1}: 2 M n_l n_{l-1}; backward dW^l (7.3): the same;
    dA^{l-1} = (W^l)^T dZ^l (7.2) for l >= 2 only (nobody needs dC/dX).
    """
    pairs = list(itertools.pairwise(sizes))
    per_sample = sum(2 * 2 * i * o for i, o in pairs) + sum(2 * i * o for i, o in pairs[1:])
    return int(batch) * per_sample


def _dot_nt(a: Array, b: Array) -> Array:
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


def gemm_only_args(
    sizes: Sequence[int], batch: int, dtype: str, rng: np.random.Generator, device: jax.Device
) -> tuple[Any, ...]:
    """Random operands ``(Ws, W_Ts, x, As, dZs)`` of ``gemm_only_fn`` at ``batch`` on ``device``."""
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
