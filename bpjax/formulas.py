r"""Backpropagation written out by hand: the documents' formulas, no autodiff.

Dimension legend (second document, section 1): L layers; N_l units in layer
l; M samples in the batch; W^l: (N_l, N_{l-1}); b^l: (N_l,).

Layout. The documents put one sample per *column* (X: N_0 x M, Z^l: N_l x M).
This code puts one sample per *row* (x: (M, N_0), Z^l: (M, N_l)), the layout
of every JAX/NumPy data pipeline, so each matrix here is the transpose of the
documents' one and each formula is the transpose of theirs:

    documents (columns)                              here (rows)
    (7.1) dC/dZ^L = dC/dA^L ⊙ σ'^L(Z^L)               dZ_L = error(Z_L, Y) / M
    (7.2) dC/dZ^l = (W^{l+1})^T dC/dZ^{l+1} ⊙ σ'(Z^l)  dZ_l = (dZ_{l+1} @ W_{l+1}) * σ'(Z_l)
    (7.3) dC/dW^l = dC/dZ^l (A^{l-1})^T               dW_l = dZ_l.T @ A_{l-1}
    (7.4) dC/db^l = dC/dZ^l · ones(M, 1)              db_l = dZ_l.T @ ones(M) = Σ_m dZ_l[m]

For one sample (the first document, section 2) the same recursion is written
with vectors: δ_L = o - y, δ_l = diag(φ'(z_l)) W_{l+1}^T δ_{l+1},
dW_l = δ_l a_{l-1}^T, db_l = δ_l.

Three routes to the batch gradient live here, and the tests prove them equal:
``manual_grad`` on a batch (section 7, all samples at once), the mean of
``manual_grad`` vmapped over samples (section 0.3: samples never interact),
and ``accumulated_grad`` (section 8: one sample at a time, summed, averaged).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bpjax.activations import get_activation
from bpjax.losses import get_loss
from bpjax.network import Params, check_inputs, forward

Array = jax.Array


def full_matrix_backward(
    params: Params, zs: list[Array], activations: list[Array], dZ_L: Array, sigma_prime
) -> Params:
    """Second document, section 7: all M samples at once.

    Args:
      params: ``[{"W": (N_l, N_{l-1}), "b": (N_l,)}]``.
      zs: ``zs[l-1]`` is Z^l, ``(M, N_l)``.
      activations: ``activations[l]`` is A^l, ``(M, N_l)``; A^0 = X.
      dZ_L: the output error dC/dZ^L, ``(M, N_L)``, already including 1/M.
      sigma_prime: σ', elementwise.
    """
    grads: Params = [None] * len(params)  # type: ignore[list-item]
    dZ = dZ_L                                                    # (7.1)
    for l in reversed(range(len(params))):
        grads[l] = {
            "W": dZ.T @ activations[l],                          # (7.3) dW^l = dZ^l (A^{l-1})^T
            "b": jnp.sum(dZ, axis=0),                            # (7.4) db^l = dZ^l · ones(M, 1)
        }
        if l > 0:
            dZ = (dZ @ params[l]["W"]) * sigma_prime(zs[l - 1])  # (7.2)
    return grads


def single_sample_backward(
    params: Params, zs: list[Array], activations: list[Array], delta_L: Array, sigma_prime
) -> Params:
    """First document, section 2: the δ recursion for one sample.

    Shapes are vectors: ``zs[l-1]`` is z_l ``(N_l,)``, ``activations[l]`` is
    a_l ``(N_l,)`` with a_0 = x, ``delta_L`` is δ_L = o - y ``(N_L,)``.
    """
    grads: Params = [None] * len(params)  # type: ignore[list-item]
    delta = delta_L                                                     # δ_3 = o - y
    for l in reversed(range(len(params))):
        grads[l] = {
            "W": jnp.outer(delta, activations[l]),                      # de/dW = δ a^T
            "b": delta,                                                 # de/db = δ
        }
        if l > 0:
            delta = sigma_prime(zs[l - 1]) * (params[l]["W"].T @ delta)  # δ_1 = diag(φ'(z_1)) W_2^T δ_2
    return grads


def manual_grad_and_output(
    params: Params,
    x: Array,
    y: Array,
    *,
    activation: str = "relu",
    loss: str = "softmax_cross_entropy",
) -> tuple[Params, Array]:
    """``manual_grad`` that also returns the output Z^L (for loss and accuracy)."""
    check_inputs(params, x, y)
    _, sigma_prime = get_activation(activation)
    zs, activations = forward(params, x, activation)
    error = get_loss(loss).error(zs[-1], y)
    if x.ndim == 1:
        return single_sample_backward(params, zs, activations, error, sigma_prime), zs[-1]
    # C = (1/M) Σ_m ℓ_m: the batch mean enters once, here, in dC/dZ^L (section 4).
    dZ_L = error / x.shape[0]
    return full_matrix_backward(params, zs, activations, dZ_L, sigma_prime), zs[-1]


def manual_grad(
    params: Params,
    x: Array,
    y: Array,
    *,
    activation: str = "relu",
    loss: str = "softmax_cross_entropy",
) -> Params:
    """Gradient of ``loss_fn`` by the documents' formulas; same pytree as ``params``.

    ``x: (M, n_0)`` uses the second document's full-matrix formulas (section
    7); ``x: (n_0,)`` uses the first document's single-sample δ recursion, so
    ``jax.vmap(manual_grad, in_axes=(None, 0, 0))`` gives per-example gradients.
    Jit it with ``activation`` and ``loss`` static.
    """
    return manual_grad_and_output(params, x, y, activation=activation, loss=loss)[0]


def per_example_grads(
    params: Params,
    x: Array,
    y: Array,
    *,
    activation: str = "relu",
    loss: str = "softmax_cross_entropy",
) -> Params:
    """Per-example gradients: the single-sample form vmapped over rows.

    Returns the params pytree with a leading ``M`` axis on every leaf
    (``W: (M, n_out, n_in)``); their mean over axis 0 is ``manual_grad``.
    """
    grad = lambda xm, ym: manual_grad(params, xm, ym, activation=activation, loss=loss)  # noqa: E731
    return jax.vmap(grad)(x, y)


def accumulated_grad_and_output(
    params: Params,
    x: Array,
    y: Array,
    *,
    activation: str = "relu",
    loss: str = "softmax_cross_entropy",
) -> tuple[Params, Array]:
    """``accumulated_grad`` that also returns each sample's output ``(M, n_L)``."""
    check_inputs(params, x, y)

    def add_sample(total: Params, sample: tuple[Array, Array]) -> tuple[Params, Array]:
        g, z = manual_grad_and_output(params, *sample, activation=activation, loss=loss)
        return jax.tree.map(jnp.add, total, g), z

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, outputs = lax.scan(add_sample, zeros, (x, y))
    return jax.tree.map(lambda t: t / x.shape[0], total), outputs


def accumulated_grad(
    params: Params,
    x: Array,
    y: Array,
    *,
    activation: str = "relu",
    loss: str = "softmax_cross_entropy",
) -> Params:
    """Second document, section 8: one sample at a time, summed, then averaged.

    Nielsen's mini-batch update: backprop each sample of ``x: (M, n_0)`` with
    the single-sample formulas inside a ``lax.scan`` (sequential, as the
    section describes), accumulate the sum, divide by M.
    """
    return accumulated_grad_and_output(params, x, y, activation=activation, loss=loss)[0]
