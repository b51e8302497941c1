r"""Feedback rules: which matrix carries the error down in (7.2), and how well it aligns.

Backpropagation's (7.2) sends the error of layer l+1 down with the transpose of the
forward weights. Written by hand, that matrix can be swapped (``jax.grad`` cannot
do this). A *rule* names the replacement; (7.1), (7.3) and (7.4) never change:

    rule  (7.2) dZ^l = ... ⊙ σ'(Z^l)   feedback (``init_feedback``), in layer order
    bp    (W^{l+1})^T dZ^{l+1}         []
    fa    (B^{l+1})^T dZ^{l+1}         B^l shaped like W^l, (N_l, N_{l-1}), l = 2..L
    kp    (B^{l+1})^T dZ^{l+1}         as fa; B^l learns with W^l (``kp_feedback_grads``)
    dfa   B^l dZ^L                     B^l: (N_l, N_L), l = 1..L-1 (the hidden layers)
    sign  sign(W^{l+1})^T dZ^{l+1}     [] (unscaled: entries ±1, or 0 where W is 0)

fa: feedback alignment (Lillicrap et al. 2016), fixed random B. dfa: direct
feedback alignment (Nøkland 2016), the output error dZ^L sent straight to every
hidden layer. sign: sign symmetry (Liao, Leibo & Poggio 2016). kp: Kolen-Pollack
(Akrout et al. 2019): B^l receives W^l's own gradient dW^l, and both decay by λ,
so under SGD with learning rate η, W^l_t - B^l_t = (1 - ηλ)^t (W^l_0 - B^l_0).
The output layer's dW^L = dZ^L (A^{L-1})^T is exact under every rule; only the
hidden layers l = 1..L-1 receive another signal.

Distributions (``init_feedback``): every B is Glorot-uniform for its own shape,
U(±sqrt(6 / (fan_in + fan_out))), drawn by ``network.init_params`` itself. For fa
and kp that is exactly W^l's distribution, so B and W have the same scale and the
fa signal starts as large as bp's, so a learning rate tuned for bp carries over
(Akrout's sqrt(1/(fan_in+fan_out)) N(0, 1) has half that variance). For dfa the
bound depends on N_l + N_L only, so with one hidden layer B^1 has the
distribution of (W^2)^T: dfa with one hidden layer *is* fa, in distribution too
(784-500-10: U(±0.11), between Nøkland's U(±1/√N_l) = U(±0.045) and U(±1/√N_L) =
U(±0.32)). B is drawn from ``fold_in(key, 1)``, so even the params' own key gives
a B independent of W. sign has no B and no scale: sign(W) has entries ±1 where
W's are about ±0.06 (784-500-10), so its hidden-layer updates are correspondingly
larger than bp's; its learning rate may need lowering.

Alignment (``alignment``), per hidden layer l = 1..L-1, angles in degrees:
``arccos`` of a cosine clipped to [-1, 1], never NaN. Two vectors that are both
zero count as equal (0°); a zero vector against a nonzero one as orthogonal (90°).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from bpjax.activations import get_activation
from bpjax.losses import get_loss
from bpjax.network import Params, check_batch, forward, init_params, layer_sizes

Array = jax.Array
Feedback = Sequence[Array]  # the B matrices of a rule, in layer order

FEEDBACK_RULES = ("bp", "fa", "dfa", "sign", "kp")
_WHAT = {
    "bp": "no matrices (an empty list)",
    "sign": "no matrices (an empty list)",
    "fa": "one B^l shaped like W^l for l = 2..L",
    "kp": "one B^l shaped like W^l for l = 2..L",
    "dfa": "one B^l of shape (N_l, N_L) for each hidden layer l = 1..L-1",
}
_FEEDBACK_STREAM = 1  # fold_in(key, 1): B never repeats the draws of init_params(key)


def check_rule(rule: str) -> None:
    """Raises a one-line ValueError unless ``rule`` is one of :data:`FEEDBACK_RULES`."""
    if rule not in FEEDBACK_RULES:
        raise ValueError(
            f"unknown feedback rule {rule!r}: choose one of {', '.join(FEEDBACK_RULES)}"
        )


def feedback_shapes(sizes: tuple[int, ...], rule: str) -> list[tuple[int, int]]:
    """The shapes of ``rule``'s feedback matrices for a network of ``sizes``, in layer order."""
    check_rule(rule)
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must be at least two positive widths (n_0, ..., n_L), got {sizes}")
    L = len(sizes) - 1
    if rule in ("fa", "kp"):
        return [(sizes[l], sizes[l - 1]) for l in range(2, L + 1)]  # B^l like W^l
    if rule == "dfa":
        return [(sizes[l], sizes[L]) for l in range(1, L)]  # B^l: output error -> layer l
    return []


def init_feedback(
    key: Array, sizes: tuple[int, ...], rule: str, dtype: jnp.dtype = jnp.float32
) -> list[Array]:
    """The feedback matrices of ``rule`` (see the module docstring), in layer order.

    Args:
      key: PRNG key (the params' own key is fine: B is drawn from ``fold_in(key, 1)``).
      sizes: layer widths ``(n_0, ..., n_L)``.
      rule: one of :data:`FEEDBACK_RULES`.
      dtype: the matrices' dtype.

    Returns:
      fa, kp: ``[B^2, ..., B^L]``, B^l shaped like W^l; dfa: ``[B^1, ..., B^{L-1}]``,
      B^l ``(N_l, N_L)``; bp, sign: ``[]``. Each Glorot-uniform for its shape.
    """
    shapes = feedback_shapes(sizes, rule)
    if not shapes:
        return []
    keys = jax.random.split(jax.random.fold_in(key, _FEEDBACK_STREAM), len(shapes))
    # A one-layer network (n_in -> n_out) has W: (n_out, n_in), Glorot-uniform like W^l.
    return [init_params(k, (n_in, n_out), dtype)[0]["W"] for k, (n_out, n_in) in zip(
        keys, shapes, strict=True)]  # fmt: skip


def check_feedback(params: Params, feedback: Feedback | None, rule: str) -> list[Array]:
    """``feedback`` as a list; a one-line ValueError unless it fits ``rule`` and ``params``."""
    expected = feedback_shapes(layer_sizes(params), rule)
    given = [] if feedback is None else list(feedback)
    shapes = [tuple(getattr(B, "shape", ())) for B in given]
    if shapes != expected:
        raise ValueError(
            f"rule {rule!r} needs feedback of {_WHAT[rule]}, shapes {expected} "
            f"(bpjax.init_feedback(key, sizes, {rule!r})), got "
            f"{'None' if feedback is None else shapes}"
        )
    return given


def takes_output_error(rule: str) -> bool:
    """True when (7.2) multiplies the output error dZ^L (dfa), not dZ^{l+1}."""
    return rule == "dfa"


def backward_matrices(params: Params, feedback: Feedback, rule: str) -> list[Array]:
    """The matrix (7.2) multiplies for each hidden layer l = 1..L-1, in layer order.

    bp: (W^{l+1})^T; fa, kp: (B^{l+1})^T; sign: sign(W^{l+1})^T, all (N_l, N_{l+1});
    dfa: B^l, (N_l, N_L), applied to dZ^L (:func:`takes_output_error`).
    """
    if rule == "bp":
        return [p["W"].T for p in params[1:]]
    if rule == "sign":
        return [jnp.sign(p["W"]).T for p in params[1:]]
    if rule == "dfa":
        return list(feedback)
    return [B.T for B in feedback]


def error_rows(
    params: Params,
    feedback: Feedback,
    zs: list[Array],
    dZ_L: Array,
    sigma_prime: Callable[[Array], Array],
    rule: str,
) -> list[Array]:
    """(7.2) under ``rule`` in row layout, one sample per row (``privacy``, ``alignment``).

    ``zs[l]`` is Z^{l+1} ``(M, N_{l+1})``, ``dZ_L`` the output error rows ``(M, N_L)``;
    returns ``dZs`` with ``dZs[l]`` the rows of dZ^{l+1}. Row m is (G dZ_m) ⊙ σ'(Z_m), so
    the rows of the column formula (G dZ)^T are dZ G^T.
    """
    G = backward_matrices(params, feedback, rule)
    dZs: list[Array] = [None] * len(params)  # type: ignore[list-item]
    dZs[-1] = dZ_L
    for l in reversed(range(1, len(params))):
        signal = dZ_L if takes_output_error(rule) else dZs[l]
        dZs[l - 1] = (signal @ G[l - 1].T) * sigma_prime(zs[l - 1])    # (7.2), rows
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
    params: Params,
    feedback: Feedback | None,
    x: Array,
    y: Array,
    *,
    activation: str = "relu",
    loss: str = "softmax_cross_entropy",
    rule: str,
) -> dict[str, Array]:
    """How far ``rule``'s updates are from the true gradient, on the batch ``x: (M, n_0)``.

    One forward pass and two row-layout backward passes (rule and bp); no
    per-example gradient is formed. Jit it with ``activation``, ``loss``, ``rule`` static.

    Returns:
      A dict of ``(L-1,)`` arrays, entry i for hidden layer l = i + 1 (the output
      layer is exact under every rule and not reported):

      * ``"alignment_deg"``: ∠(dW^l_rule, ∇_{W^l} C), the batch update against the true
        gradient (the number to log per epoch);
      * ``"delta_deg_mean"``, ``"delta_deg_std"``: mean and standard deviation over the
        samples of ∠(δ^l_rule,m, δ^l_bp,m), the per-example error signals (rows of dZ^l).
        Sample m's update is δ_m (a_m)^T, so this is also the angle between its rule
        update and its true gradient: the factor a_m cancels;
      * ``"weight_deg"`` (fa, kp only): ∠(W^{l+1}, B^{l+1}), the B that carries the
        signal into layer l (every B of fa and kp does).

      Angles lie in [0, 180]: two zero vectors count as 0° (a sample whose units of
      layer l are all inactive has δ = 0 under every rule), a zero against a nonzero
      vector as 90°. bp reports 0 up to rounding (arccos near 1: about 1e-6° in
      float64, 0.03° in float32).
    """
    feedback = check_feedback(params, feedback, rule)
    check_batch(params, x, y)
    _, sigma_prime = get_activation(activation)
    zs, activations = forward(params, x, activation)
    dZ_L = get_loss(loss).error(zs[-1], y)                      # (7.1), per sample
    rows = error_rows(params, feedback, zs, dZ_L, sigma_prime, rule)
    true_rows = error_rows(params, [], zs, dZ_L, sigma_prime, "bp")
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
    if rule in ("fa", "kp"):
        report["weight_deg"] = stack(
            [angle_deg(params[l + 1]["W"].ravel(), feedback[l].ravel()) for l in hidden]
        )
    return report


def kp_feedback_grads(
    grads: Params, params: Params, feedback: Feedback, decay: float | Array
) -> tuple[Params, list[Array]]:
    """Kolen-Pollack: ``(param_grads, feedback_grads)`` for one optimizer step.

    W^l's gradient becomes dW^l + λ W^l (every layer; biases unchanged) and B^l's
    (l = 2..L, paired with W^l) is dW^l + λ B^l: the same update and the same decay,
    so plain SGD with learning rate η gives W^l_t - B^l_t = (1 - ηλ)^t (W^l_0 - B^l_0).
    ``grads`` are the kp rule's own (``manual_grad(..., rule="kp")``).
    """
    feedback = check_feedback(params, feedback, "kp")
    param_grads = [dict(g, W=g["W"] + decay * p["W"]) for g, p in zip(grads, params, strict=True)]
    feedback_grads = [g["W"] + decay * B for g, B in zip(grads[1:], feedback, strict=True)]
    return param_grads, feedback_grads
