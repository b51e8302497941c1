"""Losses on the output layer and their output error dC/dZ^L.

The output layer is linear (A^L = Z^L) and feeds the loss directly, so each
loss supplies two functions of one sample's logits ``z: (..., n_L)`` and target
``y: (..., n_L)``:

* ``per_sample(z, y) -> (...)``: the loss of each sample;
* ``error(z, y) -> (..., n_L)``: dℓ/dz for one sample's loss ℓ, i.e.
  the first document's δ_3 = o - y (its NumPy code: ``e2 = probs - labels``) and
  the second document's section 4, dC/dZ^L = dC/dA^L ⊙ σ'^L(Z^L) with
  σ^L = identity (squared error) or folded into the softmax (cross-entropy).

The losses (``LOSSES``), per sample, with their output error:

* ``softmax_cross_entropy``: ℓ = -Σ_k y_k log softmax(z)_k, dℓ/dz = softmax(z) Σ_k y_k - y;
* ``squared_error``: ℓ = 1/2 ||y - z||², dℓ/dz = z - y;
* ``sigmoid_cross_entropy``: each output unit a sigmoid with its own binary
  cross-entropy (Akrout et al. 2019), ℓ = Σ_k softplus(z_k) - y_k z_k, which is
  -Σ_k [y_k log σ(z_k) + (1 - y_k) log(1 - σ(z_k))] in a form that never takes
  the log of 0; dℓ/dz = σ(z) - y.

The batch loss is the mean over samples, C = (1/M) Σ_m ℓ_m, so the batch
output error is ``error(Z, Y) / M``; that 1/M lives in ``formulas.py`` only.

Mixed precision (``methods``: bfloat16 products, float32 master parameters). Both
functions compute in ``wide_dtype``, at least float32: bfloat16 logits are upcast
first, so the softmax, the loss and the output error (7.1) run in float32, and
``error`` returns float32 (the caller casts it back before (7.2)-(7.4)). float32 and
float64 logits are left as they are: no cast, the same program as without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Loss(NamedTuple):
    per_sample: Callable[[Array, Array], Array]
    error: Callable[[Array, Array], Array]


def wide_dtype(dtype: jnp.dtype | str) -> jnp.dtype:
    """The dtype losses, norms and sums are computed in: ``dtype``, at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def widen(a: Array) -> Array:
    """``a`` in ``wide_dtype``: sums of squares of bfloat16 would lose digits (float32: as is)."""
    return a.astype(wide_dtype(a.dtype))


def _wide_loss(per_sample: Callable, error: Callable) -> Loss:
    """Both functions with the logits upcast to ``wide_dtype`` first (a no-op for float32)."""

    def upcast(fn: Callable[[Array, Array], Array]) -> Callable[[Array, Array], Array]:
        return lambda z, y: fn(widen(z), y)

    return Loss(upcast(per_sample), upcast(error))


def _softmax_xent(z: Array, y: Array) -> Array:
    return -jnp.sum(y * jax.nn.log_softmax(z, axis=-1), axis=-1)


def _softmax_xent_error(z: Array, y: Array) -> Array:
    # d/dz of -Σ y log softmax(z) is softmax(z) * Σy - y; targets are one-hot
    # (Σy = 1) in the documents, but keeping Σy makes it exact for soft labels.
    return jax.nn.softmax(z, axis=-1) * jnp.sum(y, axis=-1, keepdims=True) - y


def _squared_error(z: Array, y: Array) -> Array:
    # Second document, section 4: ℓ = 1/2 ||y - a^L||².
    return 0.5 * jnp.sum(jnp.square(y - z), axis=-1)


def _squared_error_error(z: Array, y: Array) -> Array:
    # Second document, section 4: dC/dA^L = A^L - Y (before the 1/M).
    return z - y


def _sigmoid_xent(z: Array, y: Array) -> Array:
    # Binary cross-entropy with logits: softplus(z) - y z = -y log σ(z) - (1 - y) log(1 - σ(z)).
    return jnp.sum(jax.nn.softplus(z) - y * z, axis=-1)


def _sigmoid_xent_error(z: Array, y: Array) -> Array:
    # d/dz_k of softplus(z_k) - y_k z_k is σ(z_k) - y_k: the sigmoid folded into the loss.
    return jax.nn.sigmoid(z) - y


LOSSES: dict[str, Loss] = {
    "softmax_cross_entropy": _wide_loss(_softmax_xent, _softmax_xent_error),
    "squared_error": _wide_loss(_squared_error, _squared_error_error),
    "sigmoid_cross_entropy": _wide_loss(_sigmoid_xent, _sigmoid_xent_error),
}


def get_loss(name: str) -> Loss:
    """Returns the :class:`Loss` called ``name``; raises a one-line ValueError."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}") from None
