"""The gradient methods a run can choose, all giving the same batch gradient.

Each method is a function ``(net, params, x: (M, n_0), y: (M, n_L)) -> (grads,
outputs)`` where ``grads`` has the params pytree and is the gradient of the
batch-mean loss, and ``outputs: (M, n_L)`` is Z^L (used for the loss and
accuracy metrics, so no extra forward pass is needed).

* ``manual``: the second document's full-matrix formulas (section 7).
* ``autodiff``: ``jax.grad`` of ``loss_fn``.
* ``manual_vmap``: the first document's single-sample formulas under
  ``jax.vmap``, per-example gradients averaged.
* ``autodiff_vmap``: ``jax.vmap(jax.grad)`` per example, averaged.
* ``per_sample``: the second document's section 8 accumulation (``lax.scan``).

Feedback rules (``bpjax.rules``): ``grad_fn(net, method, rule=...)`` with a rule
other than ``"bp"`` gives that rule's update instead of the gradient; only the
hand-written methods (:data:`RULE_METHODS`) can, since ``jax.grad`` computes
the true gradient. The rule's state reaches the function as an argument,
``fn(params, x, y, feedback, key)``, so it may change between calls (Kolen-Pollack),
and so may the rule's per-step key (brsf).

Mixed precision, ``grad_fn(method, compute_dtype="bfloat16")`` (the one definition
the training loop and the batch sweep both use):

* the parameters and the optimizer state stay float32, the master copy: ``fn``
  takes float32 params (and feedback; x in float32 or bfloat16, y in float32) and
  returns float32 grads, the params' pytree and dtypes, and float32 outputs Z^L;
* the forward and backward matrix products run in bfloat16: params, feedback and x
  are cast to bfloat16 on the way in, so Z^l, A^l, dZ^l and (7.3)'s products are
  bfloat16 (XLA accumulates each product in float32 and rounds its result);
* the loss, the softmax and the output error (7.1) run in float32: the loss upcasts
  Z^L (``losses.wide_dtype``); the hand-written methods cast dZ^L back to bfloat16
  before (7.2)-(7.4), ``autodiff`` lets ``jax.grad`` carry bfloat16 cotangents back
  through the products. What adds up many samples one by one is float32 too:
  section 8's running sum (``per_sample``), DP-SGD's norms and clip factors.

With ``compute_dtype`` None or equal to the params' dtype (float32, float64)
nothing is cast: the compiled program is the one without ``compute_dtype``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from bpjax import rules
from bpjax.feedback import Feedback, check_feedback
from bpjax.formulas import accumulated_grad_and_output, manual_grad_and_output
from bpjax.losses import get_loss
from bpjax.network import Net, Params, check_batch, check_inputs, predict
from bpjax.rules import Rule, get_rule

Array = jax.Array
# (params, x, y, feedback=(), key=None) -> (grads, Z^L)
GradFn = Callable[..., tuple[Params, Array]]

METHODS = ("manual", "autodiff", "manual_vmap", "autodiff_vmap", "per_sample")
RULE_METHODS = ("manual", "manual_vmap", "per_sample")  # the hand-written ones: any rule


def _loss_and_output(params, x, y, *, net):
    z = predict(net, params, x)
    return jnp.mean(get_loss(net.loss).per_sample(z, y)), z


def _autodiff(net, params, x, y, *, rule="bp", feedback=None, key=None):
    check_method("autodiff", rule)  # jax.grad knows one rule only
    check_inputs(net, params, x, y)
    check_feedback(net, params, feedback, rule)
    return jax.grad(_loss_and_output, has_aux=True)(params, x, y, net=net)


def _vmapped(single: Callable) -> Callable:
    def grad_and_output(net, params, x, y, *, rule="bp", feedback=None, key=None):
        # vmap over rows would take a 3-D x as M batches of one; a method's x is (M, n_0).
        check_batch(net, params, x, y)
        feedback = check_feedback(net, params, feedback, rule)  # here, not first in jax.vmap
        one = functools.partial(single, net, rule=rule)
        per_example = lambda p, xm, ym, fb, k: one(p, xm, ym, feedback=fb, key=k)  # noqa: E731
        grads, outputs = jax.vmap(per_example, in_axes=(None, 0, 0, None, None))(
            params, x, y, feedback, key
        )
        return jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), outputs

    return grad_and_output


_METHODS: dict[str, Callable] = {
    "manual": manual_grad_and_output,
    "autodiff": _autodiff,
    "manual_vmap": _vmapped(manual_grad_and_output),
    "autodiff_vmap": _vmapped(_autodiff),
    "per_sample": accumulated_grad_and_output,
}


def check_method(method: str, rule: str | Rule = "bp") -> None:
    """A one-line ValueError unless ``method`` is one of :data:`METHODS` and can run ``rule``."""
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    rule = get_rule(rule)
    if rule != rules.bp and method not in RULE_METHODS:
        raise ValueError(
            f"method {method!r} cannot use rule {rule.name!r}: jax.grad computes the true"
            f" gradient; rules other than bp need --method={', '.join(RULE_METHODS[:-1])} or "
            f"{RULE_METHODS[-1]}"
        )


def _is_float_dtype(name: str) -> bool:
    try:
        return jnp.issubdtype(jnp.dtype(name), jnp.floating)
    except TypeError:
        return False


def in_compute_dtype(fn: GradFn, compute_dtype: str | None) -> GradFn:
    """``fn(params, x, y, feedback=..., key=...)`` run in ``compute_dtype`` (mixed precision).

    Returns ``run(params, x, y, feedback, key=None)``: params, feedback and x cast to
    ``compute_dtype``, then ``fn``, then the grads cast back to the params' dtypes
    and the outputs to the dtype of ``params``' first leaf (the master copy's);
    anything ``fn`` returns beyond ``(grads, outputs)`` (statistics) passes through.
    A cast to an array's own dtype is no operation at all, so with
    ``compute_dtype`` the params' dtype (or None) ``run`` traces exactly ``fn``.
    The rule's key is a key, never cast.
    """
    if compute_dtype is not None and not _is_float_dtype(compute_dtype):
        raise ValueError(
            f"compute_dtype must be a floating dtype such as 'bfloat16', or None; got "
            f"{compute_dtype!r}"
        )

    def run(params: Params, x: Array, y: Array, feedback: Feedback,
            key: Array | None = None) -> tuple[Params, Array]:  # fmt: skip
        if compute_dtype is None:
            return fn(params, x, y, feedback=feedback, key=key)
        cast = lambda tree: jax.tree.map(lambda a: a.astype(compute_dtype), tree)  # noqa: E731
        grads, outputs, *extra = fn(cast(params), cast(x), y, feedback=cast(feedback), key=key)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return grads, outputs.astype(jax.tree.leaves(params)[0].dtype), *extra

    return run


def grad_fn(
    net: Net,
    method: str = "manual",
    *,
    rule: str | Rule = "bp",
    compute_dtype: str | None = None,
) -> GradFn:
    """The batch-gradient function of ``method`` for ``net``, with the rule bound.

    Returns ``fn(params, x, y, feedback=(), key=None) -> (grads, outputs)``, a pure
    function of arrays only, ready for ``jax.jit``; ``feedback`` holds ``rule``'s state
    (``bpjax.init_feedback``; none for bp, sign, usf, brsf, so ``fn(params, x, y)``) and
    ``key`` its per-step key (only a rule that draws, brsf, needs one).
    ``compute_dtype="bfloat16"``: mixed precision (module docstring); None, or the
    params' own dtype: no cast at all.
    """
    if not isinstance(net, Net):
        raise ValueError(f"grad_fn takes the bpjax.Net first, got {net!r}")
    check_method(method, rule)
    grads_of = functools.partial(_METHODS[method], net, rule=get_rule(rule))
    run = in_compute_dtype(grads_of, compute_dtype)

    def fn(params: Params, x: Array, y: Array, feedback: Feedback = (),
           key: Array | None = None) -> tuple[Params, Array]:  # fmt: skip
        return run(params, x, y, feedback, key)

    fn.__name__ = fn.__qualname__ = _METHODS[method].__name__  # jit and HLO names as before
    return fn
