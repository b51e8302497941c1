r"""Per-example gradient norms, per-example clipping and DP-SGD without per-example gradients.

Dimension legend as in ``formulas.py``: L layers, N_l units in layer l, M samples;
row layout, so ``x: (M, N_0)``, Z^l and A^l are ``(M, N_l)``, W^l is ``(N_l, N_{l-1})``.

Why no per-example gradient is needed. The second document's section 6 writes the
batch gradient as a sum over samples,

    dW^l = Σ_m dZ^l_m (A^{l-1}_m)^T,        db^l = Σ_m dZ^l_m,            (6)

so sample m's share of dW^l is the outer product of two vectors it already has: its
row dZ^l_m of the error matrix (section 7, built by (7.1)-(7.2) for all samples at
once; samples never interact, so each row is exactly that sample's error) and its
row A^{l-1}_m of the activations. An outer product's Frobenius norm is the product of
the two vector norms (Goodfellow 2015, "Efficient per-example gradient computations"):

    ||g_m||² = Σ_l ||dZ^l_m||² (||A^{l-1}_m||² + 1)                          (N)

(the ``+ 1`` is the bias, db^l_m = dZ^l_m). Clipping sample m by c_m scales its row,
so the clipped sum is again one matrix product (Li et al. 2021, "ghost clipping"):

    Σ_m c_m g_m :   dW^l = (dZ^l)^T diag(c) A^{l-1},   db^l = (dZ^l)^T c       (C)

DP-SGD (Abadi et al. 2016) then adds Gaussian noise of standard deviation σ·C to
the clipped sum and divides by M:

    g̃ = (Σ_m c_m g_m + N(0, (σ C)² I)) / M,   c_m = min(1, C / ||g_m||)      (P)

Here g_m = ∇ℓ(z^L_m, y_m) is the gradient of sample m's own loss, so dZ^L_m =
``loss.error(z_m, y_m)`` with **no** 1/M (that 1/M belongs to the batch mean in
``formulas.py``); with C = ∞ and σ = 0, (P) is exactly ``manual_grad``.

Sum or mean. ``per_example_grad_norms`` returns norms, ``clipped_grad`` the clipped
**sum** (C), and ``private_grad`` / ``private_grad_fn`` the noised **mean** (P). The
single 1/M and the noise live in ``_noise_and_average`` only.

Conventions follow ``optax.contrib.differentially_private_aggregate`` so the two can
be compared key for key: c_m = nan_to_num(min(C / ||g_m||, 1), nan=1) (no epsilon; a
zero gradient gets c_m = 1), and the noise for the k-th leaf of the flattened params
is ``normal(split(key, n_leaves + 1)[k + 1])``.

Feedback rules (``bpjax.feedback``). Under a rule other than bp, sample m's update
is still the outer product dZ^l_m (A^{l-1}_m)^T, with the rule's own row dZ^l_m from
(7.2); so (N), (C) and (P) hold as written with those rows: ghost clipping clips the
rule's per-example updates (``rule=`` everywhere below). (N) is a dense layer's: its
per-example gradient is one outer product per sample; (C) is each layer's own
``grads_rows`` of the scaled rows. ``jax.grad`` knows only the
true gradient, so the autodiff routes refuse other rules.

Mixed precision (``private_grad_fn(..., compute_dtype="bfloat16")``, the definition
of ``bpjax.methods``): the clipped sum runs in bfloat16 like a step's gradient, with
the output error in float32; the norms (N) and clip factors c_m are computed in
float32 from the bfloat16 rows (``losses.wide_dtype``), the scaled rows c_m dZ^l_m
rounded once to bfloat16 for the product (C); the noise and the 1/M of (P) are added
in float32 to the float32 sum. bfloat16 rounding of (C) can move a clipped
per-example contribution by about 2^-8 of its norm: the sensitivity is C (1 + ~4e-3),
not exactly C; account in float32 where that matters.

Two routes, the same answer (``private_grad_fn``):

* ``"manual"``: equations (N) and (C), one forward and one backward pass over
  ``(M, N_l)`` error matrices; memory O(M Σ_l N_l), like an ordinary step.
* every other method: per-example gradients, O(M · #params) memory, then
  clipped and summed as optax does: ``jax.vmap(jax.grad(ℓ))`` for ``autodiff`` and
  ``autodiff_vmap`` (and any method without a route of its own), the first
  document's single-sample formulas under ``jax.vmap`` for ``manual_vmap``, and
  section 8's one-sample-at-a-time ``lax.scan`` for ``per_sample`` (O(#params)).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from bpjax.feedback import Feedback, check_feedback, error_rows
from bpjax.formulas import manual_grad_and_output
from bpjax.losses import get_loss, wide_dtype, widen
from bpjax.methods import check_method, in_compute_dtype
from bpjax.network import Net, Params, check_batch, check_inputs, forward, predict
from bpjax.rules import Rule, get_rule, step_key

Array = jax.Array
PrivateGradFn = Callable[..., tuple[Params, Array]]  # (params, x, y, key, feedback=())


# --------------------------------------------------------------------------- manual route
def per_sample_errors(
    net: Net,
    params: Params,
    x: Array,
    y: Array,
    *,
    rule: str | Rule = "bp",
    feedback: Feedback | None = None,
    key: Array | None = None,
) -> tuple[list[Array], list[Array], Array]:
    """Forward, then (7.1)-(7.2) for the per-sample losses ℓ_m (no 1/M), (7.2) by ``rule``.

    Returns:
      ``(dZs, activations, Z_L)``: ``dZs[l]`` is dℓ_m/dZ^{l+1} for every row m,
      ``(M, N_{l+1})``; ``activations[l]`` is A^l ``(M, N_l)`` with A^0 = x;
      ``Z_L: (M, N_L)`` the output.
    """
    check_batch(net, params, x, y)
    feedback = check_feedback(net, params, feedback, rule)
    zs, activations = forward(net, params, x)
    dZ_L = get_loss(net.loss).error(zs[-1], y).astype(zs[-1].dtype)        # (7.1), without 1/M
    dZs = error_rows(net, params, feedback, zs, dZ_L, rule, key)           # (7.2), in rows
    return dZs, activations, zs[-1]

def _sq_row_norms(a_MxN: Array) -> Array:
    return jnp.sum(jnp.square(widen(a_MxN)), axis=1)  # norms in >= float32


def sq_norm(tree: Params) -> Array:
    """The squared global L2 norm of a pytree, summed in at least float32."""
    return sum(jnp.sum(jnp.square(widen(leaf))) for leaf in jax.tree.leaves(tree))


def sq_norms_from_factor_norms(dZ_sq: Iterable[Array], A_sq: Iterable[Array]) -> Array:
    """``(M,)`` squared per-example norms ||g_m||², eq. (N), from the factors' norms.

    ``dZ_sq[l]``, ``A_sq[l]``: ``(M,)`` ||dZ^{l+1}_m||² and ||A^l_m||², in layer order,
    summed in whatever layout holds the factors (``noise_scale``: section 7's columns).
    """
    # (N): ||g_m||² = Σ_l ||dZ^l_m||² (||A^{l-1}_m||² + 1), W and b of every layer.
    return sum(d * (a + 1) for d, a in zip(dZ_sq, A_sq, strict=True))


def sq_norms_from_errors(dZs: Sequence[Array], activations: Sequence[Array]) -> Array:
    """``(M,)`` ||g_m||², eq. (N), from the rows that ``per_sample_errors`` returns."""
    return sq_norms_from_factor_norms(map(_sq_row_norms, dZs), map(_sq_row_norms, activations))


def _norms_from_errors(dZs: list[Array], activations: list[Array]) -> Array:
    return jnp.sqrt(sq_norms_from_errors(dZs, activations))


def per_example_grad_norms(
    net: Net,
    params: Params,
    x: Array,
    y: Array,
    *,
    rule: str | Rule = "bp",
    feedback: Feedback | None = None,
    key: Array | None = None,
) -> Array:
    """``(M,)`` global L2 norms of the per-example gradients ∇ℓ(z^L_m, y_m), eq. (N).

    Over all layers, weights and biases; the gradient of sample m's own loss (not
    of the batch mean, so not divided by M). Equals
    ``vmap(jax.grad(ℓ))`` followed by each example's norm, without ever forming
    the per-example gradients. Under ``rule``, the norms of its per-example updates.
    """
    kw = dict(rule=rule, feedback=feedback, key=key)
    dZs, activations, _ = per_sample_errors(net, params, x, y, **kw)
    return _norms_from_errors(dZs, activations)


def clip_factors(norms_M: Array, clip: float | Array) -> Array:
    """c_m = min(1, C / ||g_m||), as optax's ``per_example_global_norm_clip``.

    No epsilon: a zero gradient gives C / 0 = inf, so c_m = 1; 0 / 0 (C = 0) is NaN
    and optax maps it to 1 as well.
    """
    return jnp.nan_to_num(jnp.minimum(clip / jnp.asarray(norms_M), 1.0), nan=1.0)


def clipped_grad_and_norms(
    net: Net,
    params: Params,
    x: Array,
    y: Array,
    *,
    clip: float | Array,
    rule: str | Rule = "bp",
    feedback: Feedback | None = None,
    key: Array | None = None,
) -> tuple[Params, Array, Array]:
    """The clipped **sum** Σ_m c_m g_m by ghost clipping, eq. (C).

    Returns:
      ``(grads_sum, norms, outputs)``: the params pytree (a sum over the batch,
      not a mean), the ``(M,)`` per-example norms before clipping, and Z^L ``(M, N_L)``.
    """
    kw = dict(rule=rule, feedback=feedback, key=key)
    dZs, activations, Z_L = per_sample_errors(net, params, x, y, **kw)
    norms_M = _norms_from_errors(dZs, activations)
    c_M = clip_factors(norms_M, clip)
    grads: Params = []
    for layer, dZ, A in zip(net.layers, dZs, activations, strict=True):
        cdZ = (dZ * c_M[:, None]).astype(dZ.dtype)  # dZ^l diag(c), row m scaled by c_m
        grads.append(layer.grads_rows(cdZ, A))  # (C), (7.3)-(7.4): Σ_m c_m dZ^l_m (A^{l-1}_m)^T
    return grads, norms_M, Z_L


def clipped_grad(
    net: Net,
    params: Params,
    x: Array,
    y: Array,
    *,
    clip: float | Array,
    rule: str | Rule = "bp",
    feedback: Feedback | None = None,
    key: Array | None = None,
) -> tuple[Params, Array]:
    """``(grads_sum, outputs)``: the clipped **sum** Σ_m c_m g_m (C) and Z^L ``(M, N_L)``."""
    kw = dict(rule=rule, feedback=feedback, key=key)
    grads, _, Z_L = clipped_grad_and_norms(net, params, x, y, clip=clip, **kw)
    return grads, Z_L


# ------------------------------------------------------------------------- the one 1/M
def _is_static_zero(v) -> bool:
    return isinstance(v, int | float) and v == 0


def _noise_and_average(
    grads_sum: Params,
    key: Array | None,
    *,
    clip: float | Array,
    noise_multiplier: float | Array,
    batch_size: int,
) -> Params:
    """(P): (clipped sum + N(0, (σ C)² I)) / M, the only place that divides by M.

    Noise key for the k-th flattened leaf: ``split(key, n_leaves + 1)[k + 1]``,
    as ``optax.contrib.differentially_private_aggregate`` does. A noise multiplier
    that is a Python 0 draws nothing (``key`` may then be None).
    """
    leaves, treedef = jax.tree.flatten(grads_sum)
    if _is_static_zero(noise_multiplier):
        noised = leaves
    else:
        _, *keys = jax.random.split(key, len(leaves) + 1)
        std = clip * noise_multiplier
        noised = [
            g + std * jax.random.normal(k, g.shape, g.dtype)
            for g, k in zip(leaves, keys, strict=True)
        ]
    return jax.tree.unflatten(treedef, [g / batch_size for g in noised])


def private_grad(
    net: Net,
    params: Params,
    x: Array,
    y: Array,
    key: Array | None,
    *,
    clip: float | Array,
    noise_multiplier: float | Array,
    rule: str | Rule = "bp",
    feedback: Feedback | None = None,
) -> Params:
    """DP-SGD gradient, eq. (P): the clipped sum plus noise, as a **mean** (÷ M).

    Ghost clipping (the ``"manual"`` route of ``private_grad_fn``). With
    ``clip=inf, noise_multiplier=0`` it equals ``manual_grad``. ``key`` feeds the
    noise and, through ``rules.step_key``, a rule that draws (brsf).
    """
    fn = private_grad_fn(net, "manual", clip=clip, noise_multiplier=noise_multiplier, rule=rule)
    return fn(params, x, y, key, feedback)[0]


# -------------------------------------------------------------- per-example-gradient routes
def _per_sample_loss_and_output(params: Params, x_n: Array, y_n: Array, *, net: Net):
    z = predict(net, params, x_n)
    return get_loss(net.loss).per_sample(z, y_n), z


def _per_example_global_norm_clip(grads_M: Params, clip) -> tuple[Params, Array]:
    # optax's per_example_global_norm_clip on the pytree (leading axis M on every leaf).
    leaves = jax.tree.leaves(grads_M)
    sq_M = sum(jnp.sum(jnp.square(widen(g.reshape(g.shape[0], -1))), axis=1) for g in leaves)
    c_M = clip_factors(jnp.sqrt(sq_M), clip)
    return jax.tree.map(lambda g: jnp.tensordot(c_M, g, axes=1), grads_M), c_M


def _vmap_clipped_sum(single_grad: Callable) -> Callable:
    """Clipped sum from per-example gradients built by ``jax.vmap(single_grad)``."""

    def clipped_sum(net, params, x, y, *, clip, rule, feedback, key):
        check_inputs(net, params, x, y)
        one = functools.partial(single_grad, net, rule=rule)
        per_example = lambda p, xm, ym, fb, k: one(p, xm, ym, feedback=fb, key=k)  # noqa: E731
        grads_M, Z_L = jax.vmap(per_example, in_axes=(None, 0, 0, None, None))(
            params, x, y, feedback, key
        )
        return _per_example_global_norm_clip(grads_M, clip)[0], Z_L

    return clipped_sum


def _scan_clipped_sum(net, params, x, y, *, clip, rule, feedback, key):
    """Section 8: one sample at a time; clip each gradient before adding it."""
    check_inputs(net, params, x, y)
    kw = dict(rule=rule, feedback=feedback, key=key)

    def add_clipped(total: Params, sample: tuple[Array, Array]) -> tuple[Params, Array]:
        g, z = manual_grad_and_output(net, params, *sample, **kw)
        norm = jnp.sqrt(sq_norm(g))
        c = clip_factors(norm, clip)
        return jax.tree.map(lambda t, gi: t + c * gi, total, g), z

    zeros = jax.tree.map(lambda p: jnp.zeros_like(p, wide_dtype(p.dtype)), params)  # >= float32
    return lax.scan(add_clipped, zeros, (x, y))


def _autodiff_single(net, params, x_n, y_n, *, rule, feedback, key=None):
    # jax.vmap(jax.grad(ℓ)) knows the true gradient only: check_method refused other rules.
    check_feedback(net, params, feedback, rule)
    grad = jax.grad(_per_sample_loss_and_output, has_aux=True)
    return grad(params, x_n, y_n, net=net)


_CLIPPED_SUM_ROUTES: dict[str, Callable] = {
    "manual": clipped_grad,
    "manual_vmap": _vmap_clipped_sum(manual_grad_and_output),
    "per_sample": _scan_clipped_sum,
}
_DEFAULT_ROUTE = _vmap_clipped_sum(_autodiff_single)  # jax.vmap(jax.grad(ℓ)), then clip


def per_example_clipped_sum(
    net: Net,
    method: str,
    params: Params,
    x: Array,
    y: Array,
    *,
    clip: float | Array,
    rule: str | Rule = "bp",
    feedback: Feedback | None = None,
    key: Array | None = None,
) -> tuple[Params, Array]:
    """``(grads_sum, outputs)``: the clipped **sum** Σ_m c_m g_m by ``method``'s route."""
    check_method(method, rule)
    feedback = check_feedback(net, params, feedback, rule)  # before any route's vmap or scan
    route = _CLIPPED_SUM_ROUTES.get(method, _DEFAULT_ROUTE)
    return route(net, params, x, y, clip=clip, rule=rule, feedback=feedback, key=key)


def private_grad_fn(
    net: Net,
    method: str = "manual",
    *,
    clip: float | Array,
    noise_multiplier: float | Array = 0.0,
    rule: str | Rule = "bp",
    compute_dtype: str | None = None,
) -> PrivateGradFn:
    """DP-SGD gradient function for the training loop, eq. (P).

    Returns ``fn(params, x, y, key, feedback=()) -> (grads, outputs)`` with ``grads`` the
    noised **mean** (clipped sum + N(0, (σC)²)) / M in the params pytree and
    ``outputs`` Z^L ``(M, N_L)`` for the metrics, like ``methods.grad_fn``. A pure
    function of arrays, ready for ``jax.jit``; pass a fresh ``key`` every step (it
    feeds the noise, and a drawing rule through ``rules.step_key``).
    ``"manual"`` uses ghost clipping; all other methods clip per-example
    gradients (see the module docstring); all give the same result for the same key.
    ``rule`` (not for the autodiff methods) clips and noises the rule's per-example
    updates instead; ``feedback`` holds its state. ``compute_dtype="bfloat16"``: mixed
    precision (module docstring), float32 params in, float32 grads and outputs out.
    """
    rule = get_rule(rule)
    check_method(method, rule)
    for name, value in (("clip", clip), ("noise_multiplier", noise_multiplier)):
        if isinstance(value, int | float) and not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    clipped_sum = in_compute_dtype(
        functools.partial(per_example_clipped_sum, net, method, clip=clip, rule=rule),
        compute_dtype,
    )

    def fn(
        params: Params, x: Array, y: Array, key: Array | None, feedback: Feedback = ()
    ) -> tuple[Params, Array]:
        if key is None and not _is_static_zero(noise_multiplier):
            raise ValueError("private_grad needs a PRNG key when noise_multiplier is not 0")
        rule_key = step_key(rule, key)
        grads_sum, Z_L = clipped_sum(params, x, y, feedback, rule_key)  # in params' dtype
        grads = _noise_and_average(
            grads_sum, key, clip=clip, noise_multiplier=noise_multiplier, batch_size=x.shape[0]
        )
        return grads, Z_L

    return fn
