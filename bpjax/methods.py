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

Feedback rules (``bpjax.feedback``): ``grad_fn(method, rule=...)`` with a rule
other than ``"bp"`` gives that rule's update instead of the gradient; only the
hand-written methods (:data:`RULE_METHODS`) can, since ``jax.grad`` computes
the true gradient. The rule's matrices reach the function as an argument,
``fn(params, x, y, feedback)``, so they may change between calls (Kolen-Pollack).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from bpjax.feedback import Feedback, check_feedback, check_rule
from bpjax.formulas import accumulated_grad_and_output, manual_grad_and_output
from bpjax.losses import get_loss
from bpjax.network import Params, check_inputs, predict

Array = jax.Array
GradFn = Callable[..., tuple[Params, Array]]  # (params, x, y, feedback=()) -> (grads, Z^L)

METHODS = ("manual", "autodiff", "manual_vmap", "autodiff_vmap", "per_sample")
RULE_METHODS = ("manual", "manual_vmap", "per_sample")  # the hand-written ones: any rule


def _loss_and_output(params, x, y, *, activation, loss):
    z = predict(params, x, activation=activation)
    return jnp.mean(get_loss(loss).per_sample(z, y)), z


def _autodiff(params, x, y, *, activation, loss, rule="bp", feedback=None):
    check_method("autodiff", rule)  # jax.grad knows one rule only
    check_inputs(params, x, y)
    check_feedback(params, feedback, rule)
    grad = jax.grad(_loss_and_output, has_aux=True)
    return grad(params, x, y, activation=activation, loss=loss)


def _vmapped(single: Callable) -> Callable:
    def grad_and_output(params, x, y, *, activation, loss, rule="bp", feedback=None):
        # vmap over rows would take a 3-D x as M batches of one; a method's x is (M, n_0).
        if x.ndim != 2:
            raise ValueError(f"x must be a batch (M, n_0), got shape {x.shape}")
        check_inputs(params, x, y)
        feedback = check_feedback(params, feedback, rule)  # here, not first inside jax.vmap
        one = functools.partial(single, activation=activation, loss=loss, rule=rule)
        per_example = lambda p, xm, ym, fb: one(p, xm, ym, feedback=fb)  # noqa: E731
        grads, outputs = jax.vmap(per_example, in_axes=(None, 0, 0, None))(params, x, y, feedback)
        return jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), outputs

    return grad_and_output


_METHODS: dict[str, Callable] = {
    "manual": manual_grad_and_output,
    "autodiff": _autodiff,
    "manual_vmap": _vmapped(manual_grad_and_output),
    "autodiff_vmap": _vmapped(_autodiff),
    "per_sample": accumulated_grad_and_output,
}


def check_method(method: str, rule: str = "bp") -> None:
    """A one-line ValueError unless ``method`` is one of :data:`METHODS` and can run ``rule``."""
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    check_rule(rule)
    if rule != "bp" and method not in RULE_METHODS:
        raise ValueError(
            f"method {method!r} cannot use rule {rule!r}: jax.grad computes the true gradient; "
            f"rules other than bp need --method={', '.join(RULE_METHODS[:-1])} or "
            f"{RULE_METHODS[-1]}"
        )


def grad_fn(
    method: str,
    *,
    activation: str = "relu",
    loss: str = "softmax_cross_entropy",
    rule: str = "bp",
) -> GradFn:
    """The batch-gradient function of ``method`` with activation, loss and rule bound.

    Returns ``fn(params, x, y, feedback=()) -> (grads, outputs)``, a pure function
    of arrays only, ready for ``jax.jit``; ``feedback`` holds ``rule``'s matrices
    (``bpjax.init_feedback``; none for ``"bp"`` and ``"sign"``, so ``fn(params, x, y)``).
    """
    check_method(method, rule)
    grads_of = functools.partial(_METHODS[method], activation=activation, loss=loss, rule=rule)

    def fn(params: Params, x: Array, y: Array, feedback: Feedback = ()) -> tuple[Params, Array]:
        return grads_of(params, x, y, feedback=feedback)

    fn.__name__ = fn.__qualname__ = _METHODS[method].__name__  # jit and HLO names as before
    return fn
