"""The network as a description (``Net``) and pure functions over its params pytree.

``Net`` is one static, hashable value: the input shape, the layers in order (a
tuple of ``bpjax.layers`` values), the hidden activation σ and the loss. Every
function of the network reads from it, so it is the first argument everywhere
(``predict(net, params, x)``, ``manual_grad(net, params, x, y, ...)``) and a
``jax.jit`` static argument. ``Net.mlp((784, 500, 10))`` is the common case, the
first document's; the full form lists the layers, ``Net((784,), (Dense(500),
Dense(10)))``. Hidden layers apply σ; the last layer is linear and feeds the
loss (``losses.py``).

Params are a list with one dict per layer, for a dense layer
``{"W": (n_out, n_in), "b": (n_out,)}``: the documents' W^l (N_l x N_{l-1}) and b^l (N_l).

Layout: one sample per **row**. ``x`` is ``(M, n_0)``, so the documents'
column-per-sample Z^l = W^l A^{l-1} + b̂^l (second document, section 3) reads
here as ``Z = A @ W.T + b[None, :]`` with ``Z: (M, N_l)``, the transpose of
theirs. A single sample ``x: (n_0,)`` is the first document's setting and uses
``W @ x + b`` exactly as written there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from bpjax.activations import get_activation
from bpjax.layers import Dense
from bpjax.losses import get_loss

Array = jax.Array
Params = list[dict[str, Array]]


@dataclasses.dataclass(frozen=True)
class Net:
    """What the network is: input shape, layers in order, hidden activation, loss.

    Frozen and made of tuples and strings, so hashable: a ``jax.jit`` static argument.
    """

    input_shape: tuple[int, ...]
    layers: tuple[Any, ...]
    activation: str = "relu"
    loss: str = "softmax_cross_entropy"

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(n) for n in self.input_shape))
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("a Net needs at least one layer")
        if any(n < 1 for n in self.input_shape):
            raise ValueError(f"input_shape must be positive, got {self.input_shape}")
        get_activation(self.activation)  # one-line errors for unknown names, here
        get_loss(self.loss)

    @classmethod
    def mlp(cls, sizes: Any, activation: str = "relu",
            loss: str = "softmax_cross_entropy") -> Net:  # fmt: skip
        """Dense layers of widths ``sizes = (n_0, n_1, ..., n_L)``, e.g. ``(784, 500, 10)``."""
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(
                f"sizes must be at least two positive widths (n_0, ..., n_L), got {sizes}"
            )
        return cls((sizes[0],), tuple(Dense(n) for n in sizes[1:]), activation, loss)

    def shapes(self) -> list[tuple[int, ...]]:
        """``[shape of A^0, Z^1, ..., Z^L]`` for one sample."""
        shapes = [self.input_shape]
        for layer in self.layers:
            shapes.append(layer.output_shape(shapes[-1]))
        return shapes

    @property
    def sizes(self) -> tuple[int, ...]:
        """``(n_0, ..., n_L)``: the flat width of every layer's output (dense: the widths)."""
        return tuple(math.prod(s) for s in self.shapes())


def as_net(net: Net | Any) -> Net:
    """``net`` itself, or ``Net.mlp(net)`` for a tuple of widths (``init_params(key, sizes)``)."""
    return net if isinstance(net, Net) else Net.mlp(net)


def init_params(key: Array, net: Net | Any, dtype: Any = jnp.float32) -> Params:
    """Each layer's initial params (dense: Glorot-uniform W, zero b), in layer order.

    Args:
      key: PRNG key, split into one per layer.
      net: the ``Net``, or its widths ``(n_0, ..., n_L)`` for an MLP, e.g. ``(784, 500, 10)``.
      dtype: parameter dtype.

    Returns:
      ``[{"W": (n_l, n_{l-1}), "b": (n_l,)} for l = 1..L]`` for dense layers; W ~ U(-u, u)
      with u = sqrt(6 / (fan_in + fan_out)) as in the first document's code.
    """
    net = as_net(net)
    keys = jax.random.split(key, len(net.layers))
    shapes = net.shapes()[:-1]  # each layer's input
    return [layer.init(k, shape, dtype)
            for k, layer, shape in zip(keys, net.layers, shapes, strict=True)]  # fmt: skip


def layer_sizes(params: Params) -> tuple[int, ...]:
    """``(n_0, n_1, ..., n_L)`` read off the weight shapes of a dense network."""
    return (params[0]["W"].shape[1], *tuple(p["W"].shape[0] for p in params))


@functools.cache
def param_shapes(net: Net) -> list[dict[str, tuple[int, ...]]]:
    """The shape of every leaf of ``net``'s params, read off an abstract ``init_params``."""
    tree = jax.eval_shape(lambda: init_params(jax.random.key(0), net))
    return [{k: tuple(v.shape) for k, v in p.items()} for p in tree]


def check_inputs(net: Net, params: Params, x: Array, y: Array) -> None:
    """Raises a one-line ValueError when ``params``, ``x``, ``y`` do not fit ``net``."""
    if not isinstance(net, Net):
        raise ValueError(f"the first argument must be a bpjax.Net, got {type(net).__name__}")
    got = [{k: tuple(getattr(v, "shape", ())) for k, v in p.items()} for p in params]
    want = param_shapes(net)
    if got != want:
        raise ValueError(f"params do not fit the network {describe(net)}: expected {want}, "
                         f"got {got}")  # fmt: skip
    n_in, n_out = net.input_shape, net.shapes()[-1]
    if x.shape[-len(n_in):] != n_in or x.ndim not in (len(n_in), len(n_in) + 1):
        raise ValueError(
            f"x must be (M, {', '.join(map(str, n_in))}) or {n_in} for the network "
            f"{describe(net)}, got {x.shape}"
        )
    if y.shape != (*x.shape[: x.ndim - len(n_in)], *n_out):
        labels = y.shape == x.shape[: x.ndim - len(n_in)] and jnp.issubdtype(y.dtype, jnp.integer)
        hint = f": for integer labels pass jax.nn.one_hot(y, {n_out[-1]})" if labels else ""
        raise ValueError(
            f"y must be {(*x.shape[: x.ndim - len(n_in)], *n_out)} (one target row per sample, "
            f"one-hot for cross-entropy), got {y.shape}{hint}"
        )


def check_batch(net: Net, params: Params, x: Array, y: Array) -> None:
    """``check_inputs`` for functions of a batch only: ``x`` must be ``(M, *input_shape)``."""
    if x.ndim != len(net.input_shape) + 1:
        raise ValueError(f"x must be a batch (M, n_0), got shape {x.shape}")
    check_inputs(net, params, x, y)


def describe(net: Net) -> str:
    """``784-500-10`` for an MLP; the layers otherwise."""
    if all(isinstance(layer, Dense) for layer in net.layers):
        return "-".join(map(str, net.sizes))
    return f"{net.input_shape} -> {', '.join(map(repr, net.layers))}"


def forward(net: Net, params: Params, x: Array) -> tuple[list[Array], list[Array]]:
    """Runs the network and keeps what backprop needs (rows, or one sample).

    Returns:
      ``(zs, activations)``: ``zs[l]`` is Z^{l+1} and ``activations[l]`` is A^l,
      so ``activations[0] = x`` and ``zs[-1]`` is the output Z^L (= A^L, linear).
    """
    sigma, _ = get_activation(net.activation)
    activations, zs = [x], []
    for l, (layer, p) in enumerate(zip(net.layers, params, strict=True)):
        z = layer.forward(p, activations[-1])
        zs.append(z)
        if l < len(params) - 1:
            activations.append(sigma(z))
    return zs, activations


def predict(net: Net, params: Params, x: Array) -> Array:
    """Output Z^L: ``(M, n_L)`` logits (or regression outputs) for ``x: (M, n_0)``."""
    zs, _ = forward(net, params, x)
    return zs[-1]


def loss_fn(net: Net, params: Params, x: Array, y: Array) -> Array:
    """Mean loss over the batch, C = (1/M) Σ_m ℓ(z^L_m, y_m).

    Args:
      net: the network (its loss: one-hot ``y`` for ``"softmax_cross_entropy"``, real
        values for ``"squared_error"`` = (1/M) * 1/2 * ||Y - A^L||², second document,
        section 4).
      params: its params.
      x: ``(M, n_0)`` samples, one per row, or one sample ``(n_0,)``.
      y: targets, ``(M, n_L)`` or ``(n_L,)``.
    """
    check_inputs(net, params, x, y)
    per_sample = get_loss(net.loss).per_sample
    return jnp.mean(per_sample(predict(net, params, x), y))
