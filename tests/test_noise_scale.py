"""The gradient noise scale (``bpjax.noise_scale``) against brute force and known answers.

Float64 in a scoped ``jax.enable_x64``. The reference per-example gradients are
``jax.vmap(jax.grad(loss_fn))`` on single samples (or, under a feedback rule, the
single-sample ``manual_grad`` under ``jax.vmap``), flattened in NumPy, and McCandlish's
estimators are written out again in NumPy. Known answers: identical samples (tr(Σ) = 0,
B_simple = 0), a linear model whose per-example gradients are closed-form outer
products, the expectation of the estimators over every batch drawn from a finite
population (they are unbiased: exact, no Monte Carlo), and g_1 = -g_2 (|G|² estimate
< 0, so B_simple is NaN). The cases of one test share one ``jax.jit`` (compilation is
what these tests spend; see ``test_formulas.py``), with LLVM's optimisation off.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax
from bpjax import noise_scale
from bpjax.feedback import feedback_shapes
from bpjax.formulas import manual_grad
from bpjax.methods import METHODS, grad_fn
from bpjax.network import Net, layer_sizes, loss_fn

# The estimators subtract quantities of order one: (G) loses a few digits when the noise
# dominates, so 1e-8 relative leaves ~1e5 of float64's 1e-16 for that cancellation.
RTOL, ATOL = 1e-8, 1e-14
FAST_COMPILE = {"xla_backend_optimization_level": 0}
KEYS = ("b_simple", "trace_sigma", "grad_sq_norm", "mean_sq_norm", "batch_sq_norm")


def _problem(sizes, loss, m, seed=0):
    """NumPy float64 ``(params, x, y)``: Glorot-like W, nonzero b, Gaussian x."""
    rng = np.random.default_rng(seed)
    params = [{"W": rng.normal(size=(n_out, n_in)) / np.sqrt(n_in),
               "b": 0.3 * rng.normal(size=(n_out,))}
              for n_in, n_out in itertools.pairwise(sizes)]  # fmt: skip
    x = rng.normal(size=(m, sizes[0]))
    if loss == "softmax_cross_entropy":
        y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], size=m)]
    else:
        y = rng.normal(size=(m, sizes[-1]))
    return params, x, y


def _jit_all(fn, statics, arrays):
    """``[fn(*s, *a) ...]`` for every case under one ``jax.jit``; NumPy results."""
    run = lambda arrays: [fn(*s, *a) for s, a in zip(statics, arrays, strict=True)]  # noqa: E731
    return jax.tree.map(np.asarray, jax.jit(run, compiler_options=FAST_COMPILE)(arrays))


def _flat(grads_M):
    """Per-example gradient pytree (leading axis M) -> ``(M, #params)`` NumPy."""
    return np.concatenate([np.reshape(g, (g.shape[0], -1)) for g in jax.tree.leaves(grads_M)], 1)


def _numpy_estimates(g_MxP):
    """McCandlish et al., appendix A.1, with B_small = 1 and B_big = M, in NumPy."""
    M = g_MxP.shape[0]
    S = np.mean(np.sum(g_MxP**2, axis=1))          # mean_m |g_m|²
    G_M_sq = np.sum(np.mean(g_MxP, axis=0) ** 2)    # |G_M|², the batch mean's norm
    grad_sq = (M * G_M_sq - S) / (M - 1)
    trace = (S - G_M_sq) * M / (M - 1)
    b = trace / grad_sq if grad_sq > 0 else np.nan
    return dict(b_simple=b, trace_sigma=trace, grad_sq_norm=grad_sq, mean_sq_norm=S,
                batch_sq_norm=G_M_sq)  # fmt: skip


def _assert_estimates(got, expected, msg=""):
    for k in KEYS:
        np.testing.assert_allclose(got[k], expected[k], rtol=RTOL, atol=ATOL, err_msg=f"{msg} {k}")


def net_of(params, activation="relu", loss="softmax_cross_entropy"):
    """The MLP whose params these are (its widths read off the weights' shapes)."""
    return Net.mlp(layer_sizes(params), activation, loss)


def _per_example_grads(params, x, y, activation, loss):
    one = functools.partial(loss_fn, net_of(params, activation, loss))
    return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)


CASES = [  # sizes, activation, loss, M: depths 1-4, widths of 1, M from 2 to 64
    ((5, 7, 3), "relu", "softmax_cross_entropy", 2),
    ((4, 6, 5, 3), "tanh", "squared_error", 3),
    ((6, 4, 8, 5, 2), "sigmoid", "softmax_cross_entropy", 16),
    ((3, 2), "identity", "squared_error", 64),
    ((1, 5, 2, 4), "tanh", "softmax_cross_entropy", 7),
    ((3, 1, 4), "relu", "squared_error", 33),
]


def test_estimates_equal_brute_force_from_per_example_gradients():
    def case(activation, loss, params, x, y):
        net = net_of(params, activation, loss)
        return bpjax.gradient_noise_scale(net, params, x, y), _per_example_grads(
            params, x, y, activation, loss
        )

    with jax.enable_x64(True):
        problems = [_problem(sizes, loss, m, seed=i) for i, (sizes, _, loss, m) in enumerate(CASES)]
        results = _jit_all(case, [(a, lo) for _, a, lo, _ in CASES], problems)
    positive = 0
    for (sizes, activation, loss, m), (got, grads_M) in zip(CASES, results, strict=True):
        expected = _numpy_estimates(_flat(grads_M))
        assert all(np.shape(got[k]) == () for k in KEYS)
        positive += expected["grad_sq_norm"] > 0  # else b_simple is NaN in both
        _assert_estimates(got, expected, f"{sizes} {activation} {loss} M={m}")
        # Negative control: a 1% error in S (the per-example side) must fail the check.
        planted = dict(got, mean_sq_norm=got["mean_sq_norm"] * 1.01)
        with pytest.raises(AssertionError):
            _assert_estimates(planted, expected)
    assert 0 < positive < len(CASES)  # both sides of (B): a number, and NaN (|G|² est. < 0)


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "squared_error"])
def test_every_method_gives_the_gradient_and_the_same_stats_in_one_pass(loss):
    # noise_stats_grad_fn(method): grads and outputs exactly grad_fn(method)'s, and the
    # stats of the standalone gradient_noise_scale, for every method (manual: section 7's
    # own factors; the others: privacy.per_sample_errors beside the method's gradient).
    def case(params, x, y):
        net = net_of(params, "tanh", loss)
        out = {m: (bpjax.noise_stats_grad_fn(net, m)(params, x, y),
                   grad_fn(net, m)(params, x, y)) for m in METHODS}  # fmt: skip
        estimates = {m: bpjax.noise_scale_estimates(out[m][0][2], x.shape[0]) for m in METHODS}
        return out, estimates, bpjax.gradient_noise_scale(net, params, x, y)

    with jax.enable_x64(True):
        ((out, estimates, standalone),) = _jit_all(case, [()], [_problem((4, 6, 5, 3), loss, 9)])
    for method, ((grads, outputs, stats), (plain_grads, plain_outputs)) in out.items():
        assert isinstance(stats, noise_scale.NoiseStats)
        pairs = zip(jax.tree.leaves((grads, outputs)),
                    jax.tree.leaves((plain_grads, plain_outputs)), strict=True)  # fmt: skip
        for got, want in pairs:
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=method)
        np.testing.assert_allclose(stats.mean_sq_norm, standalone["mean_sq_norm"], rtol=RTOL)
        np.testing.assert_allclose(stats.batch_sq_norm, standalone["batch_sq_norm"], rtol=RTOL)
        _assert_estimates(estimates[method], standalone, method)


RULE_CASES = [
    ("fa", (5, 7, 6, 3), "tanh", "softmax_cross_entropy", 5),
    ("kp", (4, 6, 3), "relu", "squared_error", 12),
    ("dfa", (6, 4, 8, 5, 2), "sigmoid", "softmax_cross_entropy", 8),
    ("sign", (5, 7, 6, 3), "relu", "softmax_cross_entropy", 2),
]


def test_rule_noise_scale_equals_brute_force_from_vmapped_rule_updates():
    # Under a rule, g_m is sample m's rule update: the single-sample manual_grad under vmap.
    def case(rule, activation, loss, params, x, y, feedback):
        net = net_of(params, activation, loss)
        one = lambda xm, ym: manual_grad(net, params, xm, ym, rule=rule, feedback=feedback)  # noqa: E731
        gns = functools.partial(bpjax.gradient_noise_scale, net, params, x, y)
        stats = {m: bpjax.noise_stats_grad_fn(net, m, rule=rule)(params, x, y, feedback)[2]
                 for m in ("manual_vmap", "per_sample")}  # fmt: skip
        return gns(rule=rule, feedback=feedback), jax.vmap(one)(x, y), stats, gns()

    statics, arrays = [], []
    with jax.enable_x64(True):
        for i, (rule, sizes, activation, loss, m) in enumerate(RULE_CASES):
            rng = np.random.default_rng(10 + i)
            feedback = [rng.uniform(-0.5, 0.5, s) for s in feedback_shapes(sizes, rule)]
            statics.append((rule, activation, loss))
            arrays.append((*_problem(sizes, loss, m, seed=i), feedback))
        results = _jit_all(case, statics, arrays)
    for (rule, *_), (got, updates_M, stats, bp) in zip(RULE_CASES, results, strict=True):
        expected = _numpy_estimates(_flat(updates_M))
        _assert_estimates(got, expected, rule)
        for method, s in stats.items():
            np.testing.assert_allclose(s, (got["mean_sq_norm"], got["batch_sq_norm"]),
                                       rtol=RTOL, err_msg=f"{rule} {method}")  # fmt: skip
        # Negative control: the true gradients' statistics are not the rule's.
        with pytest.raises(AssertionError):
            _assert_estimates(bp, expected)


def test_identical_samples_have_no_noise():
    # Every g_m equal: S = |G_M|², so tr(Σ) = 0 and B_simple = 0 (up to rounding), |G|² = S.
    with jax.enable_x64(True):
        params, x, y = _problem((4, 6, 5, 3), "softmax_cross_entropy", 1)
        x, y = np.repeat(x, 6, axis=0), np.repeat(y, 6, axis=0)
        fn = jax.jit(functools.partial(bpjax.gradient_noise_scale, net_of(params, "tanh")))
        got = jax.tree.map(np.asarray, fn(params, x, y))
    S = got["mean_sq_norm"]
    assert S > 0.1
    assert abs(got["trace_sigma"]) <= 1e-14 * S and abs(got["b_simple"]) <= 1e-14
    np.testing.assert_allclose(got["grad_sq_norm"], S, rtol=1e-14)


def _linear(n_in, n_out, m, seed):
    """One layer (W, b), squared error: g_m = r_m ⊗ [x_m; 1], r_m = W x_m + b - y_m."""
    rng = np.random.default_rng(seed)
    params = [{"W": rng.normal(size=(n_out, n_in)), "b": rng.normal(size=(n_out,))}]
    return params, rng.normal(size=(m, n_in)), rng.normal(size=(m, n_out))


def _linear_grads(params, x, y):
    r = x @ params[0]["W"].T + params[0]["b"] - y                   # (M, n_out) residuals
    return np.concatenate([np.einsum("mo,mi->moi", r, x).reshape(len(x), -1), r], axis=1)


def test_linear_model_closed_form_and_a_negative_grad_estimate_gives_nan():
    with jax.enable_x64(True):
        params, x, y = _linear(3, 2, 5, seed=0)
        gns = jax.jit(functools.partial(bpjax.gradient_noise_scale,
                                        net_of(params, loss="squared_error")))  # fmt: skip
        got = jax.tree.map(np.asarray, gns(params, x, y))
        # g_1 = -g_2: the same input, targets mirrored about the prediction, so G_M = 0 and
        # the |G|² estimate is (0 - S) / 1 < 0: returned as computed, B_simple NaN.
        x2 = np.repeat(x[:1], 2, axis=0)
        pred = x2[0] @ params[0]["W"].T + params[0]["b"]
        y2 = np.stack([pred + 0.7, pred - 0.7])
        mirrored = jax.tree.map(np.asarray, gns(params, x2, y2))
    _assert_estimates(got, _numpy_estimates(_linear_grads(params, x, y)), "linear")
    S = 0.7**2 * 2 * (np.sum(x2[0] ** 2) + 1)                         # |r|² (|x|² + 1)
    np.testing.assert_allclose(mirrored["mean_sq_norm"], S, rtol=1e-12)
    np.testing.assert_allclose(mirrored["grad_sq_norm"], -S, rtol=1e-12)
    np.testing.assert_allclose(mirrored["trace_sigma"], 2 * S, rtol=1e-12)
    assert np.isnan(mirrored["b_simple"])


@pytest.mark.parametrize("pop,m", [(3, 2), (4, 3)])
def test_estimators_are_unbiased_over_every_batch_of_a_finite_population(pop, m):
    # Batches of m samples drawn independently and uniformly from `pop` fixed samples: the
    # pop**m ordered batches are equally likely, so their average is the exact expectation.
    # The truth: G = the population's mean gradient, tr(Σ) = mean_k |g_k|² - |G|².
    activation, loss = "sigmoid", "softmax_cross_entropy"
    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def everything(params, x_pop, y_pop, idx):
        net = net_of(params, activation, loss)
        gns = jax.vmap(lambda i: bpjax.gradient_noise_scale(net, params, x_pop[i], y_pop[i]))
        return gns(idx), _per_example_grads(params, x_pop, y_pop, activation, loss)

    idx = np.array(list(itertools.product(range(pop), repeat=m)))  # (pop**m, m)
    with jax.enable_x64(True):
        params, x_pop, y_pop = _problem((3, 4, 3), loss, pop, seed=pop)
        est, grads_pop = jax.tree.map(np.asarray, everything(params, x_pop, y_pop, idx))
    g = _flat(grads_pop)
    true_grad_sq = np.sum(np.mean(g, axis=0) ** 2)
    true_trace = np.mean(np.sum(g**2, axis=1)) - true_grad_sq
    assert true_trace > 0.1 * true_grad_sq > 0
    np.testing.assert_allclose(np.mean(est["grad_sq_norm"]), true_grad_sq, rtol=1e-10)
    np.testing.assert_allclose(np.mean(est["trace_sigma"]), true_trace, rtol=1e-10)
    # Negative control: the plug-in |G_M|² is biased by exactly tr(Σ)/M (E|G_B|² = |G|² + tr(Σ)/B).
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(np.mean(est["batch_sq_norm"]), true_grad_sq, rtol=1e-10)
    np.testing.assert_allclose(np.mean(est["batch_sq_norm"]), true_grad_sq + true_trace / m,
                               rtol=1e-10)  # fmt: skip


def test_one_sample_is_refused_in_one_line():
    params, x, y = _problem((3, 4, 2), "squared_error", 1)
    params, x, y = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (params, x, y))
    net = net_of(params, loss="squared_error")
    calls = [
        lambda: bpjax.gradient_noise_scale(net, params, x, y),
        lambda: bpjax.noise_stats_grad_fn(net, "autodiff")(params, x, y),
        lambda: bpjax.noise_scale_estimates(bpjax.NoiseStats(1.0, 0.5), 1),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="at least 2 samples, got 1") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"x must be a batch \(M, n_0\)"):
        bpjax.gradient_noise_scale(net, params, x[0], y[0])
    with pytest.raises(ValueError, match="cannot use rule"):
        bpjax.noise_stats_grad_fn(net, "autodiff", rule="fa")


def test_float32_under_jit_compiles_once_per_shape():
    traces = []

    def step(params, x, y):
        traces.append(1)
        return bpjax.noise_stats_grad_fn(net_of(params), "manual")(params, x, y)

    jitted = jax.jit(step)
    params, x, y = _problem((5, 7, 3), "softmax_cross_entropy", 8)
    params, x, y = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (params, x, y))
    _, _, a = jitted(params, x, y)
    _, _, b = jitted(params, 2 * x, y)
    assert len(traces) == 1
    assert a.mean_sq_norm.dtype == jnp.float32 and a.mean_sq_norm != b.mean_sq_norm
    with jax.enable_x64(True):
        ref = _numpy_estimates(_flat(_per_example_grads(
            *jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), (params, x, y)),
            "relu", "softmax_cross_entropy")))  # fmt: skip
    est = bpjax.noise_scale_estimates(a, 8)
    for k in KEYS:  # float32 arithmetic on the same inputs: about 1e-6 relative
        np.testing.assert_allclose(est[k], ref[k], rtol=1e-4, err_msg=k)
