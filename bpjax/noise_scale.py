r"""The gradient noise scale B_simple = tr(Σ)/|G|² from one batch, in the step's own backward pass.

McCandlish, Kaplan & Amodei 2018, "An Empirical Model of Large-Batch Training"
(arXiv:1812.06162). Let g_m be the gradient of sample m's *own* loss ℓ_m over all
weights and biases (no 1/M), G = E[g_m] the true gradient and Σ the covariance of
g_m over the data. A batch of B samples drawn independently has E|G_B|² = |G|² + tr(Σ)/B,
so two batch sizes give unbiased estimates of |G|² and tr(Σ) (their appendix A.1).
One batch of M samples holds both sizes: B_small = 1 (every g_m alone, averaged:
S = (1/M) Σ_m |g_m|²) and B_big = M (the batch-mean gradient G_M = (1/M) Σ_m g_m):

    |G|²     ≈ (M |G_M|² - S) / (M - 1)                                   (G)
    tr(Σ)    ≈ (S - |G_M|²) M / (M - 1)                                   (T)
    B_simple = tr(Σ) / |G|²                                               (B)

No second batch and no per-example gradient: S is eq. (N) of ``privacy.py``,
|g_m|² = Σ_l |dZ^l_m|² (|A^{l-1}_m|² + 1), read off the factors that section 7 already
holds (column m of dZ^l, which carries the batch mean's 1/M, times M), and |G_M|² is the
norm of the step's own gradient. Both sizes come from the same parameters, so there is
no drift between a "small" and a "big" batch (gpt-neox's sequential batches).

Averaging over steps. (G) and (T) are linear in ``(S, |G_M|²)`` at a fixed M, so
average ``mean_sq_norm`` and ``batch_sq_norm`` over steps (a mean or an EMA of each)
and apply :func:`noise_scale_estimates` once: that averages numerator and denominator
separately, as McCandlish et al. prescribe. The mean of per-step ``b_simple`` is a
biased ratio of noisy estimates and fails on steps where (G) is not positive.

Non-positive |G|². (G) is an unbiased estimate, not a norm: at small M, or where the
noise dominates (near a minimum), it can be ≤ 0. ``grad_sq_norm`` and ``trace_sigma``
are returned as computed, negative values included, so that averages over steps stay
unbiased; ``b_simple`` is NaN wherever ``grad_sq_norm`` ≤ 0 (this batch alone gives no
positive noise scale). ``trace_sigma`` ≥ 0 up to rounding, since S ≥ |G_M|² (Jensen).
M = 1 is refused: the two sizes coincide and (G), (T) divide by M - 1 = 0 (the
division by zero of mesh-transformer-jax#95).

Feedback rules. Under a rule other than bp, sample m's update is still
dZ^l_m (A^{l-1}_m)^T with the rule's own rows (``privacy.py``), so the same numbers
describe the noise of the rule's update (its "gradient" is the rule's dW). No anchor
measures that; McCandlish's link to the critical batch size is for true gradients.

Routes (:func:`noise_stats_grad_fn`):

* ``"manual"``: section 7's dZ^l and A^{l-1} through ``full_matrix_backward``'s ``tap``:
  per-column sums of squares, O(M Σ_l N_l) elementwise work against the GEMMs'
  O(M Σ_l N_l N_{l-1}), summed where the factors lie (no transpose copy), and one
  more pass over the gradient for |G_M|²; no extra matrix product. In a jitted SGD step
  of the 784-500-10 network (``experiments/bench_noise_scale.py``, a shared 2-core CPU):
  about +2-6 % of CPU time per step and per epoch at batch 128 and 1024.
* every other method: its own gradient, plus ``privacy.per_sample_errors``: a second
  forward pass (XLA merges it with the method's own where they coincide, as for
  ``autodiff``) and (7.2) in row layout for l ≥ 2 (none of (7.3)'s products); on
  784-500-10, ``autodiff`` + 4-6 % (one extra product, the output layer's (7.2)).

Precision: S and |G_M|² are summed in at least float32 (``losses.wide_dtype``). The
cancellation in (G) costs it a relative error of about eps · (1 + 2 B_simple / M), so
float32 (eps ≈ 1.2e-7) is fine unless B_simple exceeds ~1e4 · M.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bpjax.feedback import Feedback
from bpjax.formulas import manual_grad_and_output
from bpjax.losses import widen
from bpjax.methods import check_method, grad_fn
from bpjax.network import Net, Params, check_batch
from bpjax.privacy import (
    per_sample_errors,
    sq_norm,
    sq_norms_from_errors,
    sq_norms_from_factor_norms,
)
from bpjax.rules import Rule, get_rule

Array = jax.Array


class NoiseStats(NamedTuple):
    """The two raw per-batch quantities; average each over steps before estimating."""

    mean_sq_norm: Array  # S = (1/M) Σ_m |g_m|², the B_small = 1 size
    batch_sq_norm: Array  # |G_M|², the squared norm of the batch-mean gradient (B_big = M)


# (params, x, y, feedback=(), key=None) -> (grads, outputs, NoiseStats)
NoiseStatsGradFn = Callable[..., tuple[Params, Array, NoiseStats]]


def _check_batch_size(batch_size: int) -> int:
    if batch_size < 2:
        raise ValueError(
            f"the gradient noise scale needs a batch of at least 2 samples, got {batch_size}: "
            "at M = 1 its two batch sizes coincide and the estimators divide by M - 1 = 0"
        )
    return int(batch_size)


def _manual_route(
    net: Net, params: Params, x: Array, y: Array, *, rule: Rule, feedback: Feedback | None,
    key: Array | None,
) -> tuple[Params, Array, Array]:
    """Section 7's gradient and, from its own factors, the ``(M,)`` |g_m|² of eq. (N)."""
    col_sq = lambda a_NxM: jnp.sum(jnp.square(widen(a_NxM)), axis=0)  # noqa: E731 ||column m||²
    dZ_sq: list[Array] = [None] * len(params)  # type: ignore[list-item]
    A_sq: list[Array] = [None] * len(params)  # type: ignore[list-item]

    def tap(l: int, dZ: Array, A: Array) -> None:
        dZ_sq[l] = col_sq(dZ)                                   # (M,) ||dZ^{l+1}_m||²
        # A^0 = X = x.T is a view: its columns are x's rows (summing the view copies x).
        A_sq[l] = col_sq(A) if l > 0 else jnp.sum(jnp.square(widen(x)), axis=1)  # ||A^l_m||²

    kw = dict(rule=rule, feedback=feedback, key=key)
    grads, Z_L = manual_grad_and_output(net, params, x, y, tap=tap, **kw)
    # Section 7's dZ^l carries the batch mean's 1/M, (7.1); sample m's own loss has none.
    sq_M = x.shape[0] ** 2 * sq_norms_from_factor_norms(dZ_sq, A_sq)  # (N)
    return grads, Z_L, sq_M


def noise_stats_grad_fn(
    net: Net,
    method: str = "manual",
    *,
    rule: str | Rule = "bp",
) -> NoiseStatsGradFn:
    """``methods.grad_fn`` that also returns the batch's :class:`NoiseStats`.

    Returns ``fn(params, x, y, feedback=(), key=None) -> (grads, outputs, stats)``:
    ``grads`` and ``outputs`` exactly as ``grad_fn(net, method, ...)`` gives them, ``stats`` the
    ``NoiseStats(S, |G_M|²)`` of the batch ``x: (M, n_0)``, M ≥ 2. A pure function of
    arrays, ready for ``jax.jit``. ``"manual"`` takes S from the same backward pass;
    the other methods add ``privacy.per_sample_errors`` (see the module docstring).
    """
    rule = get_rule(rule)
    check_method(method, rule)
    grads_of = grad_fn(net, method, rule=rule)

    def fn(
        params: Params, x: Array, y: Array, feedback: Feedback = (), key: Array | None = None
    ) -> tuple[Params, Array, NoiseStats]:
        check_batch(net, params, x, y)
        _check_batch_size(x.shape[0])
        kw = dict(rule=rule, feedback=feedback, key=key)
        if method == "manual":
            grads, Z_L, sq_M = _manual_route(net, params, x, y, **kw)
        else:
            grads, Z_L = grads_of(params, x, y, feedback, key)
            dZs, activations, _ = per_sample_errors(net, params, x, y, **kw)
            sq_M = sq_norms_from_errors(dZs, activations)                # (N)
        return grads, Z_L, NoiseStats(jnp.mean(sq_M), sq_norm(grads))

    return fn


def noise_scale_estimates(stats: NoiseStats, batch_size: int) -> dict[str, Array]:
    """Equations (G), (T), (B) from ``stats`` of batches of ``batch_size`` (a Python int).

    ``stats`` may be one batch's or an average over steps (of the same batch size).
    Returns a dict of arrays shaped like ``stats``' fields: ``b_simple`` (NaN where
    ``grad_sq_norm`` ≤ 0), ``trace_sigma`` (T), ``grad_sq_norm`` (G), and the inputs
    ``mean_sq_norm`` (S) and ``batch_sq_norm`` (|G_M|²). A one-line ValueError for M < 2.
    """
    M = _check_batch_size(batch_size)
    S, G_M_sq = jnp.asarray(stats.mean_sq_norm), jnp.asarray(stats.batch_sq_norm)
    grad_sq = (M * G_M_sq - S) / (M - 1)                                 # (G)
    trace = (S - G_M_sq) * M / (M - 1)                                   # (T)
    return {
        "b_simple": jnp.where(grad_sq > 0, trace / grad_sq, jnp.nan),    # (B)
        "trace_sigma": trace,
        "grad_sq_norm": grad_sq,
        "mean_sq_norm": S,
        "batch_sq_norm": G_M_sq,
    }


def gradient_noise_scale(
    net: Net,
    params: Params,
    x: Array,
    y: Array,
    *,
    rule: str | Rule = "bp",
    feedback: Feedback | None = None,
    key: Array | None = None,
) -> dict[str, Array]:
    """B_simple and its parts from the one batch ``x: (M, n_0)``, M ≥ 2 (module docstring).

    Returns :func:`noise_scale_estimates`' dict of scalars: ``b_simple``, ``trace_sigma``,
    ``grad_sq_norm``, ``mean_sq_norm``, ``batch_sq_norm``. One forward and one section 7
    backward pass; no per-example gradient. Under ``rule``, of the rule's updates.
    Jit it with ``net`` and ``rule`` static.
    """
    fn = noise_stats_grad_fn(net, "manual", rule=rule)
    _, _, stats = fn(params, x, y, feedback, key)
    return noise_scale_estimates(stats, x.shape[0])
