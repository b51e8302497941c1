"""The five gradient methods of ``bpjax.methods`` give one batch gradient.

Every ``grad_fn(method)`` runs under ``jax.jit`` in float64 inside a scoped
``jax.enable_x64``: its gradient must equal ``jax.grad(loss_fn)`` to rtol 1e-10
and its ``outputs`` must equal ``bpjax.predict``. The formulas themselves are
proved in ``test_formulas.py``; this file proves the wiring. As there, XLA
compilation is the cost: all methods of one case share one compilation, and
error paths are traced with ``jax.eval_shape`` (an error raised while tracing
is the error a user sees, jitted or not), which compiles nothing.

Precision. Every test here runs with ``jax.default_matmul_precision("highest")``
(``pytestmark`` below, the ``highest_matmul_precision`` fixture of
``conftest.py``), so a float32 comparison holds on GPU (TF32 by default) and TPU
too; bfloat16 mixed precision is ``test_precision.py``'s.
"""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax
from bpjax import methods

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")  # float32 exact on GPU/TPU

# As in test_formulas.py: float64 rounding is ~1e-16 per operation.
RTOL64, ATOL64 = 1e-10, 1e-12
SIZES = (3, 4, 1, 5, 4)  # depth 4, a hidden width of 1
M = 7
COMBOS = [("tanh", "softmax_cross_entropy"), ("relu", "squared_error")]
METHODS = methods.METHODS
# LLVM optimisation off: ~40% less compile time, same IEEE arithmetic.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
KEY = jax.random.key(5)  # a rule's per-step key (only brsf draws from it)


def net_for(activation="relu", loss="softmax_cross_entropy"):
    return bpjax.Net.mlp(SIZES, activation, loss)


def make_problem(loss, seed=0):
    """NumPy float64 ``(params, x, y)`` with nonzero biases."""
    rng = np.random.default_rng(seed)
    params = [
        {"W": rng.uniform(-1.0, 1.0, (n_out, n_in)), "b": rng.normal(0.0, 0.5, (n_out,))}
        for n_in, n_out in itertools.pairwise(SIZES)
    ]
    x = rng.normal(size=(M, SIZES[0]))
    if loss == "softmax_cross_entropy":
        y = np.eye(SIZES[-1])[rng.integers(SIZES[-1], size=M)]
    else:
        y = rng.normal(size=(M, SIZES[-1]))
    return params, x, y


def test_methods_are_the_five_documented():
    assert set(METHODS) == {
        "manual",
        "autodiff",
        "manual_vmap",
        "autodiff_vmap",
        "per_sample",
    }


@pytest.mark.parametrize(("activation", "loss"), COMBOS)
def test_every_method_under_jit_gives_the_autodiff_gradient_and_predict(activation, loss):
    net = net_for(activation, loss)

    def all_methods(params, x, y):
        reference = jax.grad(bpjax.loss_fn, argnums=1)(net, params, x, y)
        logits = bpjax.predict(net, params, x)
        return reference, logits, {m: methods.grad_fn(net, m)(params, x, y) for m in METHODS}

    with jax.enable_x64(True):
        params, x, y = jax.tree.map(jnp.asarray, make_problem(loss))
        assert x.dtype == jnp.float64
        result = jax.jit(all_methods, compiler_options=FAST_COMPILE)(params, x, y)
        # NumPy from here on: float64 jax.Arrays must not outlive the x64 scope.
        reference, logits, results = jax.tree.map(np.asarray, result)
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(reference)) > 1e-3
    for method, (grads, outputs) in results.items():
        try:
            chex.assert_trees_all_equal_structs(grads, reference)
            chex.assert_trees_all_equal_shapes_and_dtypes(grads, reference)
            chex.assert_trees_all_close(grads, reference, rtol=RTOL64, atol=ATOL64)
            assert outputs.shape == (M, SIZES[-1]) and outputs.dtype == np.float64
            # Per-sample (W x + b) and batched (X W^T + b) sum in different orders.
            np.testing.assert_allclose(outputs, logits, rtol=1e-12, atol=1e-14)
        except AssertionError as e:
            raise AssertionError(f"method {method!r}: {e}") from None
    # Negative control: the same comparison sees a 1% error in one leaf.
    planted = [dict(g) for g in results["manual"][0]]
    planted[2]["W"] = planted[2]["W"] * 1.01
    with pytest.raises(AssertionError, match="2/W"):
        chex.assert_trees_all_close(planted, reference, rtol=RTOL64, atol=ATOL64)


def float32_problem(loss):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), make_problem(loss))


def test_unknown_method_activation_or_loss_raise_value_error_naming_the_choices():
    with pytest.raises(ValueError, match="unknown method 'adjoint'") as excinfo:
        methods.grad_fn(net_for(), "adjoint")
    assert all(m in str(excinfo.value) for m in METHODS), str(excinfo.value)
    problem = float32_problem("squared_error")
    for method in METHODS:
        for bad, valid in (
            (dict(activation="gelu"), bpjax.ACTIVATIONS),
            (dict(loss="hinge"), bpjax.LOSSES),
        ):
            with pytest.raises(ValueError) as excinfo:  # the Net refuses them
                jax.eval_shape(methods.grad_fn(net_for(**bad), method), *problem)
            message = str(excinfo.value)
            assert all(name in message for name in valid), (method, message)


@pytest.mark.parametrize(
    "method",
    METHODS,
)
def test_wrong_shapes_raise_value_error(method):
    params, _, _ = float32_problem("squared_error")
    fn = methods.grad_fn(net_for("relu", "squared_error"), method)
    n0, nL = SIZES[0], SIZES[-1]
    bad_shapes = {
        "y has the wrong width": ((M, n0), (M, 1)),
        "x has the wrong width": ((M, n0 - 1), (M, nL)),
        "y has the wrong batch size": ((M, n0), (M - 1, nL)),
        "x is 3-D": ((M, 1, n0), (M, 1, nL)),
    }
    for case, (x_shape, y_shape) in bad_shapes.items():
        x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
        y = jax.ShapeDtypeStruct(y_shape, jnp.float32)
        with pytest.raises(ValueError):
            jax.eval_shape(fn, params, x, y)
            pytest.fail(f"{method}: {case} was accepted")


# ------------------------------------------------------------------------ feedback rules

RULES = tuple(r for r in bpjax.FEEDBACK_RULES if r != "bp")


def make_feedback(rule, seed=1):
    """NumPy float64 feedback matrices of ``rule`` for ``SIZES``."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1.0, 1.0, shape) for shape in bpjax.feedback.feedback_shapes(SIZES, rule)]


def test_rule_methods_under_jit_give_the_rules_manual_grad_and_predict():
    activation, loss = "tanh", "softmax_cross_entropy"
    net = net_for(activation, loss)

    def all_rules(params, x, y, feedbacks):
        out = {}
        for rule in RULES:
            fb = feedbacks[rule]
            expected = bpjax.manual_grad(net, params, x, y, rule=rule, feedback=fb, key=KEY)
            got = {
                m: methods.grad_fn(net, m, rule=rule)(params, x, y, fb, KEY)
                for m in methods.RULE_METHODS
            }
            out[rule] = expected, got
        return out, bpjax.predict(net, params, x), jax.grad(bpjax.loss_fn, argnums=1)(
            net, params, x, y
        )

    with jax.enable_x64(True):
        params, x, y = jax.tree.map(jnp.asarray, make_problem(loss))
        feedbacks = {r: jax.tree.map(jnp.asarray, make_feedback(r)) for r in RULES}
        result = jax.jit(all_rules, compiler_options=FAST_COMPILE)(params, x, y, feedbacks)
        results, logits, true = jax.tree.map(np.asarray, result)
    for rule, (expected, got) in results.items():
        for method, (grads, outputs) in got.items():
            try:
                chex.assert_trees_all_close(grads, expected, rtol=RTOL64, atol=ATOL64)
                np.testing.assert_allclose(outputs, logits, rtol=1e-12, atol=1e-14)
            except AssertionError as e:
                raise AssertionError(f"rule {rule!r}, method {method!r}: {e}") from None
        # Negative control: the rule's update is not the gradient (hidden layers differ).
        with pytest.raises(AssertionError):
            chex.assert_trees_all_close(expected, true, rtol=RTOL64, atol=ATOL64)


def test_autodiff_methods_refuse_other_rules_in_one_line():
    for method in ("autodiff", "autodiff_vmap"):
        for rule in RULES:
            with pytest.raises(ValueError) as excinfo:
                methods.grad_fn(net_for(), method, rule=rule)
            message = str(excinfo.value)
            assert message == (
                f"method {method!r} cannot use rule {rule!r}: jax.grad computes the true "
                "gradient; rules other than bp need --method=manual, manual_vmap or per_sample"
            )
        methods.grad_fn(net_for(), method, rule="bp")  # bp is jax.grad's own rule
    with pytest.raises(ValueError, match="unknown feedback rule 'hebb'"):
        methods.grad_fn(net_for(), "manual", rule="hebb")


@pytest.mark.parametrize("method", METHODS)
def test_missing_or_stray_feedback_raises_value_error(method):
    params, x, y = float32_problem("squared_error")
    if method in methods.RULE_METHODS:
        with pytest.raises(ValueError, match="rule 'fa' needs feedback"):
            jax.eval_shape(methods.grad_fn(net_for(), method, rule="fa"), params, x, y)
    stray = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(1, 4), (5, 1), (4, 5)]]
    with pytest.raises(ValueError, match="rule 'bp' needs feedback of no matrices"):
        jax.eval_shape(methods.grad_fn(net_for(), method), params, x, y, stray)
