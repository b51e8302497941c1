"""The gradient methods a run can choose, all giving the same batch gradient.

Each method is a function ``(params, x: (M, n_0), y: (M, n_L)) -> (grads,
outputs)`` where ``grads`` has the params pytree and is the gradient of the
batch-mean loss, and ``outputs: (M, n_L)`` is Z^L (used for the loss and
accuracy metrics, so no extra forward pass is needed).

* ``manual``: the second document's full-matrix formulas (section 7).
* ``autodiff``: ``jax.grad`` of ``loss_fn``.
* ``manual_vmap``: the first document's single-sample formulas under
  ``jax.vmap``, per-example gradients averaged.
* ``autodiff_vmap``: ``jax.vmap(jax.grad)`` per example, averaged.
* ``per_sample``: the second document's section 8 accumulation (``lax.scan``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from bpjax.formulas import accumulated_grad_and_output, manual_grad_and_output
from bpjax.losses import get_loss
from bpjax.network import Params, check_inputs, predict

Array = jax.Array
GradFn = Callable[[Params, Array, Array], tuple[Params, Array]]

METHODS = ("manual", "autodiff", "manual_vmap", "autodiff_vmap", "per_sample")


def _loss_and_output(params, x, y, *, activation, loss):
    z = predict(params, x, activation=activation)
    return jnp.mean(get_loss(loss).per_sample(z, y)), z


def _autodiff(params, x, y, *, activation, loss):
    check_inputs(params, x, y)
    grad = jax.grad(_loss_and_output, has_aux=True)
    return grad(params, x, y, activation=activation, loss=loss)


def _vmapped(single: Callable) -> Callable:
    def grad_and_output(params, x, y, *, activation, loss):
        # vmap over rows would take a 3-D x as M batches of one; a method's x is (M, n_0).
        if x.ndim != 2:
            raise ValueError(f"x must be a batch (M, n_0), got shape {x.shape}")
        check_inputs(params, x, y)
        one = functools.partial(single, activation=activation, loss=loss)
        grads, outputs = jax.vmap(one, in_axes=(None, 0, 0))(params, x, y)
        return jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), outputs

    return grad_and_output


_METHODS: dict[str, Callable] = {
    "manual": manual_grad_and_output,
    "autodiff": _autodiff,
    "manual_vmap": _vmapped(manual_grad_and_output),
    "autodiff_vmap": _vmapped(_autodiff),
    "per_sample": accumulated_grad_and_output,
}


def check_method(method: str) -> None:
    """Raises a one-line ValueError unless ``method`` is one of :data:`METHODS`."""
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")


def grad_fn(
    method: str, *, activation: str = "relu", loss: str = "softmax_cross_entropy"
) -> GradFn:
    """The batch-gradient function of ``method`` with activation and loss bound.

    The result is a pure function of arrays only, ready for ``jax.jit``.
    """
    check_method(method)
    return functools.partial(_METHODS[method], activation=activation, loss=loss)
