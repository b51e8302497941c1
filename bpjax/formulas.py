r"""Backpropagation written out by hand: the documents' formulas, no autodiff.

Dimension legend (second document, section 1): L layers; N_l units in layer
l; M samples in the batch; W^l: (N_l, N_{l-1}); b^l: (N_l,).

Layout. Data arrive one sample per *row* (x: (M, N_0), y: (M, N_L)), the
layout of every JAX/NumPy pipeline, and outputs leave that way. Inside, the
batch path works in the documents' own layout, one sample per *column*
(A^0 = X = x.T: N_0 x M, Z^l: N_l x M), so section 7 reads as written:

    (7.1) dC/dZ^L = dC/dA^L ⊙ σ'^L(Z^L)                dZ_L = error(Z^L, Y) / M  (per column)
    (7.2) dC/dZ^l = (W^{l+1})^T dC/dZ^{l+1} ⊙ σ'(Z^l)   dZ = (W_T[l+1] @ dZ) * σ'(Z^l)
    (7.3) dC/dW^l = dC/dZ^l (A^{l-1})^T                dW = dZ @ A^{l-1}.T
    (7.4) dC/db^l = dC/dZ^l · ones(M, 1)               db = Σ_m dZ[:, m]

Speed (why columns; measured on a 2-core CPU, jax 0.10.2, 784-500-10 network;
``experiments/bench_grad.py`` re-measures it). The first version wrote the
transposed formulas in rows (dW = dZ.T @ A, dZ = (dZ @ W) * σ'(Z)); its
optimised HLO is jax.grad's op for op, yet it ran 5-20% slower at batch
512-2048. Three things, read off ``jit(f).lower(...).compile().as_text()`` and
a ``jax.profiler`` trace:

* jax.grad's graph has a second source node, ``fusion(y)`` -> ``reduce`` from
  log_softmax's transpose, independent of the forward pass; the row version's
  graph is one chain at the start. XLA:CPU's thunk executor then runs the
  first ``ynn_fusion`` GEMM on the calling thread (14.7 ms median at batch
  2048; likely 3 threads on 2 cores, the caller joining both pool workers)
  instead of handing it to its intra-op pool as it does for jax.grad
  (13.0 ms). Here the column-layout labels Y = y.T and the (W^l)^T of (7.2)
  are computed first as separate copy kernels (``lax.optimization_barrier``
  keeps XLA from fusing them away); without them the column version is as
  slow as the row one.
* Row layout at M = 1 makes XLA copy W^T on every call
  (``transpose_copy_fusion = f32[784,500] fusion(W)``), in jax.grad too; the
  column Z^1 = W^1 X is a plain matrix-vector product: 2x faster at batch 1.
* Row dW = dZ.T @ A contracts the leading M axis of both operands, which
  YNNPACK does not take (``dot(dZ, x), lhs_contracting_dims={0}``: XLA's Eigen
  fallback); column dW = dZ @ X is a ``ynn_fusion``, and so are Z^l = W^l A^{l-1}
  and (W^l)^T dZ^l. This wins 1.1-1.3x at batch 4096-8192.

Net, against jit(jax.grad) on that machine: 1.9-2.1x at batch 1, 1.1-1.5x at
8-256, parity at 512-2048 (0.98-1.05x run to run: both spend 93-98% of the
step in the same two GEMMs), 1.1-1.3x at 4096-8192.

For one sample (the first document, section 2) the same recursion is written
with vectors: δ_L = o - y, δ_l = diag(φ'(z_l)) W_{l+1}^T δ_{l+1},
dW_l = δ_l a_{l-1}^T, db_l = δ_l (``single_sample_backward``).

The network (``network.Net``) is the first argument of every function below: its
layers (``layers.py``) own the products of each equation (Dense: Z^l = W^l A^{l-1} + b̂^l,
dW^l = dZ^l (A^{l-1})^T, (W^l)^T dZ^l), so a new layer kind changes nothing here.

Feedback rules (``rules.py``, ``feedback.py``): ``rule`` swaps the matrix (7.2)
multiplies, (W^{l+1})^T under ``"bp"``, for the rule's own (fa, kp: (B^{l+1})^T;
sign, usf: sign(W^{l+1})^T; a direct rule such as dfa: B^l, applied to the output
error dZ^L); (7.1), (7.3), (7.4) are unchanged, and so is the compiled ``"bp"``
program. Every function below takes ``rule`` (static), ``feedback`` (the rule's
state, a pytree argument) and ``key`` (the rule's per-step key; only a rule that
draws, such as brsf, needs one).

Mixed precision (``methods.grad_fn(..., compute_dtype="bfloat16")``): everything
here runs in the dtype of its inputs, except the output error (7.1), computed in
float32 (the loss upcasts Z^L, ``losses.wide_dtype``) and cast back before (7.2),
and section 8's running sum, kept in float32. For float32 and float64 both casts
are no-ops: the compiled programs are those without them.

Three routes to the batch gradient live here, and the tests prove them equal:
``manual_grad`` on a batch (section 7, all samples at once), the mean of
``manual_grad`` vmapped over samples (section 0.3: samples never interact),
and ``accumulated_grad`` (section 8: one sample at a time, summed, averaged).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from bpjax.activations import get_activation
from bpjax.feedback import Feedback, backward_matrices, check_feedback
from bpjax.losses import get_loss, wide_dtype
from bpjax.network import Net, Params, check_inputs, forward
from bpjax.rules import Rule, get_rule

Array = jax.Array
Tap = Callable[[int, Array, Array], None]


def full_matrix_backward(
    net: Net,
    params: Params,
    zs: list[Array],
    activations: list[Array],
    dZ_L: Array,
    rule: Rule,
    feedback: Feedback = (),
    key: Array | None = None,
    tap: Tap | None = None,
) -> Params:
    """Second document, section 7: all M samples at once, in its column layout.

    Every matrix here has one sample per *column*, as in the document, so
    (7.1)-(7.4) read exactly as written (see "Speed" in the module docstring).

    Args:
      net: the layers, each owning its products; σ' is ``net.activation``'s.
      params: one dict per layer, ``{"W": (N_l, N_{l-1}), "b": (N_l,)}`` for dense.
      zs: ``zs[l-1]`` is Z^l, ``(N_l, M)``.
      activations: ``activations[l]`` is A^l, ``(N_l, M)``; A^0 = X = ``x.T``
        (a transposed view: XLA folds it into the products, nothing is copied).
      dZ_L: the output error dC/dZ^L, ``(N_L, M)``, already including 1/M.
      rule, feedback, key: what (7.2) multiplies (``feedback.backward_matrices``).
      tap: if given, called as ``tap(l, dZ^{l+1}, A^l)`` (0-based ``l``) with the two
        factors of each layer's (7.3), for per-sample diagnostics (``noise_scale``).
    """
    _, sigma_prime = get_activation(net.activation)
    # The matrix of (7.2), (W^{l+1})^T under bp, each its own small copy kernel ahead
    # of the forward pass (the barrier stops XLA folding the transpose into the
    # product; see "Speed"); ``G[l]`` carries the error into layer l.
    G = [None, *lax.optimization_barrier(backward_matrices(net, params, feedback, rule, key))]
    grads: Params = [None] * len(params)  # type: ignore[list-item]
    dZ = dZ_L                                                                   # (7.1)
    for l in reversed(range(len(params))):
        layer = net.layers[l]
        grads[l] = layer.grads(dZ, activations[l])          # (7.3) dZ^l (A^{l-1})^T, (7.4)
        if tap is not None:
            tap(l, dZ, activations[l])                      # (7.3)'s factors, unchanged
        if l > 0:
            down = G[l] @ dZ_L if rule.direct else layer.down(G[l], dZ)   # (W^{l+1})^T dZ
            dZ = down * sigma_prime(zs[l - 1])                            # (7.2) ⊙ σ'(Z^l)
    return grads


def single_sample_backward(
    net: Net,
    params: Params,
    zs: list[Array],
    activations: list[Array],
    delta_L: Array,
    rule: Rule,
    feedback: Feedback = (),
    key: Array | None = None,
) -> Params:
    """First document, section 2: the δ recursion for one sample.

    Shapes are vectors: ``zs[l-1]`` is z_l ``(N_l,)``, ``activations[l]`` is
    a_l ``(N_l,)`` with a_0 = x, ``delta_L`` is δ_L = o - y ``(N_L,)``.
    ``rule`` swaps W_{l+1}^T as in ``full_matrix_backward``.
    """
    _, sigma_prime = get_activation(net.activation)
    G = [None, *backward_matrices(net, params, feedback, rule, key)]    # W_{l+1}^T under bp
    grads: Params = [None] * len(params)  # type: ignore[list-item]
    delta = delta_L                                                     # δ_3 = o - y
    for l in reversed(range(len(params))):
        layer = net.layers[l]
        grads[l] = layer.grads(delta, activations[l])                   # δ a^T, δ
        if l > 0:
            down = G[l] @ delta_L if rule.direct else layer.down(G[l], delta)
            delta = sigma_prime(zs[l - 1]) * down           # δ_l = diag(φ'(z_l)) W_{l+1}^T δ_{l+1}
    return grads


def manual_grad_and_output(
    net: Net,
    params: Params,
    x: Array,
    y: Array,
    *,
    rule: str | Rule = "bp",
    feedback: Feedback | None = None,
    key: Array | None = None,
    tap: Tap | None = None,
) -> tuple[Params, Array]:
    """``manual_grad`` that also returns the output Z^L (for loss and accuracy).

    ``tap``: ``full_matrix_backward``'s hook (batch ``x: (M, n_0)`` only; unused for one sample).
    """
    check_inputs(net, params, x, y)
    rule = get_rule(rule)
    feedback = check_feedback(net, params, feedback, rule)
    sigma, _ = get_activation(net.activation)
    error = get_loss(net.loss).error
    if x.ndim == len(net.input_shape):  # one sample
        zs, activations = forward(net, params, x)
        delta_L = error(zs[-1], y).astype(zs[-1].dtype)  # δ_L = o - y, in >= float32
        grads = single_sample_backward(net, params, zs, activations, delta_L, rule, feedback, key)
        return grads, zs[-1]
    # The labels in the documents' layout, Y: (N_L, M), as their own copy kernel that
    # does not wait for the forward pass (the barrier keeps it apart; see "Speed").
    Y = lax.optimization_barrier(y.T)
    # Section 3 forward, one sample per column: A^0 = X = x.T.
    zs, activations = [], [x.T]
    for l, (layer, p) in enumerate(zip(net.layers, params, strict=True)):
        zs.append(layer.forward_cols(p, activations[-1]))          # (3) Z^l = W^l A^{l-1} + b̂^l
        if l < len(params) - 1:
            activations.append(sigma(zs[-1]))                      # A^l = σ(Z^l)
    # C = (1/M) Σ_m ℓ_m: the batch mean enters once, here, in dC/dZ^L (section 4);
    # the error of each sample (column m) is the loss's δ_L(Z^L_m, Y_m).
    per_column = jax.vmap(error, in_axes=1, out_axes=1)
    # (7.1) in float32 under bfloat16 (the loss upcasts Z^L), then back to Z^L's dtype.
    dZ_L = (per_column(zs[-1], Y) / x.shape[0]).astype(zs[-1].dtype)  # (7.1), (N_L, M)
    grads = full_matrix_backward(net, params, zs, activations, dZ_L, rule, feedback, key, tap)
    return grads, zs[-1].T                                         # Z^L as (M, N_L) rows


def manual_grad(
    net: Net,
    params: Params,
    x: Array,
    y: Array,
    *,
    rule: str | Rule = "bp",
    feedback: Feedback | None = None,
    key: Array | None = None,
) -> Params:
    """Gradient of ``loss_fn`` by the documents' formulas; same pytree as ``params``.

    ``x: (M, n_0)`` uses the second document's full-matrix formulas (section
    7); ``x: (n_0,)`` uses the first document's single-sample δ recursion, so
    ``jax.vmap(manual_grad, in_axes=(None, None, 0, 0))`` gives per-example gradients.
    ``rule`` (a ``bpjax.Rule`` or its name) swaps the matrix of (7.2) for the rule's,
    ``feedback`` its state (``init_feedback``), ``key`` its per-step key (brsf);
    ``"bp"`` is the true gradient. Jit it with ``net`` and ``rule`` static.
    """
    kw = dict(rule=rule, feedback=feedback, key=key)
    return manual_grad_and_output(net, params, x, y, **kw)[0]


def per_example_grads(
    net: Net,
    params: Params,
    x: Array,
    y: Array,
    *,
    rule: str | Rule = "bp",
    feedback: Feedback | None = None,
    key: Array | None = None,
) -> Params:
    """Per-example gradients: the single-sample form vmapped over rows.

    Returns the params pytree with a leading ``M`` axis on every leaf
    (``W: (M, n_out, n_in)``); their mean over axis 0 is ``manual_grad``.
    """
    feedback = check_feedback(net, params, feedback, rule)  # here, not first inside jax.vmap
    kw = dict(rule=rule, feedback=feedback, key=key)
    grad = lambda xm, ym: manual_grad(net, params, xm, ym, **kw)  # noqa: E731
    return jax.vmap(grad)(x, y)


def accumulated_grad_and_output(
    net: Net,
    params: Params,
    x: Array,
    y: Array,
    *,
    rule: str | Rule = "bp",
    feedback: Feedback | None = None,
    key: Array | None = None,
) -> tuple[Params, Array]:
    """``accumulated_grad`` that also returns each sample's output ``(M, n_L)``."""
    check_inputs(net, params, x, y)
    feedback = check_feedback(net, params, feedback, rule)  # here, not first inside lax.scan
    kw = dict(rule=rule, feedback=feedback, key=key)

    def add_sample(total: Params, sample: tuple[Array, Array]) -> tuple[Params, Array]:
        g, z = manual_grad_and_output(net, params, *sample, **kw)
        return jax.tree.map(jnp.add, total, g), z

    # The running sum in >= float32: bfloat16 would round away each sample's share.
    zeros = jax.tree.map(lambda p: jnp.zeros_like(p, wide_dtype(p.dtype)), params)
    total, outputs = lax.scan(add_sample, zeros, (x, y))
    return jax.tree.map(lambda t, p: (t / x.shape[0]).astype(p.dtype), total, params), outputs


def accumulated_grad(
    net: Net,
    params: Params,
    x: Array,
    y: Array,
    *,
    rule: str | Rule = "bp",
    feedback: Feedback | None = None,
    key: Array | None = None,
) -> Params:
    """Second document, section 8: one sample at a time, summed, then averaged.

    Nielsen's mini-batch update: backprop each sample of ``x: (M, n_0)`` with
    the single-sample formulas inside a ``lax.scan`` (sequential, as the
    section describes), accumulate the sum, divide by M.
    """
    kw = dict(rule=rule, feedback=feedback, key=key)
    return accumulated_grad_and_output(net, params, x, y, **kw)[0]
