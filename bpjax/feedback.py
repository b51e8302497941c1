r"""Feedback rules at work: their state, the matrices (7.2) uses, and how well they align.

Backpropagation's (7.2) sends the error of layer l+1 down with the transpose of the
forward weights. Written by hand, that matrix can be swapped (``jax.grad`` cannot
do this). A rule (``bpjax.rules.Rule``; the built-in ones, their matrices and
references are listed there) says what replaces it; this module asks the rule and
the layers, never a rule's name:

* ``init_feedback(key, net, rule)``: the rule's state, one entry per layer that
  sends an error down (l = 2..L; a direct rule: per hidden layer, l = 1..L-1),
  drawn by the rule's ``init`` from ``fold_in(key, 1)``, so even the params' own
  key gives a B independent of W. fa, kp, dfa's B and frsf's R are Glorot-uniform
  for their own shape, U(±sqrt(6 / (fan_in + fan_out))): for fa and kp exactly W^l's
  distribution, so the fa signal starts as large as bp's and a learning rate tuned
  for bp carries over (Akrout's sqrt(1/(fan_in+fan_out)) N(0, 1) has half that
  variance). For dfa the bound depends on N_l + N_L only, so with one hidden layer
  B^1 has the distribution of (W^2)^T: dfa with one hidden layer *is* fa, in
  distribution too (784-500-10: U(±0.11), between Nøkland's U(±1/√N_l) = U(±0.045)
  and U(±1/√N_L) = U(±0.32)).
* ``rule_matrices``: each layer's B from the rule's ``matrix(W, state, key)`` (times
  s = sqrt(2 / (fan_in + fan_out)) under ``--feedback_scale``); ``backward_matrices``:
  the G = B^T (the layer's ``transpose``) that (7.2) multiplies.
* ``error_rows``: (7.2) under the rule with one sample per row (privacy, alignment).

Alignment (``alignment``), per hidden layer l = 1..L-1, angles in degrees:
``arccos`` of a cosine clipped to [-1, 1], never NaN. Two vectors that are both
zero count as equal (0°); a zero vector against a nonzero one as orthogonal (90°).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bpjax.activations import get_activation
from bpjax.errors import ConfigError
from bpjax.losses import get_loss
from bpjax.network import Net, Params, as_net, check_batch, forward
from bpjax.rules import (  # noqa: F401 - part of this module's API, as before
    FEEDBACK_RULES,
    Rule,
    fan_scale,
    get_rule,
    kp_feedback_grads,
    layer_key,
)

Array = jax.Array
Feedback = Sequence[Any]  # a rule's state, one entry per layer, in layer order

_FEEDBACK_STREAM = 1  # fold_in(key, 1): B never repeats the draws of init_params(key)


def feedback_shapes(net: Net | Any, rule: str | Rule) -> list[tuple[int, ...]]:
    """The shape each layer's state is drawn for, in layer order ([] for a stateless rule).

    W^l's shape for l = 2..L; for a direct rule (dfa), ``(N_l, N_L)`` for l = 1..L-1.
    """
    net, rule = as_net(net), get_rule(rule)
    if rule.init is None:
        return []
    shapes = net.shapes()  # [A^0, Z^1, ..., Z^L], one sample
    if rule.direct:
        n_L = int(np.prod(shapes[-1]))
        return [(int(np.prod(shapes[l])), n_L) for l in range(1, len(net.layers))]
    return [layer.feedback_shape(shapes[l]) for l, layer in enumerate(net.layers) if l > 0]


def init_feedback(key: Array, net: Net | Any, rule: str | Rule,
                  dtype: Any = jnp.float32) -> list[Any]:  # fmt: skip
    """The rule's feedback state (see the module docstring), in layer order.

    Args:
      key: PRNG key (the params' own key is fine: states come from ``fold_in(key, 1)``).
      net: the ``Net``, or the widths ``(n_0, ..., n_L)`` of an MLP.
      rule: a ``Rule`` or its name.
      dtype: the state's dtype.

    Returns:
      fa, kp: ``[B^2, ..., B^L]``, B^l shaped like W^l; dfa: ``[B^1, ..., B^{L-1}]``,
      B^l ``(N_l, N_L)``; frsf: ``[R^2, ..., R^L]``; bp, sign, usf, brsf: ``[]``.
    """
    rule = get_rule(rule)
    shapes = feedback_shapes(net, rule)
    if not shapes:
        return []
    keys = jax.random.split(jax.random.fold_in(key, _FEEDBACK_STREAM), len(shapes))
    return [rule.init(k, shape, dtype) for k, shape in zip(keys, shapes, strict=True)]


@functools.cache
def _expected(net: Net, rule: Rule) -> list[Any]:
    abstract = jax.eval_shape(lambda: init_feedback(jax.random.key(0), net, rule))
    return [jax.tree.map(lambda a: tuple(a.shape), s) for s in abstract]


def _what(rule: Rule) -> str:
    if rule.init is None:
        return "no matrices (an empty list)"
    if rule.direct:
        return "one B^l of shape (N_l, N_L) for each hidden layer l = 1..L-1"
    return "one state per layer l = 2..L, drawn for W^l's shape"


def check_feedback(net: Net, params: Params, feedback: Feedback | None,
                   rule: str | Rule) -> list[Any]:  # fmt: skip
    """``feedback`` as a list; a one-line ValueError unless it fits ``rule`` and ``net``."""
    rule = get_rule(rule)
    expected = _expected(net, rule)
    given = [] if feedback is None else list(feedback)
    shapes = [jax.tree.map(lambda a: tuple(getattr(a, "shape", ())), s) for s in given]
    if shapes != expected:
        raise ConfigError(
            f"rule {rule.name!r} needs feedback of {_what(rule)}, shapes {expected} "
            f"(bpjax.init_feedback(key, net, {rule.name!r})), got "
            f"{'None' if feedback is None else shapes}"
        )
    return given


def rule_matrices(net: Net, params: Params, feedback: Feedback, rule: str | Rule,
                  key: Array | None = None) -> list[Array]:  # fmt: skip
    """The B that stands in for W^l, l = 2..L, in W^l's shape; a direct rule's B^l, l < L.

    ``rule.matrix(W^l, state^l, fold_in(key, l))``, times s = sqrt(2 / (fan_in + fan_out))
    for a scaled rule. ``key``: the rule's key for this step (``rules.step_key``).
    """
    rule = get_rule(rule)
    L = len(net.layers)
    states = list(feedback) if rule.init is not None else [None] * (L - 1)
    Bs = []
    for l in range(1, L):
        W = None if rule.direct else net.layers[l].weight(params[l])
        B = rule.matrix(W, states[l - 1], layer_key(key, l))
        Bs.append(fan_scale(B.shape) * B if rule.scale else B)
    return Bs


def backward_matrices(net: Net, params: Params, feedback: Feedback, rule: str | Rule,
                      key: Array | None = None) -> list[Array]:  # fmt: skip
    """The matrix (7.2) multiplies for each hidden layer l = 1..L-1, in layer order.

    bp: (W^{l+1})^T; fa, kp: (B^{l+1})^T; sign, usf: sign(W^{l+1})^T, ...: each layer's
    ``transpose`` of its B; a direct rule (dfa): B^l itself, (N_l, N_L), applied to dZ^L.
    """
    rule = get_rule(rule)
    Bs = rule_matrices(net, params, feedback, rule, key)
    if rule.direct:
        return Bs
    return [net.layers[l].transpose(B) for l, B in enumerate(Bs, start=1)]


def error_rows(net: Net, params: Params, feedback: Feedback, zs: list[Array], dZ_L: Array,
               rule: str | Rule, key: Array | None = None) -> list[Array]:  # fmt: skip
    """(7.2) under ``rule`` in row layout, one sample per row (``privacy``, ``alignment``).

    ``zs[l]`` is Z^{l+1} ``(M, N_{l+1})``, ``dZ_L`` the output error rows ``(M, N_L)``;
    returns ``dZs`` with ``dZs[l]`` the rows of dZ^{l+1}. Row m is (G dZ_m) ⊙ σ'(Z_m), so
    the rows of the column formula (G dZ)^T are dZ G^T.
    """
    rule = get_rule(rule)
    _, sigma_prime = get_activation(net.activation)
    G = backward_matrices(net, params, feedback, rule, key)
    dZs: list[Array] = [None] * len(params)  # type: ignore[list-item]
    dZs[-1] = dZ_L
    for l in reversed(range(1, len(params))):
        if rule.direct:
            down = dZ_L @ G[l - 1].T                                    # (B^l dZ^L)^T
        else:
            down = net.layers[l].down_rows(G[l - 1], dZs[l])            # (G dZ^{l+1})^T
        dZs[l - 1] = down * sigma_prime(zs[l - 1])                      # (7.2), rows
    return dZs


def _cosine(a: Array, b: Array) -> Array:
    """Cosine along the last axis; 1 when both are zero, 0 when only one is."""
    na = jnp.linalg.norm(a, axis=-1, keepdims=True)
    nb = jnp.linalg.norm(b, axis=-1, keepdims=True)
    unit = lambda v, n: v / jnp.where(n > 0, n, 1)  # noqa: E731
    cos = jnp.sum(unit(a, na) * unit(b, nb), axis=-1)
    return jnp.where((na[..., 0] == 0) & (nb[..., 0] == 0), 1.0, cos)


def angle_deg(a: Array, b: Array) -> Array:
    """The angle in degrees between ``a`` and ``b`` along the last axis, in [0, 180]."""
    return jnp.degrees(jnp.arccos(jnp.clip(_cosine(a, b), -1.0, 1.0)))


def alignment(
    net: Net,
    params: Params,
    feedback: Feedback | None,
    x: Array,
    y: Array,
    *,
    rule: str | Rule,
    key: Array | None = None,
) -> dict[str, Array]:
    """How far ``rule``'s updates are from the true gradient, on the batch ``x: (M, n_0)``.

    One forward pass and two row-layout backward passes (rule and bp); no
    per-example gradient is formed. Jit it with ``net`` and ``rule`` static; ``key``
    is the rule's key where it draws one (brsf).

    Returns:
      A dict of ``(L-1,)`` arrays, entry i for hidden layer l = i + 1 (the output
      layer is exact under every rule and not reported):

      * ``"alignment_deg"``: ∠(dW^l_rule, ∇_{W^l} C), the batch update against the true
        gradient (the number to log per epoch);
      * ``"delta_deg_mean"``, ``"delta_deg_std"``: mean and standard deviation over the
        samples of ∠(δ^l_rule,m, δ^l_bp,m), the per-example error signals (rows of dZ^l).
        Sample m's update is δ_m (a_m)^T, so this is also the angle between its rule
        update and its true gradient: the factor a_m cancels;
      * ``"weight_deg"`` (every rule but a direct one): ∠(W^{l+1}, B^{l+1}), B the matrix
        (7.2) really uses to carry the signal into layer l (``rule_matrices``: sign(W)
        for sign, the scaled |R| sign(W) for frsf, ...).

      Angles lie in [0, 180]: two zero vectors count as 0° (a sample whose units of
      layer l are all inactive has δ = 0 under every rule), a zero against a nonzero
      vector as 90°. bp reports 0 up to rounding (arccos near 1: about 1e-6° in
      float64, 0.03° in float32).
    """
    rule = get_rule(rule)
    feedback = check_feedback(net, params, feedback, rule)
    check_batch(net, params, x, y)
    zs, activations = forward(net, params, x)
    dZ_L = get_loss(net.loss).error(zs[-1], y)                  # (7.1), per sample
    rows = error_rows(net, params, feedback, zs, dZ_L, rule, key)
    true_rows = error_rows(net, params, [], zs, dZ_L, "bp")
    hidden = range(len(params) - 1)
    dW = lambda dZ, A: (dZ.T @ A).ravel()  # noqa: E731  (7.3), summed: 1/M leaves angles alone
    update_deg = [angle_deg(dW(rows[l], activations[l]), dW(true_rows[l], activations[l]))
                  for l in hidden]  # fmt: skip
    delta_deg = [angle_deg(rows[l], true_rows[l]) for l in hidden]  # (M,) per layer

    def stack(values: list[Array]) -> Array:
        return jnp.stack(values) if values else jnp.zeros((0,), zs[-1].dtype)

    report = {
        "alignment_deg": stack(update_deg),
        "delta_deg_mean": stack([jnp.mean(d) for d in delta_deg]),
        "delta_deg_std": stack([jnp.std(d) for d in delta_deg]),
    }
    if not rule.direct:
        Bs = rule_matrices(net, params, feedback, rule, key)
        report["weight_deg"] = stack([
            angle_deg(net.layers[l + 1].weight(params[l + 1]).ravel(), Bs[l].ravel())
            for l in hidden
        ])  # fmt: skip
    return report
