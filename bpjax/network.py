"""The multilayer perceptron as pure functions over a params pytree.

Params are a list with one ``{"W": (n_out, n_in), "b": (n_out,)}`` dict per
layer, the documents' W^l (N_l x N_{l-1}) and b^l (N_l). Hidden layers apply an
activation σ; the output layer is linear and feeds the loss (``losses.py``).

Layout: one sample per **row**. ``x`` is ``(M, n_0)``, so the documents'
column-per-sample Z^l = W^l A^{l-1} + b̂^l (second document, section 3) reads
here as ``Z = A @ W.T + b[None, :]`` with ``Z: (M, N_l)``, the transpose of
theirs. A single sample ``x: (n_0,)`` is the first document's setting and uses
``W @ x + b`` exactly as written there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bpjax.activations import get_activation
from bpjax.losses import get_loss

Array = jax.Array
Params = list[dict[str, Array]]


def init_params(key: Array, sizes: Any, dtype: Any = jnp.float32) -> Params:
    """Glorot-uniform weights and zero biases, one dict per layer.

    Args:
      key: PRNG key.
      sizes: layer widths ``(n_0, n_1, ..., n_L)``, e.g. ``(784, 500, 10)``.
      dtype: parameter dtype.

    Returns:
      ``[{"W": (n_l, n_{l-1}), "b": (n_l,)} for l = 1..L]``; W ~ U(-u, u) with
      u = sqrt(6 / (fan_in + fan_out)) as in the first document's code.
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ValueError(f"sizes must be at least two positive widths (n_0, ..., n_L), got {sizes}")
    keys = jax.random.split(key, len(sizes) - 1)
    params = []
    for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:], strict=True):
        u = np.sqrt(6.0 / (n_in + n_out))
        W = jax.random.uniform(k, (n_out, n_in), dtype, minval=-u, maxval=u)
        params.append({"W": W, "b": jnp.zeros((n_out,), dtype)})
    return params


def layer_sizes(params: Params) -> tuple[int, ...]:
    """``(n_0, n_1, ..., n_L)`` read off the weight shapes."""
    return (params[0]["W"].shape[1], *tuple(p["W"].shape[0] for p in params))


def check_inputs(params: Params, x: Array, y: Array) -> None:
    """Raises a one-line ValueError when ``x``/``y`` do not fit ``params``."""
    sizes = layer_sizes(params)
    if x.ndim not in (1, 2) or x.shape[-1] != sizes[0]:
        raise ValueError(
            f"x must be (M, {sizes[0]}) or ({sizes[0]},) for a network of sizes {sizes}, "
            f"got {x.shape}"
        )
    if y.shape != (*x.shape[:-1], sizes[-1]):
        raise ValueError(
            f"y must be {(*x.shape[:-1], sizes[-1])} (one target row per sample, "
            f"one-hot for cross-entropy), got {y.shape}"
        )


def check_batch(params: Params, x: Array, y: Array) -> None:
    """``check_inputs`` for functions of a batch only: ``x`` must be ``(M, n_0)``."""
    if x.ndim != 2:
        raise ValueError(f"x must be a batch (M, n_0), got shape {x.shape}")
    check_inputs(params, x, y)


def affine(p: dict[str, Array], a: Array) -> Array:
    """Z = W A + b for a sample ``a: (n_in,)`` or a batch ``a: (M, n_in)``.

    Second document, section 3: Z^l = W^l A^{l-1} + b̂^l, in row layout.
    """
    if a.ndim == 1:
        return p["W"] @ a + p["b"]
    return a @ p["W"].T + p["b"][None, :]


def forward(params: Params, x: Array, activation: str = "relu") -> tuple[list[Array], list[Array]]:
    """Runs the network and keeps what backprop needs.

    Returns:
      ``(zs, activations)``: ``zs[l]`` is Z^{l+1} and ``activations[l]`` is A^l,
      so ``activations[0] = x`` and ``zs[-1]`` is the output Z^L (= A^L, linear).
    """
    sigma, _ = get_activation(activation)
    activations, zs = [x], []
    for l, p in enumerate(params):
        z = affine(p, activations[-1])
        zs.append(z)
        if l < len(params) - 1:
            activations.append(sigma(z))
    return zs, activations


def predict(params: Params, x: Array, *, activation: str = "relu") -> Array:
    """Output Z^L: ``(M, n_L)`` logits (or regression outputs) for ``x: (M, n_0)``."""
    zs, _ = forward(params, x, activation)
    return zs[-1]


def loss_fn(
    params: Params,
    x: Array,
    y: Array,
    *,
    activation: str = "relu",
    loss: str = "softmax_cross_entropy",
) -> Array:
    """Mean loss over the batch, C = (1/M) Σ_m ℓ(z^L_m, y_m).

    Args:
      params: the network.
      x: ``(M, n_0)`` samples, one per row, or one sample ``(n_0,)``.
      y: targets, ``(M, n_L)`` or ``(n_L,)``: one-hot for
        ``"softmax_cross_entropy"``, real values for ``"squared_error"``
        (= (1/M) * 1/2 * ||Y - A^L||², second document, section 4).
    """
    check_inputs(params, x, y)
    per_sample = get_loss(loss).per_sample
    return jnp.mean(per_sample(predict(params, x, activation=activation), y))
