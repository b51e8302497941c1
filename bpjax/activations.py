"""Hidden-layer activations σ and their derivatives σ'.

Each entry maps a name to ``(sigma, sigma_prime)``, both elementwise on the
pre-activation ``Z``. The derivative is what the second document's section 7
multiplies by (``⊙ σ'^l(Z^l)``) and what the first document writes as
``diag(φ'(z_1))``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _relu_prime(z: Array) -> Array:
    # σ'(0) = 0, the same subgradient jax.nn.relu's custom JVP picks, so the
    # manual and autodiff gradients agree exactly even on dead units.
    return (z > 0).astype(z.dtype)


def _sigmoid_prime(z: Array) -> Array:
    s = jax.nn.sigmoid(z)
    return s * (1 - s)


def _tanh_prime(z: Array) -> Array:
    t = jnp.tanh(z)
    return 1 - t * t


ACTIVATIONS: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    "relu": (jax.nn.relu, _relu_prime),
    "sigmoid": (jax.nn.sigmoid, _sigmoid_prime),
    "tanh": (jnp.tanh, _tanh_prime),
    "identity": (lambda z: z, jnp.ones_like),
}


def get_activation(name: str) -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
    """Returns ``(sigma, sigma_prime)`` for ``name``; raises a one-line ValueError."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)}"
        ) from None
