"""Feedback rules (``bpjax.feedback``): the rules' updates, their alignment, KP's invariant.

The protocol of ``test_formulas.py``: float64 in a scoped ``jax.enable_x64``, rtol
1e-10, NumPy-built inputs, the cases of one test under one ``jax.jit`` with LLVM's
optimisation off (``packed_jit``), and a negative control wherever a check could
pass vacuously.

The reference for every rule is built from ``jax.grad`` alone, never from the
hand-written backward: each layer computes z = sg(a) W^T + b + (a G^T - sg(a G^T))
(sg = ``lax.stop_gradient``). Its value is a W^T + b, but the error reaching a goes
through G, the rule's matrix (W for bp, B for fa and kp, sign(W) for sign and usf,
|R| sign(W) for frsf, and for brsf with R drawn from the key's fold_in(key, l)), while
dW and db come from the first two terms; dfa cuts the chain (G = 0) and adds
Σ <h^l, sg(e B^{l T})>, whose gradient sends the output error e = dC/dZ^L (itself
from ``jax.grad``) straight to the hidden activations h^l. The closed forms of the
issue pin the reference and the formulas alike to ``jax.grad(loss_fn)``.
"""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bpjax
from bpjax import feedback as fb_lib
from bpjax.rules import glorot_state

RTOL64, ATOL64 = 1e-10, 1e-12
FAST_COMPILE = {"xla_backend_optimization_level": 0}
RULES = bpjax.FEEDBACK_RULES
# Depths 1 to 4, every activation, both losses.
CASES = [
    ((3, 4), "identity", "softmax_cross_entropy"),
    ((3, 5, 4), "tanh", "squared_error"),
    ((4, 6, 3), "relu", "softmax_cross_entropy"),
    ((2, 5, 3, 4), "sigmoid", "softmax_cross_entropy"),
    ((3, 4, 6, 5, 3), "relu", "squared_error"),
]
M = 6
KEY = jax.random.key(42)  # brsf's per-step key: its R^l is drawn from fold_in(KEY, l)


def net_of(params, activation, loss):
    return bpjax.Net.mlp(bpjax.layer_sizes(params), activation, loss)


# ------------------------------------------------------------------------ helpers


def make_problem(sizes, loss, rule, batch=M, seed=0):
    """NumPy float64 ``(params, feedback, x, y)``: Glorot-uniform W and B, nonzero b."""
    rng = np.random.default_rng(seed)
    glorot = lambda n_out, n_in: rng.uniform(-1, 1, (n_out, n_in)) * np.sqrt(6 / (n_in + n_out))  # noqa: E731
    params = [
        {"W": glorot(n_out, n_in), "b": rng.normal(0.0, 0.5, (n_out,))}
        for n_in, n_out in itertools.pairwise(sizes)
    ]
    feedback = [glorot(*shape) for shape in fb_lib.feedback_shapes(sizes, rule)]
    x = rng.normal(size=(batch, sizes[0]))
    if loss == "softmax_cross_entropy":
        y = np.eye(sizes[-1])[rng.integers(sizes[-1], size=batch)]
    else:
        y = rng.normal(size=(batch, sizes[-1]))
    return params, feedback, x, y


def packed_jit(fn, statics, arrays):
    """``[fn(*s, *a) ...]`` for every case under one ``jax.jit``; NumPy results."""
    run = lambda arrays: [fn(*s, *a) for s, a in zip(statics, arrays, strict=True)]  # noqa: E731
    return jax.tree.map(np.asarray, jax.jit(run, compiler_options=FAST_COMPILE)(arrays))


def in_x64(fn, statics, problems):
    with jax.enable_x64(True):
        return packed_jit(fn, statics, jax.tree.map(jnp.asarray, problems))


def assert_trees_close(actual, expected, *, rtol=RTOL64, atol=ATOL64):
    chex.assert_trees_all_equal_structs(actual, expected)
    chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)
    chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def assert_nontrivial(grads):
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads)) > 1e-3


def reference_update(params, feedback, x, y, activation, loss, rule):
    """The rule's update by ``jax.grad`` and ``stop_gradient`` only (module docstring)."""
    sigma, _ = bpjax.ACTIVATIONS[activation]
    per_sample = bpjax.LOSSES[loss].per_sample
    sg = jax.lax.stop_gradient
    mean_loss = lambda z: jnp.mean(per_sample(z, y))  # noqa: E731

    def surrogate(params):
        a, hidden = x, []
        for l, p in enumerate(params):
            z = sg(a) @ p["W"].T + p["b"][None, :]
            if l > 0 and rule != "dfa":  # dfa: no error flows down the chain
                if rule == "bp":
                    G = p["W"]
                elif rule in ("sign", "usf"):
                    G = jnp.sign(p["W"])
                elif rule == "frsf":  # |R| sign(W), R fixed
                    G = jnp.abs(feedback[l - 1]) * jnp.sign(p["W"])
                elif rule == "brsf":  # |R| sign(W), R drawn from this step's key
                    R = glorot_state(jax.random.fold_in(KEY, l), p["W"].shape, p["W"].dtype)
                    G = jnp.abs(R) * jnp.sign(p["W"])
                else:  # fa, kp: B shaped like this layer's W
                    G = feedback[l - 1]
                z = z + (a @ sg(G).T - sg(a @ G.T))
            if l < len(params) - 1:
                a = sigma(z)
                hidden.append(a)
        cost = mean_loss(z)
        if rule == "dfa":
            e = jax.grad(mean_loss)(sg(z))  # dC/dZ^L, with its 1/M
            cost = cost + sum(
                jnp.sum(h * sg(e @ B.T)) for h, B in zip(hidden, feedback, strict=True)
            )
        return cost

    return jax.grad(surrogate)(params)


def rule_routes(params, feedback, x, y, activation, loss, rule):
    """Every hand-written route to the rule's batch update."""
    net = net_of(params, activation, loss)
    kw = dict(rule=rule, feedback=feedback, key=KEY)
    single = lambda xm, ym: bpjax.manual_grad(net, params, xm, ym, **kw)  # noqa: E731
    mean = lambda tree: jax.tree.map(lambda g: jnp.mean(g, axis=0), tree)  # noqa: E731
    return {
        "manual_grad (section 7)": bpjax.manual_grad(net, params, x, y, **kw),
        "mean of vmapped single-sample manual_grad": mean(jax.vmap(single)(x, y)),
        "accumulated_grad (section 8)": bpjax.accumulated_grad(net, params, x, y, **kw),
        "mean of per_example_grads": mean(bpjax.per_example_grads(net, params, x, y, **kw)),
    }


def check_routes(cases, expected_fn):
    """``cases``: ``(sizes, activation, loss, rule, problem)``; every route == expected."""
    statics = [case[1:4] for case in cases]

    def routes_and_expected(activation, loss, rule, *problem):
        return rule_routes(*problem, activation, loss, rule), expected_fn(
            *problem, activation, loss, rule
        )

    results = in_x64(routes_and_expected, statics, [case[4] for case in cases])
    for case, (routes, expected) in zip(cases, results, strict=True):
        assert_nontrivial(expected)
        for name, grads in routes.items():
            try:
                assert_trees_close(grads, expected)
            except AssertionError as e:
                raise AssertionError(f"{case[:4]}: {name}: {e}") from None
    return results


# ------------------------------------------------------------------------ 1. every rule


@pytest.mark.parametrize("rule", RULES)
def test_every_route_of_every_rule_equals_the_autodiff_reference(rule):
    # Random B (not W): the rule's update, by jit, vmap and scan, at depths 1 to 4.
    cases = [(s, a, l, rule, make_problem(s, l, rule)) for s, a, l in CASES]
    results = check_routes(cases, reference_update)
    if rule != "bp":  # negative control: a rule other than bp is not the gradient
        deepest = cases[-1]
        [true] = in_x64(true_grad, [(deepest[1], deepest[2], rule)], [deepest[4]])
        routes, _ = results[-1]
        with pytest.raises(AssertionError):
            assert_trees_close(routes["manual_grad (section 7)"], true)


def test_the_reference_for_bp_is_jax_grad_and_sees_a_planted_error():
    sizes, activation, loss = CASES[-1]
    problem = make_problem(sizes, loss, "bp")

    def both(activation, loss, params, feedback, x, y):
        true = jax.grad(bpjax.loss_fn, argnums=1)(net_of(params, activation, loss), params, x, y)
        return reference_update(params, feedback, x, y, activation, loss, "bp"), true

    [(reference, true)] = in_x64(both, [(activation, loss)], [problem])
    assert_trees_close(reference, true)
    planted = [dict(g) for g in reference]
    planted[1]["W"] = planted[1]["W"] * 1.01
    with pytest.raises(AssertionError, match="1/W"):
        assert_trees_close(planted, true)


# ------------------------------------------------------------------------ 2. closed forms


def true_grad(*args):
    """``jax.grad(loss_fn)``; the signature of ``reference_update``, or the statics first."""
    if isinstance(args[0], str):  # (activation, loss, rule, params, feedback, x, y)
        args = (*args[3:], *args[:3])
    params, _, x, y, activation, loss, _ = args
    return jax.grad(bpjax.loss_fn, argnums=1)(net_of(params, activation, loss), params, x, y)


def test_bp_and_fa_kp_with_b_equal_w_and_one_layer_dfa_with_b_equal_w_t_are_jax_grad():
    cases = []
    for sizes, activation, loss in CASES[1:]:
        params, _, x, y = make_problem(sizes, loss, "bp")
        cases.append((sizes, activation, loss, "bp", (params, [], x, y)))
        B_is_W = [p["W"] for p in params[1:]]
        cases += [(sizes, activation, loss, r, (params, B_is_W, x, y)) for r in ("fa", "kp")]
        if len(sizes) == 3:  # one hidden layer: B^1 = (W^2)^T
            cases.append((sizes, activation, loss, "dfa", (params, [params[1]["W"].T], x, y)))
    assert sum(case[3] == "dfa" for case in cases) == 2
    check_routes(cases, true_grad)


def test_sign_on_weights_of_plus_minus_c_is_bp_scaled_by_one_over_c_per_step():
    # sign(W) = W / c: the (7.2) of layer l has L - l steps from the output, each 1/c.
    c = 0.37
    cases, scaled = [], []
    for sizes, activation, loss in CASES:
        params, _, x, y = make_problem(sizes, loss, "sign")
        for p in params:
            p["W"] = c * np.sign(p["W"])
        cases.append((sizes, activation, loss, "sign", (params, [], x, y)))
        L = len(params)
        scaled.append([c ** -(L - 1 - l) for l in range(L)])  # code layer l is layer l + 1

    results = check_routes(cases, reference_update)
    bp = in_x64(true_grad, [case[1:4] for case in cases], [case[4] for case in cases])
    for case, (routes, _), true, factors in zip(cases, results, bp, scaled, strict=True):
        expected = [{k: v * f for k, v in g.items()} for g, f in zip(true, factors, strict=True)]
        assert_trees_close(routes["manual_grad (section 7)"], expected)
        if len(case[0]) > 2:  # negative control: unscaled BP is not it
            with pytest.raises(AssertionError):
                assert_trees_close(routes["manual_grad (section 7)"], true)


def test_float32_rules_match_float64_and_stay_float32():
    # The same float32-representable inputs in both dtypes; tolerances as test_formulas.py's.
    sizes, activation, loss = (5, 8, 6, 4), "tanh", "softmax_cross_entropy"
    rules = [r for r in RULES if r != "brsf"]  # brsf draws its R in W's dtype: other values
    problems = []
    for rule in rules:
        problem = make_problem(sizes, loss, rule, batch=16)
        problems.append(jax.tree.map(lambda a: a.astype(np.float32).astype(np.float64), problem))
    statics = [(activation, loss, rule) for rule in rules]
    update = lambda a, l, r, params, fb, x, y: bpjax.manual_grad(  # noqa: E731
        net_of(params, a, l), params, x, y, rule=r, feedback=fb, key=KEY
    )
    expected = in_x64(update, statics, problems)
    with jax.default_matmul_precision("highest"):
        got = packed_jit(update, statics, jax.tree.map(lambda a: np.float32(a), problems))
    for rule, g, e in zip(rules, got, expected, strict=True):
        assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(g)), rule
        chex.assert_trees_all_close(jax.tree.map(np.float64, g), e, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ 3. Kolen-Pollack


def test_kolen_pollack_shrinks_w_minus_b_by_one_minus_lr_decay_per_sgd_step():
    sizes, activation, loss = (3, 5, 6, 4), "tanh", "softmax_cross_entropy"
    lr, decay, steps = 0.3, 0.05, 6
    params, feedback, x, y = make_problem(sizes, loss, "kp")

    def sgd(tree, grads):
        return jax.tree.map(lambda p, g: p - lr * g, tree, grads)

    def train(params, feedback, x, y, use_helper):
        gaps = []
        for _ in range(steps):
            grads = bpjax.manual_grad(
                net_of(params, activation, loss), params, x, y, rule="kp", feedback=feedback
            )
            param_grads, fb_grads = bpjax.kp_feedback_grads(grads, params, feedback, decay)
            if not use_helper:  # negative control: B learns without its decay
                fb_grads = [g["W"] for g in grads[1:]]
            params, feedback = sgd(params, param_grads), sgd(feedback, fb_grads)
            gaps.append(
                [jnp.linalg.norm(p["W"] - B) for p, B in zip(params[1:], feedback, strict=True)]
            )
        return gaps, params

    gap0 = [np.linalg.norm(p["W"] - B) for p, B in zip(params[1:], feedback, strict=True)]
    expected = [[(1 - lr * decay) ** t * g for g in gap0] for t in range(1, steps + 1)]
    run = lambda use, *problem: train(*problem, use)  # noqa: E731
    problems = [(params, feedback, x, y)] * 2
    [(gaps, trained), (bad_gaps, _)] = in_x64(run, [(True,), (False,)], problems)
    assert not np.allclose(trained[0]["W"], params[0]["W"])  # the weights did move
    np.testing.assert_allclose(np.array(gaps), np.array(expected), rtol=RTOL64)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(np.array(bad_gaps), np.array(expected), rtol=RTOL64)


def test_kp_feedback_grads_pairs_b_l_with_w_l_and_spares_the_biases():
    params, feedback, _, _ = make_problem((3, 4, 5, 2), "squared_error", "kp")
    grads = jax.tree.map(lambda a: a + 1.0, params)
    param_grads, fb_grads = bpjax.kp_feedback_grads(grads, params, feedback, 0.5)
    for g, p, pg in zip(grads, params, param_grads, strict=True):
        np.testing.assert_allclose(pg["W"], g["W"] + 0.5 * p["W"])
        np.testing.assert_array_equal(pg["b"], g["b"])
    for g, B, fg in zip(grads[1:], feedback, fb_grads, strict=True):
        np.testing.assert_allclose(fg, g["W"] + 0.5 * B)


# ------------------------------------------------------------------------ 4. alignment


def per_example_update_angles(params, feedback, x, y, activation, loss, rule):
    """Angles of explicit per-example dW^l_m (vmapped single sample), rule against bp."""
    net = net_of(params, activation, loss)
    one = lambda r, f: jax.vmap(  # noqa: E731
        lambda xm, ym: bpjax.manual_grad(net, params, xm, ym, rule=r, feedback=f, key=KEY)
    )(x, y)
    rule_M, bp_M = one(rule, feedback), one("bp", [])
    flat = lambda g: g["W"].reshape(g["W"].shape[0], -1)  # noqa: E731
    return [fb_lib.angle_deg(flat(r), flat(b)) for r, b in zip(rule_M[:-1], bp_M[:-1], strict=True)]


def alignment_and_checks(activation, loss, rule, params, feedback, x, y):
    net = net_of(params, activation, loss)
    kw = dict(rule=rule, key=KEY)
    scaled = [3.7 * B for B in feedback]
    update = bpjax.manual_grad(net, params, x, y, rule=rule, feedback=feedback, key=KEY)
    true = jax.grad(bpjax.loss_fn, argnums=1)(net, params, x, y)
    return {
        "report": bpjax.alignment(net, params, feedback, x, y, **kw),
        "scaled": bpjax.alignment(net, params, scaled, x, y, **kw),
        "per_example": per_example_update_angles(params, feedback, x, y, activation, loss, rule),
        "update_vs_grad": [
            fb_lib.angle_deg(u["W"].ravel(), t["W"].ravel())
            for u, t in zip(update[:-1], true[:-1], strict=True)
        ],
    }


ALIGN_CASES = [
    ((4, 6, 5, 3), "tanh", "softmax_cross_entropy"),
    ((3, 7, 4), "relu", "squared_error"),
]


@pytest.fixture(scope="module")
def alignments():
    cases = [(s, a, l, r) for s, a, l in ALIGN_CASES for r in RULES]
    problems = [make_problem(s, l, r, batch=9, seed=1) for s, _, l, r in cases]
    results = in_x64(alignment_and_checks, [c[1:] for c in cases], problems)
    return list(zip(cases, problems, results, strict=True))


def test_alignment_reports_every_hidden_layer_and_only_the_b_that_carry_a_signal(alignments):
    for (sizes, _, _, rule), _, r in alignments:
        report = r["report"]
        keys = {"alignment_deg", "delta_deg_mean", "delta_deg_std"}
        assert set(report) == keys | ({"weight_deg"} if rule != "dfa" else set()), rule
        for value in report.values():
            assert value.shape == (len(sizes) - 2,) and value.dtype == np.float64
            assert np.all(np.isfinite(value)) and np.all((value >= 0) & (value <= 180))
        if rule == "bp":
            assert max(np.max(np.abs(v)) for v in report.values()) < 1e-5
        else:  # random B, sign(W): a real angle, not 0
            assert np.all(report["alignment_deg"] > 1.0), (rule, report)


def test_alignment_angle_is_the_angle_between_the_update_and_the_gradient(alignments):
    for case, _, r in alignments:
        np.testing.assert_allclose(
            r["report"]["alignment_deg"],
            r["update_vs_grad"],
            rtol=RTOL64,
            atol=1e-5,
            err_msg=str(case),
        )


def test_per_example_update_angles_equal_the_error_signal_angles(alignments):
    # dW_m = δ_m a_m^T: the factor a_m cancels from the cosine (a_m != 0 here).
    for case, _, r in alignments:
        mean = [np.mean(a) for a in r["per_example"]]
        std = [np.std(a) for a in r["per_example"]]
        np.testing.assert_allclose(
            r["report"]["delta_deg_mean"], mean, rtol=RTOL64, atol=1e-5, err_msg=str(case)
        )
        np.testing.assert_allclose(
            r["report"]["delta_deg_std"], std, rtol=1e-8, atol=1e-5, err_msg=str(case)
        )
        if case[3] != "bp":  # negative control: the mean is not a constant the check misses
            assert np.all(np.array(mean) > 1.0)


def test_angles_do_not_change_when_b_is_scaled(alignments):
    for case, _, r in alignments:
        if case[3] in ("fa", "kp", "dfa", "frsf"):
            assert_trees_close(r["scaled"], r["report"], rtol=1e-9, atol=1e-9)


def test_weight_angle_is_between_w_l_plus_1_and_the_matrix_7_2_uses(alignments):
    deg = lambda W, B: np.degrees(  # noqa: E731
        np.arccos(np.clip(np.vdot(W, B) / np.linalg.norm(W) / np.linalg.norm(B), -1, 1))
    )
    for (_, _, _, rule), (params, feedback, _, _), r in alignments:
        Ws = [p["W"] for p in params[1:]]
        with jax.enable_x64(True):  # brsf: R drawn from the key alignment was given
            R = {"frsf": feedback, "brsf": [
                np.asarray(glorot_state(jax.random.fold_in(KEY, l), W.shape, jnp.float64))
                for l, W in enumerate(Ws, start=1)]}.get(rule)  # fmt: skip
        used = {  # the matrix (7.2) really multiplies, not the raw state
            "fa": feedback, "kp": feedback, "bp": Ws,
            "sign": [np.sign(W) for W in Ws], "usf": [np.sign(W) for W in Ws],
        }.get(rule) or (R and [np.abs(r) * np.sign(W) for r, W in zip(R, Ws, strict=True)])
        if rule == "dfa":
            assert "weight_deg" not in r["report"]  # dfa's B^l is no stand-in for a W
            continue
        expected = [deg(W, B) for W, B in zip(Ws, used, strict=True)]
        np.testing.assert_allclose(r["report"]["weight_deg"], expected, rtol=1e-9, atol=1e-5)
        if rule in ("sign", "usf", "frsf"):  # negative control: not the raw W or state
            assert np.all(np.array(expected) > 1.0)


def test_angle_is_clipped_and_defined_for_zero_vectors():
    a = np.array(
        [
            [1.0, 2.0, 3.0],
            [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            [1e-30, 0.0, 0.0],
            [1.0, 1.0, 1.0],
            [1.0, 0.0, 0.0],
        ]
    )
    b = np.array(
        [
            [2.0, 4.0, 6.0],
            [0.0, 0.0, 0.0],
            [1.0, 0.0, 0.0],
            [1e-30, 0.0, 0.0],
            [-1.0, -1.0, -1.0],
            [0.0, 5.0, 0.0],
        ]
    )
    got = np.asarray(jax.jit(fb_lib.angle_deg)(a.astype(np.float32), b.astype(np.float32)))
    # parallel (cosine may round above 1: clipped), both zero, one zero, tiny, opposite, 90°
    np.testing.assert_allclose(got, [0.0, 0.0, 90.0, 0.0, 180.0, 90.0], atol=0.05)
    assert not np.any(np.isnan(got))


def test_alignment_with_zero_output_error_is_zero_degrees_not_nan():
    # A zero output layer and zero targets: every error vector is zero, rule and bp alike.
    params, feedback, x, y = make_problem((3, 5, 4, 2), "squared_error", "fa")
    params[-1] = jax.tree.map(np.zeros_like, params[-1])
    net = bpjax.Net.mlp((3, 5, 4, 2), loss="squared_error")
    report = jax.jit(functools.partial(bpjax.alignment, net, rule="fa"))(
        params, feedback, x, np.zeros_like(y)
    )
    for key in ("alignment_deg", "delta_deg_mean", "delta_deg_std"):
        np.testing.assert_array_equal(report[key], 0.0)


# ------------------------------------------------------------------------ 5. init and errors


@pytest.mark.parametrize("rule", RULES)
def test_init_feedback_shapes_scale_and_independence(rule):
    sizes, key = (7, 5, 4, 3), jax.random.key(0)
    fb = bpjax.init_feedback(key, sizes, rule, jnp.float32)
    expected = {"fa": [(4, 5), (3, 4)], "kp": [(4, 5), (3, 4)], "frsf": [(4, 5), (3, 4)],
                "dfa": [(5, 3), (4, 3)]}.get(rule, [])  # fmt: skip
    assert [B.shape for B in fb] == expected
    assert all(B.dtype == jnp.float32 for B in fb)
    params = bpjax.init_params(key, sizes)
    for B in fb:
        bound = np.sqrt(6 / sum(B.shape))  # Glorot-uniform for B's own shape
        assert 0.5 * bound < float(jnp.max(jnp.abs(B))) <= bound
        # the params' own key, yet no B repeats a W
        assert not any(p["W"].shape == B.shape and np.allclose(p["W"], B) for p in params)


def test_wrong_rule_or_feedback_raise_one_line_value_errors():
    params, feedback, x, y = make_problem((3, 4, 5, 2), "squared_error", "fa")
    net = bpjax.Net.mlp((3, 4, 5, 2), "relu", "squared_error")
    bad = {
        "unknown rule": (dict(rule="hebb", feedback=None), "unknown feedback rule 'hebb'"),
        "fa without feedback": (dict(rule="fa", feedback=None), r"got None"),
        "fa with one B too few": (dict(rule="fa", feedback=feedback[:1]), r"got \[\(5, 4\)\]$"),
        "fa with B transposed": (
            dict(rule="fa", feedback=[B.T for B in feedback]),
            r"got \[\(4, 5\), \(5, 2\)\]",
        ),
        "dfa with fa's B": (dict(rule="dfa", feedback=feedback), r"\(N_l, N_L\)"),
        "bp with B": (dict(rule="bp", feedback=feedback), "no matrices"),
    }
    fns = {
        "manual_grad": lambda **k: bpjax.manual_grad(net, params, x, y, **k),
        "manual_grad one sample": lambda **k: bpjax.manual_grad(net, params, x[0], y[0], **k),
        "accumulated_grad": lambda **k: bpjax.accumulated_grad(net, params, x, y, **k),
        "alignment": lambda **k: bpjax.alignment(net, params, k["feedback"], x, y, rule=k["rule"]),
    }
    for fn_name, fn in fns.items():
        for case, (args, match) in bad.items():
            with pytest.raises(ValueError, match=match) as excinfo:
                fn(**args)  # the checks run before any array work
            assert "\n" not in str(excinfo.value), (fn_name, case)
            if case != "unknown rule":
                assert "init_feedback" in str(excinfo.value)
    with pytest.raises(ValueError, match="choose one of bp, fa, dfa, sign, kp, usf, brsf, frsf"):
        bpjax.init_feedback(jax.random.key(0), (3, 4), "hebb")
    with pytest.raises(ValueError, match="sizes"):
        bpjax.init_feedback(jax.random.key(0), (3, 0, 2), "fa")
    with pytest.raises(ValueError, match="'kp'"):
        bpjax.kp_feedback_grads(params, params, feedback[:1], 0.1)


def test_feedback_is_an_argument_not_a_constant_one_trace_for_new_b():
    traces = []

    def counted(params, feedback, x, y):
        traces.append(1)
        return bpjax.manual_grad(bpjax.Net.mlp((3, 4, 5, 2)), params, x, y, rule="fa",
                                 feedback=feedback)  # fmt: skip

    jitted = jax.jit(counted)
    params, fb1, x, y = make_problem((3, 4, 5, 2), "softmax_cross_entropy", "fa", seed=1)
    _, fb2, _, _ = make_problem((3, 4, 5, 2), "softmax_cross_entropy", "fa", seed=2)
    as32 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float32), t)  # noqa: E731
    g1 = jitted(*as32((params, fb1, x, y)))
    g2 = jitted(*as32((params, fb2, x, y)))
    assert len(traces) == 1
    np.testing.assert_array_equal(g1[-1]["W"], g2[-1]["W"])  # the output layer is exact
    assert not np.allclose(g1[0]["W"], g2[0]["W"])  # the hidden layer follows B


def test_optax_consumes_a_rule_update_unchanged():
    params, feedback, x, y = make_problem((3, 4, 5, 2), "softmax_cross_entropy", "dfa")
    params, feedback, x, y = jax.tree.map(
        lambda a: np.asarray(a, np.float32), (params, feedback, x, y)
    )
    grads = bpjax.manual_grad(bpjax.Net.mlp((3, 4, 5, 2)), params, x, y, rule="dfa",
                              feedback=feedback)  # fmt: skip
    opt = optax.sgd(0.1)
    updates, _ = opt.update(grads, opt.init(params), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(optax.apply_updates(params, updates), params)
