"""Losses on the output layer and their output error dC/dZ^L.

The output layer is linear (A^L = Z^L) and feeds the loss directly, so each
loss supplies two functions of one sample's logits ``z: (..., n_L)`` and target
``y: (..., n_L)``:

* ``per_sample(z, y) -> (...)``: the loss of each sample;
* ``error(z, y) -> (..., n_L)``: dℓ/dz for one sample's loss ℓ, i.e.
  the first document's δ_3 = o - y (its NumPy code: ``e2 = probs - labels``) and
  the second document's section 4, dC/dZ^L = dC/dA^L ⊙ σ'^L(Z^L) with
  σ^L = identity (squared error) or folded into the softmax (cross-entropy).

The batch loss is the mean over samples, C = (1/M) Σ_m ℓ_m, so the batch
output error is ``error(Z, Y) / M``; that 1/M lives in ``formulas.py`` only.
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


LOSSES: dict[str, Loss] = {
    "softmax_cross_entropy": Loss(_softmax_xent, _softmax_xent_error),
    "squared_error": Loss(_squared_error, _squared_error_error),
}


def get_loss(name: str) -> Loss:
    """Returns the :class:`Loss` called ``name``; raises a one-line ValueError."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}") from None
