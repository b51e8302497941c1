"""A feedback rule defined outside bpjax, as a user writes one (``test_rules.py``).

``sparse_fa``: feedback alignment with a fixed random B^l of which half the
entries are zero (a sparse FA). Trained with ``launch.py
--feedback=custom_rules:sparse_fa`` and this directory on PYTHONPATH.
"""

import jax
import jax.numpy as jnp

import bpjax
from bpjax.layers import glorot_uniform


def sparse_glorot(key, shape, dtype):
    """Glorot-uniform B with each entry kept with probability 1/2, else 0."""
    values, keep = jax.random.split(key)
    B = glorot_uniform(values, shape, dtype)
    return jnp.where(jax.random.bernoulli(keep, 0.5, shape), B, jnp.zeros_like(B))


sparse_fa = bpjax.Rule(
    "sparse_fa", lambda W, B, key: B, init=sparse_glorot, about="fa with half of B zero"
)
