"""bfloat16 mixed precision (``grad_fn(..., compute_dtype="bfloat16")``) against float32.

The definition (``bpjax.methods``): float32 parameters in, float32 grads and outputs
out; the matrix products in bfloat16; the loss, the softmax and the output error
(7.1) in float32. What is proved here, every comparison under ``jax.jit``:

1. every method, and the fa and dfa rules of the hand-written ones, give a bfloat16
   gradient that agrees with the float32 one to bfloat16 tolerance (``TOL16``,
   derived below), in the params' pytree and float32; a planted 10% error fails;
   section 8's running sum (``per_sample``) is kept in float32;
2. the output error is float32: logits so confident that a bfloat16 softmax rounds
   p to 1 still give the right gradient, and the same check fails when the loss is
   swapped for one that does not upcast (the negative control); and the program
   itself asks for what the definition says: every matrix product takes bfloat16
   operands, every exp and log (the softmax) float32 ones;
3. DP-SGD (``private_grad_fn``) likewise, norms in float32;
4. for float32 and float64 (``compute_dtype`` the params' own, or None) the
   lowered program is byte for byte the one without ``compute_dtype``.

The float32 references run with ``jax.default_matmul_precision("highest")`` (the
``highest_matmul_precision`` fixture of ``conftest.py``): on a GPU (TF32) or TPU
(bfloat16 passes) the default float32 product is itself reduced, and the reference
must be float32. The bfloat16 runs use the default precision, as training does.
"""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax
from bpjax import losses, methods, privacy

METHODS = methods.METHODS
SIZES = (16, 32, 24, 10)  # depth 3: products of length 16, 32, 24 and M
M = 32
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # as in test_formulas.py
BF16 = "bfloat16"

# Tolerance, per leaf, relative to the leaf's largest entry. bfloat16 keeps 8
# significant bits: eps = 2^-8 = 3.9e-3, unit roundoff u = 2^-9 = 2.0e-3. XLA
# accumulates each bfloat16 product in float32 (CPU: convert, f32 dot, round; GPU
# tensor cores likewise), so a product of length n costs no n*u (or sqrt(n)*u) of
# summation error, only its operands' and its result's roundings: about 3u relative
# to the size of the summed terms. Along the chain (input casts, 3 forward products,
# the output error cast once, 2 products (7.2), the products (7.3)) about 7 such
# stages compound: 7 * 3u = 4e-2 if every rounding lined up, sqrt(7) * 3u = 1.6e-2
# for independent ones. That is relative to the summed terms |dZ_m| |A_m|: where the
# batch sum cancels (random labels, large M) the gradient is smaller than its terms
# and the error relative to it larger (6% in W^1 at M = 256 on this network). At
# M = 32 here the sum cancels little: measured at most 1.3e-2 (W^1, at the end of the
# chain). 3e-2 is twice the independent estimate and still sees a 10% error in any
# leaf three times over.
TOL16 = 3e-2

def net_of(params, activation="relu", loss="softmax_cross_entropy"):
    """The MLP whose params these are (its widths read off the weights' shapes)."""
    return bpjax.Net.mlp(bpjax.layer_sizes(params), activation, loss)


def make_problem(loss, seed=0, sizes=SIZES, m=M):
    """NumPy float32 ``(params, x, y)``: Glorot-uniform W, nonzero b, Gaussian x."""
    rng = np.random.default_rng(seed)
    params = []
    for n_in, n_out in itertools.pairwise(sizes):
        u = np.sqrt(6.0 / (n_in + n_out))
        params.append({"W": rng.uniform(-u, u, (n_out, n_in)), "b": rng.normal(0, 0.5, n_out)})
    x = rng.normal(size=(m, sizes[0]))
    if loss == "softmax_cross_entropy":
        y = np.eye(sizes[-1])[rng.integers(sizes[-1], size=m)]
    else:
        y = rng.normal(size=(m, sizes[-1]))
    return jax.tree.map(lambda a: np.asarray(a, np.float32), (params, x, y))


def make_feedback(rule, seed=1):
    rng = np.random.default_rng(seed)
    shapes = bpjax.feedback.feedback_shapes(SIZES, rule)
    return [rng.uniform(-0.3, 0.3, s).astype(np.float32) for s in shapes]


# Every method with bp; the hand-written ones with fa and dfa too.
CASES = [(m, "bp") for m in METHODS] + [
    (m, r) for r in ("fa", "dfa") for m in methods.RULE_METHODS
]


def all_grads(compute_dtype, kw, params, x, y, feedbacks):
    """``{(method, rule): (grads, outputs)}`` of every case, for one jit."""
    return {
        (m, r): methods.grad_fn(net_of(params, **kw), m, rule=r, compute_dtype=compute_dtype)(
            params, x, y, feedbacks[r]
        )
        for m, r in CASES
    }


def assert_close_to_max(actual, expected, tol, what=""):
    """Same structure, shapes, dtypes; per leaf max |actual - expected| <= tol max |expected|."""
    chex.assert_trees_all_equal_structs(actual, expected)
    chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)
    leaves = jax.tree_util.tree_leaves_with_path(expected)
    for (path, e), a in zip(leaves, jax.tree.leaves(actual), strict=True):
        where = what + jax.tree_util.keystr(path)
        scale = float(np.max(np.abs(e)))
        err = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64))))
        assert scale > 0, f"{where}: all zero, nothing compared"
        assert err <= tol * scale, (
            f"{where}: max error {err:.3g} > {tol} x max |expected| {scale:.3g} "
            f"({err / scale:.3g} relative)"
        )


def plant_error(grads, layer, leaf, factor):
    planted = [dict(g) for g in grads]
    planted[layer][leaf] = planted[layer][leaf] * factor
    return planted


# ------------------------------------------------------------------ 1. agreement with float32


@pytest.mark.parametrize(
    ("activation", "loss"), [("relu", "softmax_cross_entropy"), ("tanh", "squared_error")]
)
def test_bfloat16_gradient_agrees_with_float32_every_method_and_rule(
    activation, loss, highest_matmul_precision
):
    kw = dict(activation=activation, loss=loss)
    params, x, y = make_problem(loss)
    feedbacks = {"bp": (), "fa": make_feedback("fa"), "dfa": make_feedback("dfa")}
    run = lambda dtype: jax.jit(  # noqa: E731
        lambda *a: all_grads(dtype, kw, *a), compiler_options=FAST_COMPILE
    )
    expected = run(None)(params, x, y, feedbacks)  # float32, "highest" (the fixture)
    with jax.default_matmul_precision("default"):  # bfloat16 as training runs it
        got = run(BF16)(params, x, y, feedbacks)
        # x may arrive in bfloat16 already (a dataset stored so): the same program's answer.
        got_x16 = jax.jit(methods.grad_fn(net_of(params, **kw), "manual", compute_dtype=BF16))(
            params, jnp.asarray(x, jnp.bfloat16), y
        )
    for case, (grads, outputs) in got.items():
        grads32, outputs32 = expected[case]
        # float32 out, the params' pytree: assert_close_to_max checks dtypes against float32.
        assert_close_to_max(grads, grads32, TOL16, what=f"{case} grads ")
        assert_close_to_max(outputs, outputs32, TOL16, what=f"{case} outputs ")
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
    chex.assert_trees_all_equal(got_x16, got[("manual", "bp")])
    # Negative control: a 10% error in any one leaf fails the same check, naming it.
    grads32 = expected[("manual", "bp")][0]
    for layer, leaf in ((0, "W"), (1, "b"), (2, "W")):
        planted = plant_error(got[("manual", "bp")][0], layer, leaf, 1.1)
        with pytest.raises(AssertionError, match=rf"\[{layer}\]\['{leaf}'\]"):
            assert_close_to_max(planted, grads32, TOL16)


def test_section_8_running_sum_is_float32():
    # per_sample adds M per-example gradients one by one. In a bfloat16 accumulator
    # each addend is rounded to 2^-9 of the running total, M times: at M = 1024 the last
    # layer's gradient came out 54% off. In float32 the sum is as good as (7.3)'s
    # product, which XLA accumulates in float32: per_sample equals manual to TOL16
    # (measured 4e-3), for the gradient and for DP-SGD's clipped sum alike.
    params, x, y = make_problem("softmax_cross_entropy", m=1024)

    def both(params, x, y):
        net = net_of(params)
        grad = {m: methods.grad_fn(net, m, compute_dtype=BF16)(params, x, y)[0]
                for m in ("manual", "per_sample")}  # fmt: skip
        dp = {m: privacy.private_grad_fn(net, m, clip=1.0, compute_dtype=BF16)(
            params, x, y, None)[0] for m in ("manual", "per_sample")}  # fmt: skip
        return grad, dp

    grad, dp = jax.jit(both, compiler_options=FAST_COMPILE)(params, x, y)
    assert_close_to_max(grad["per_sample"], grad["manual"], TOL16, what="grad ")
    assert_close_to_max(dp["per_sample"], dp["manual"], TOL16, what="private_grad ")


# ------------------------------------------------------------------ 2. the output error is float32


def confident_problem():
    """One layer (10 -> 10) whose logits give the true class p = 0.999 to 0.9998.

    x = one-hot(label) + 5% noise, W = 10 I + 5% noise: the true logit is about 10,
    the others about 0, so 1 - p = 2e-4 to 1e-3. In bfloat16, p cannot be nearer
    1 than 2^-8 = 3.9e-3: a bfloat16 softmax rounds it to 1.0, and the true class's
    output error p - 1 to 0.
    """
    rng = np.random.default_rng(0)
    n, m = 10, 16
    labels = rng.integers(0, n, m)
    x = np.eye(n)[labels] + 0.05 * rng.normal(size=(m, n))
    params = [{"W": 10 * np.eye(n) + 0.05 * rng.normal(size=(n, n)),
               "b": 0.1 * rng.normal(size=n)}]  # fmt: skip
    return jax.tree.map(lambda a: np.asarray(a, np.float32), (params, x, np.eye(n)[labels]))


# The logits (about 10) are bfloat16 products: rounded to its spacing 2^-4 near 10,
# they move by up to 0.03, and 1 - p = Σ_k exp(z_k - z_true) by up to about 3% per
# sample, 5.5% measured in the worst leaf. 0.15 is about three times that; without
# the float32 softmax the true class's error vanishes and the gradient is >= 100% off.
TOL_CONFIDENT = 0.15


def test_output_error_is_float32_confident_logits(monkeypatch, highest_matmul_precision):
    params, x, y = confident_problem()
    net = net_of(params)
    both = lambda dtype: jax.jit(  # noqa: E731
        lambda p, x, y: {m: methods.grad_fn(net, m, compute_dtype=dtype)(p, x, y)[0]
                         for m in METHODS},
        compiler_options=FAST_COMPILE,
    )
    expected = both(None)(params, x, y)
    with jax.default_matmul_precision("default"):
        got = both(BF16)(params, x, y)
    for method in METHODS:
        assert_close_to_max(got[method], expected[method], TOL_CONFIDENT, what=f"{method} ")
    # Negative control: the same loss without the float32 upcast (softmax in bfloat16)
    # fails this check, for every method.
    raw = losses.Loss(losses._softmax_xent, losses._softmax_xent_error)
    monkeypatch.setitem(losses.LOSSES, "softmax_cross_entropy", raw)
    with jax.default_matmul_precision("default"):
        bf16_softmax = both(BF16)(params, x, y)
    for method in METHODS:
        with pytest.raises(AssertionError, match="relative"):
            assert_close_to_max(bf16_softmax[method], expected[method], TOL_CONFIDENT)


def all_eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs inside it (scan, jit, custom_jvp)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from all_eqns(inner)


def operand_dtypes(jaxpr, primitives):
    """``{dtype name}`` of the operands of every equation whose primitive is in ``primitives``."""
    return {
        str(v.aval.dtype)
        for eqn in all_eqns(jaxpr)
        if eqn.primitive.name in primitives
        for v in eqn.invars
        if hasattr(v, "aval")
    }


def assert_mixed_precision_program(jaxpr, what):
    products = operand_dtypes(jaxpr, {"dot_general"})
    softmax = operand_dtypes(jaxpr, {"exp", "log"})
    assert products == {"bfloat16"}, f"{what}: matrix products take {products}"
    assert softmax == {"float32"}, f"{what}: the softmax's exp/log take {softmax}"


def test_program_products_in_bfloat16_softmax_in_float32():
    # relu hidden layers: the only exp and log are the softmax's (and log_softmax's).
    params, x, y = make_problem("softmax_cross_entropy")
    feedbacks = {"bp": (), "fa": make_feedback("fa"), "dfa": make_feedback("dfa")}
    for method, rule in CASES:
        fn = methods.grad_fn(net_of(params), method, rule=rule, compute_dtype=BF16)
        jaxpr = jax.make_jaxpr(fn)(params, x, y, feedbacks[rule]).jaxpr
        assert_mixed_precision_program(jaxpr, f"{method}, {rule}")
    fn = privacy.private_grad_fn(net_of(params), "manual", clip=1.0, noise_multiplier=1.0,
                                 compute_dtype=BF16)  # fmt: skip
    jaxpr = jax.make_jaxpr(fn)(params, x, y, jax.random.key(0)).jaxpr
    assert_mixed_precision_program(jaxpr, "private_grad_fn manual")
    # Negative controls: the float32 program, and a loss whose softmax runs in bfloat16.
    jaxpr32 = jax.make_jaxpr(methods.grad_fn(net_of(params), "manual"))(params, x, y).jaxpr
    with pytest.raises(AssertionError, match=r"matrix products take \{'float32'\}"):
        assert_mixed_precision_program(jaxpr32, "float32")
    z16 = jnp.zeros((M, SIZES[-1]), jnp.bfloat16)
    bf16_loss = jax.make_jaxpr(jax.grad(lambda z: losses._softmax_xent(z @ z.T @ z, y).sum()))
    with pytest.raises(AssertionError, match=r"exp/log take \{'bfloat16'\}"):
        assert_mixed_precision_program(bf16_loss(z16).jaxpr, "bfloat16 softmax")


# ------------------------------------------------------------------ 3. DP-SGD


def test_private_grad_bfloat16_agrees_with_float32_norms_in_float32(highest_matmul_precision):
    kw = dict(activation="relu", loss="softmax_cross_entropy")
    params, x, y = make_problem(kw["loss"])
    key = jax.random.key(0)
    # Clip at about the median per-example norm: half the examples are clipped.
    net = net_of(params, **kw)
    clip = float(np.median(privacy.per_example_grad_norms(net, params, x, y)))
    cases = [(m, "bp", 0.0) for m in METHODS] + [("manual", "fa", 0.0), ("manual", "bp", 1.0)]
    feedbacks = {"bp": (), "fa": make_feedback("fa")}

    def run(dtype):
        def fn(params, x, y, key):
            out = {}
            for method, rule, noise in cases:
                dp = privacy.private_grad_fn(net, method, clip=clip, noise_multiplier=noise,
                                             rule=rule, compute_dtype=dtype)  # fmt: skip
                out[(method, rule, noise)] = dp(params, x, y, key, feedbacks[rule])
            return out

        return jax.jit(fn, compiler_options=FAST_COMPILE)(params, x, y, key)

    expected = run(None)
    with jax.default_matmul_precision("default"):
        got = run(BF16)
        cast = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), (params, x))
        norms16 = jax.jit(lambda p, x: privacy.per_example_grad_norms(net, p, x, y))(*cast)
    norms32 = privacy.per_example_grad_norms(net, params, x, y)
    for case, (grads, outputs) in got.items():
        assert_close_to_max(grads, expected[case][0], TOL16, what=f"{case} ")
        assert outputs.dtype == jnp.float32
    assert norms16.dtype == jnp.float32  # from bfloat16 rows, in float32
    np.testing.assert_allclose(norms16, norms32, rtol=TOL16)


# ------------------------------------------------------------------ 4. float32, float64 unchanged


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compute_dtype_of_the_params_is_the_same_program(dtype):
    def lowered(fn, *args):
        return jax.jit(fn).lower(*args).as_text()

    with jax.enable_x64(dtype == "float64"):
        params, x, y = jax.tree.map(lambda a: jnp.asarray(a, dtype), make_problem("squared_error"))
        net = net_of(params, loss="squared_error")
        for method in METHODS:
            plain = lowered(methods.grad_fn(net, method), params, x, y)
            assert lowered(methods.grad_fn(net, method, compute_dtype=dtype), params, x, y) == plain
            dp = [privacy.private_grad_fn(net, method, clip=1.0, compute_dtype=c)
                  for c in (dtype, None)]  # fmt: skip
            assert lowered(dp[0], params, x, y, None) == lowered(dp[1], params, x, y, None)
        # Negative control: a cast is seen.
        assert lowered(methods.grad_fn(net, "manual", compute_dtype=BF16), params, x, y) != plain


def test_unknown_compute_dtype_is_a_one_line_value_error():
    for bad in ("bf16", "int32"):
        with pytest.raises(ValueError, match=f"compute_dtype must be a floating dtype.*'{bad}'"):
            methods.grad_fn(bpjax.Net.mlp(SIZES), "manual", compute_dtype=bad)
