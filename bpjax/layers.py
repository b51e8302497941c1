r"""Layer kinds: each owns its parameters, its forward, and its part of section 7.

A network (``bpjax.Net``) is a tuple of layer values. Each layer kind is one small
frozen dataclass with these methods, so a new kind (convolution: im2col patches
forward, col2im for (7.2); pooling; flatten) is a new unit here and nothing in
``formulas.py`` changes:

    output_shape(in_shape)      the shape of Z^l for one sample, from A^{l-1}'s
    init(key, in_shape, dtype)  the layer's params (a dict; ``{}`` for a layer without)
    forward(p, a)               Z^l from A^{l-1}, one sample per row (or one sample)
    forward_cols(p, A)          Z^l from A^{l-1}, one sample per column (section 7's layout)
    grads(dZ, A)                (7.3), (7.4): dC/dparams from dZ^l and A^{l-1} (columns)
    grads_rows(dZ, A)           the same sums with one sample per row (ghost clipping)
    weight(p)                   the W a feedback rule reads (sign(W), the angle of B to W)
    feedback_shape(in_shape)    the shape of a B that stands in for ``weight``
    transpose(B)                G: what (7.2) multiplies, made ahead of the forward pass
    down(G, dZ)                 (7.2)'s product: the error of Z^l sent to A^{l-1} (columns)
    down_rows(G, dZ)            the same with one sample per row

Dense is the documents' layer, equation for equation: W^l (N_l, N_{l-1}), b^l (N_l,),
Z^l = W^l A^{l-1} + b̂^l, dW^l = dZ^l (A^{l-1})^T, db^l = dZ^l · ones(M, 1) and
dA^{l-1} = (W^l)^T dZ^l, with G = (W^l)^T under backprop and (B^l)^T under a rule.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def glorot_uniform(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """U(-u, u), u = sqrt(6 / (fan_in + fan_out)) for a ``(n_out, n_in)`` matrix.

    The first document's initialisation; also every random feedback matrix's
    (``bpjax.rules``), so B and W have the same scale.
    """
    n_out, n_in = shape
    u = np.sqrt(6.0 / (n_in + n_out))
    return jax.random.uniform(key, shape, dtype, minval=-u, maxval=u)


@dataclasses.dataclass(frozen=True)
class Dense:
    """A fully connected layer of ``width`` units: W ``(width, n_in)``, b ``(width,)``."""

    width: int

    def __post_init__(self) -> None:
        if isinstance(self.width, bool) or not isinstance(self.width, int | np.integer) or (
            self.width < 1
        ):
            raise ValueError(f"Dense needs a positive integer width, got {self.width!r}")
        object.__setattr__(self, "width", int(self.width))

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(in_shape) != 1:
            raise ValueError(f"Dense takes flat inputs (n_in,), got shape {in_shape}")
        return (self.width,)

    def init(self, key: Array, in_shape: tuple[int, ...], dtype: Any) -> dict[str, Array]:
        """Glorot-uniform W, zero b."""
        W = glorot_uniform(key, self.feedback_shape(in_shape), dtype)
        return {"W": W, "b": jnp.zeros((self.width,), dtype)}

    def feedback_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.width, *in_shape)

    @staticmethod
    def weight(p: dict[str, Array]) -> Array:
        return p["W"]

    @staticmethod
    def forward(p: dict[str, Array], a: Array) -> Array:
        """Z = W a + b for a sample ``a: (n_in,)``; rows ``a: (M, n_in)``: Z = A W^T + b."""
        if a.ndim == 1:
            return p["W"] @ a + p["b"]
        return a @ p["W"].T + p["b"][None, :]

    @staticmethod
    def forward_cols(p: dict[str, Array], A: Array) -> Array:
        """(3) Z^l = W^l A^{l-1} + b̂^l, ``A: (n_in, M)``; one sample ``(n_in,)`` alike."""
        if A.ndim == 1:
            return p["W"] @ A + p["b"]
        return p["W"] @ A + p["b"][:, None]

    @staticmethod
    def grads(dZ: Array, A: Array) -> dict[str, Array]:
        """(7.3) dW^l = dZ^l (A^{l-1})^T, (7.4) db^l = dZ^l · ones(M, 1); one sample: δ a^T, δ."""
        if dZ.ndim == 1:
            return {"W": jnp.outer(dZ, A), "b": dZ}
        return {"W": dZ @ A.T, "b": jnp.sum(dZ, axis=1)}

    @staticmethod
    def grads_rows(dZ: Array, A: Array) -> dict[str, Array]:
        """(7.3), (7.4) with one sample per row: dW = Σ_m dZ_m A_m^T, db = Σ_m dZ_m."""
        return {"W": dZ.T @ A, "b": jnp.sum(dZ, axis=0)}

    @staticmethod
    def transpose(B: Array) -> Array:
        """G = B^T, ``(n_in, width)``: (W^l)^T under backprop."""
        return B.T

    @staticmethod
    def down(G: Array, dZ: Array) -> Array:
        """(7.2)'s product G dZ^l (columns, or one sample's vector)."""
        return G @ dZ

    @staticmethod
    def down_rows(G: Array, dZ: Array) -> Array:
        """(7.2)'s product in rows: row m of (G dZ)^T is dZ_m G^T."""
        return dZ @ G.T
