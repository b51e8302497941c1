"""The gradient-check protocol for the hand-written backprop (STYLE.md, "Tests").

What is proved here, for ``bpjax.formulas`` and the network it differentiates:

1. float64, in a *scoped* ``jax.enable_x64`` (never a global toggle): three
   routes to the batch gradient equal ``jax.grad(loss_fn)`` to rtol 1e-10: the
   full-matrix formulas (second document, section 7), the per-sample
   accumulation (section 8) and the mean of the single-sample δ recursion
   (first document, section 2) vmapped over samples (section 0.3); for depths
   1 to 5, widths of 1, every activation, both losses, batches 1, 2, 7, 128;
2. float32 against a float64 reference; jit against eager;
3. per-example gradients against ``jax.vmap(jax.grad(loss_fn))``;
4. finite differences: ``jax.test_util.check_grads`` on ``loss_fn``, and a
   per-leaf directional-derivative check of ``manual_grad`` itself;
5. properties: shapes and dtypes (second document, point 0.2), samples never
   interact (point 0.3), the single-sample path is the batch path with M = 1;
6. a negative control: a planted 1% error in one leaf fails every check;
8. clear errors; 9. one trace per input shape under ``jax.jit``.
(7., the five gradient methods, is ``test_methods.py``.)

Cost. XLA compilation, not arithmetic, is what these tests spend (about 5 ms
of CPU per HLO op on a loaded 2-core machine). So data and parameters are NumPy
(no ``jax.random``), shapes are tiny, and the cases of one test are evaluated
under a single ``jax.jit`` (``packed_jit``), compiled with LLVM's optimisation
off. Eager op-by-op dispatch compiles every primitive separately and an eager
``lax.scan`` recompiles on every call, which measured slower than jit, so only
the dedicated jit-vs-eager test runs eagerly.

Precision. Every test here runs with ``jax.default_matmul_precision("highest")``
(``pytestmark`` below, the ``highest_matmul_precision`` fixture of
``conftest.py``): on A100/H100 GPUs float32 products default to TF32 and on TPUs
to bfloat16 passes, and the float32 tolerances below hold for exact float32
products only. float64 products are unaffected.
"""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bpjax

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")  # float32 exact on GPU/TPU

ACTIVATIONS = tuple(bpjax.ACTIVATIONS)
LOSSES = tuple(bpjax.LOSSES)
COMBOS = [(activation, loss) for activation in ACTIVATIONS for loss in LOSSES]

# float64: every route does O(depth * width + M) roundings of 1.1e-16 on values
# of order one, so 1e-10 leaves five orders of margin and still sees a 1e-8
# slip. atol only admits exact zeros (dead ReLU units, width-1 layers).
RTOL64, ATOL64 = 1e-10, 1e-12


def on_net(fn, activation="relu", loss="softmax_cross_entropy"):
    """``fn(net, params, x, y, ...)`` as ``f(params, x, y, ...)``: the MLP read off the params."""

    def bound(params, *args, **kwargs):
        net = bpjax.Net.mlp(bpjax.layer_sizes(params), activation, loss)
        return fn(net, params, *args, **kwargs)

    return bound

# float32 (eps = 1.2e-7) against float64 on the *same* (float32-representable)
# inputs measures arithmetic error only. Each gradient entry is a sum over M = 16
# samples of products along a chain of at most 3 matmuls of width <= 8, so the
# accumulated rounding is about (M + depth * width) * eps ~ 40 * 1.2e-7 ~ 5e-6
# relative to the size of the summed terms (order 0.1 to 1 here). rtol 1e-4
# covers that 20x over; atol 1e-5 covers entries that cancel to near zero,
# whose *relative* error is unbounded. A 1% planted error is still 100x over.
# On GPU, float32 matmuls may default to TF32 (eps ~ 1e-3), hence the
# "highest" matmul precision for this whole module (``pytestmark``).
RTOL32, ATOL32 = 1e-4, 1e-5

# Grid networks, keyed by depth L (the number of weight layers). Widths of 1
# appear as an input (L = 3), a hidden layer (L = 2, 4, 5) and, below, an output.
SIZES = {
    1: (3, 4),
    2: (3, 1, 4),
    3: (1, 5, 2, 4),
    4: (3, 4, 1, 5, 4),
    5: (2, 5, 3, 1, 4, 3),
}
# Output width 1 only makes sense for regression: a softmax over one logit is
# constant, so its cross-entropy gradient is identically zero.
WIDTH_ONE_OUTPUT = [
    ((1, 1, 1), "relu"),
    ((1, 1, 1), "tanh"),
    ((3, 2, 1), "sigmoid"),
    ((3, 2, 1), "identity"),
]


# ------------------------------------------------------------------------ helpers


def make_problem(sizes, batch, loss, seed=0):
    """NumPy float64 ``(params, x, y)``; ``batch=None`` gives one sample ``x: (n_0,)``.

    W is Glorot-uniform like ``init_params``; b is random and nonzero so that no
    pre-activation sits exactly on ReLU's kink (finite differences need that).
    Every value is float32-representable, so float32 runs see the same inputs.
    """
    rng = np.random.default_rng(seed)
    params = []
    for n_in, n_out in itertools.pairwise(sizes):
        u = np.sqrt(6.0 / (n_in + n_out))
        W = rng.uniform(-u, u, (n_out, n_in))
        b = rng.normal(0.0, 0.5, (n_out,))
        params.append({"W": W, "b": b})
    shape = () if batch is None else (batch,)
    x = rng.normal(size=(*shape, sizes[0]))
    if loss == "softmax_cross_entropy":
        y = np.eye(sizes[-1])[rng.integers(sizes[-1], size=shape)]
    else:
        y = rng.normal(size=(*shape, sizes[-1]))
    as32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731
    return jax.tree.map(as32, (params, x, y))


def to_jax(tree, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def to_numpy64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# Only LLVM's code generation is affected (about 40% less compile time); XLA's
# HLO passes still run and IEEE semantics are unchanged (no fast math either way).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def packed_jit(fn, statics, arrays):
    """``[fn(*s, *a) for s, a in zip(statics, arrays)]``, all under one ``jax.jit``.

    ``statics`` are the Python values of each case (activation and loss names),
    ``arrays`` its array arguments. One compilation for eight cases measured
    about three times cheaper than eight compilations. The results come back as
    NumPy arrays: a float64 ``jax.Array`` touched after the ``enable_x64`` scope
    has closed would be silently computed in float32.
    """
    run = lambda arrays: [fn(*s, *a) for s, a in zip(statics, arrays, strict=True)]  # noqa: E731
    return jax.tree.map(np.asarray, jax.jit(run, compiler_options=FAST_COMPILE)(arrays))


def assert_trees_close(actual, expected, *, rtol, atol):
    """Same structure, shapes and dtypes, then every leaf close; names the leaf path."""
    chex.assert_trees_all_equal_structs(actual, expected)
    chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)
    chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def assert_nontrivial(grads):
    # A comparison of two all-zero trees proves nothing.
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads)) > 1e-3


def batch_mean(tree):
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), tree)


def plant_error(grads, layer, leaf, factor=1.01):
    """A copy of ``grads`` with one leaf scaled by ``factor`` (1% off by default)."""
    planted = [dict(g) for g in grads]
    planted[layer][leaf] = planted[layer][leaf] * factor
    return planted


def all_routes(params, x, y, activation, loss):
    """The reference ``jax.grad(loss_fn)`` and the three hand-written batch routes."""
    kw = dict(activation=activation, loss=loss)
    single = on_net(bpjax.manual_grad, **kw)
    reference = jax.grad(on_net(bpjax.loss_fn, **kw))(params, x, y)
    routes = {
        "manual_grad (section 7)": on_net(bpjax.manual_grad, **kw)(params, x, y),
        "accumulated_grad (section 8)": on_net(bpjax.accumulated_grad, **kw)(params, x, y),
        "mean of vmapped single-sample manual_grad": batch_mean(
            jax.vmap(single, in_axes=(None, 0, 0))(params, x, y)
        ),
    }
    return reference, routes


def check_routes_float64(cases, problems=None):
    """``cases``: ``(sizes, batch, activation, loss)``; every route == jax.grad.

    ``problems``: the cases' ``(params, x, y)`` (default: ``make_problem`` of each).
    """
    if problems is None:
        problems = [make_problem(sizes, batch, loss) for sizes, batch, _, loss in cases]
    with jax.enable_x64(True):
        results = packed_jit(
            lambda activation, loss, *problem: all_routes(*problem, activation, loss),
            [case[2:] for case in cases],
            to_jax(problems, jnp.float64),
        )
        for case, (reference, routes) in zip(cases, results, strict=True):
            assert jax.tree.leaves(reference)[0].dtype == np.float64
            assert_nontrivial(reference)
            for name, grads in routes.items():
                try:
                    assert_trees_close(grads, reference, rtol=RTOL64, atol=ATOL64)
                except AssertionError as e:
                    raise AssertionError(f"{case}: {name} != jax.grad(loss_fn): {e}") from None


# ------------------------------------------------------------------------ 1. float64 grid


@pytest.mark.parametrize("depth", sorted(SIZES))
def test_routes_agree_float64_every_activation_and_loss(depth):
    check_routes_float64([(SIZES[depth], 7, activation, loss) for activation, loss in COMBOS])


def test_routes_agree_float64_every_batch_size():
    # Batch 7 is the grid above; 128 runs a long accumulation scan.
    check_routes_float64(
        [
            (SIZES[3], 1, "relu", "softmax_cross_entropy"),
            (SIZES[3], 2, "relu", "squared_error"),
            (SIZES[3], 128, "relu", "softmax_cross_entropy"),
            (SIZES[3], 128, "tanh", "squared_error"),
        ]
    )


def test_routes_agree_float64_output_width_one():
    check_routes_float64([(sizes, 7, a, "squared_error") for sizes, a in WIDTH_ONE_OUTPUT])


def test_routes_agree_float64_soft_targets():
    # Label smoothing: rows of y are probabilities, not one-hot; and unnormalised rows
    # (Σy != 1, e.g. a weighted sample). The output error is softmax(z) Σy - y; a version
    # that drops the Σy factor agrees with jax.grad on one-hot targets only.
    cases = [(SIZES[2], 7, "relu", "softmax_cross_entropy"),
             (SIZES[3], 5, "tanh", "softmax_cross_entropy")]  # fmt: skip
    problems = []
    for sizes, batch, _, loss in cases:
        params, x, y = make_problem(sizes, batch, loss)
        smooth = 0.9 * y + 0.1 / sizes[-1]  # label smoothing, Σy = 1
        smooth[0] *= 2.5  # and one row with Σy = 2.5
        problems.append((params, x, smooth))
    check_routes_float64(cases, problems)


def test_relu_kink_subgradient_matches_autodiff():
    # Zero biases (as init_params gives) and all-zero input rows put every
    # pre-activation of those rows exactly on the kink: σ'(0) must be the
    # subgradient jax.nn.relu picks (0), or manual and autodiff part ways.
    kw = dict(activation="relu", loss="softmax_cross_entropy")
    params, x, y = make_problem(SIZES[3], 6, kw["loss"])
    for p in params:
        p["b"][:] = 0.0
    x[::2] = 0.0
    with jax.enable_x64(True):
        [(reference, routes)] = packed_jit(
            lambda *problem: all_routes(*problem, **kw), [()], [to_jax((params, x, y), jnp.float64)]
        )
    assert_nontrivial(reference)
    for grads in routes.values():
        assert_trees_close(grads, reference, rtol=RTOL64, atol=ATOL64)


# ------------------------------------------------------------------------ 2. float32, jit


# Every activation, and each loss twice.
FLOAT32_COMBOS = [
    ("relu", "softmax_cross_entropy"),
    ("sigmoid", "squared_error"),
    ("tanh", "softmax_cross_entropy"),
    ("identity", "squared_error"),
]


def test_float32_matches_float64_reference():
    sizes, batch = (5, 8, 6, 4), 16
    problems = [make_problem(sizes, batch, loss) for _, loss in FLOAT32_COMBOS]

    def reference(activation, loss, params, x, y):
        return jax.grad(on_net(bpjax.loss_fn, activation, loss))(params, x, y)

    with jax.enable_x64(True):
        references = packed_jit(reference, FLOAT32_COMBOS, to_jax(problems, jnp.float64))
    problems32 = to_jax(problems, jnp.float32)
    results = packed_jit(
        lambda activation, loss, *problem: all_routes(*problem, activation, loss),
        FLOAT32_COMBOS,
        problems32,
    )
    for combo, (params, _, _), expected, (_, routes) in zip(
        FLOAT32_COMBOS, problems32, references, results, strict=True
    ):
        for name, grads in routes.items():
            chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)  # stays float32
            try:
                assert_trees_close(to_numpy64(grads), expected, rtol=RTOL32, atol=ATOL32)
            except AssertionError as e:
                raise AssertionError(f"{combo}: float32 {name}: {e}") from None


def test_jit_matches_eager():
    # Eager dispatch compiles each primitive on its own, so this stays small:
    # manual_grad in both dtypes. (vmap and lax.scan are proved under jit above;
    # an eager lax.scan is compiled whole anyway.)
    kw = dict(activation="relu", loss="softmax_cross_entropy")
    problem = make_problem(SIZES[2], 5, kw["loss"])
    manual = on_net(bpjax.manual_grad, **kw)
    with jax.enable_x64(True):
        args = to_jax(problem, jnp.float64)
        # The same float64 arithmetic, possibly fused or reordered by XLA.
        assert_trees_close(jax.jit(manual)(*args), manual(*args), rtol=1e-12, atol=1e-14)
    args = to_jax(problem, jnp.float32)
    # A few float32 ulps (eps 1.2e-7) from fusion and reassociation.
    assert_trees_close(jax.jit(manual)(*args), manual(*args), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ 3. per-example


def test_per_example_grads_match_vmapped_autodiff():
    M = 7

    def per_example(activation, loss, params, x, y):
        kw = dict(activation=activation, loss=loss)
        manual = jax.vmap(on_net(bpjax.manual_grad, **kw), in_axes=(None, 0, 0))
        autodiff = jax.vmap(jax.grad(on_net(bpjax.loss_fn, **kw)), in_axes=(None, 0, 0))
        return (
            manual(params, x, y),
            on_net(bpjax.per_example_grads, **kw)(params, x, y),
            autodiff(params, x, y),
        )

    problems = [make_problem(SIZES[3], M, loss) for _, loss in COMBOS]
    with jax.enable_x64(True):
        results = packed_jit(per_example, COMBOS, to_jax(problems, jnp.float64))
    for combo, (manual, api, expected) in zip(COMBOS, results, strict=True):
        assert_nontrivial(expected)
        assert jax.tree.leaves(expected)[0].shape[0] == M
        try:
            assert_trees_close(manual, expected, rtol=RTOL64, atol=ATOL64)
            assert_trees_close(api, expected, rtol=RTOL64, atol=ATOL64)
        except AssertionError as e:
            raise AssertionError(f"{combo}: {e}") from None


# ------------------------------------------------------------------------ 4. finite differences


def test_loss_fn_passes_check_grads():
    # The reference itself: jax.grad(loss_fn) against finite differences, to
    # second order. (manual_grad's own finite-difference check is below.)
    kw = dict(activation="tanh", loss="softmax_cross_entropy")
    with jax.enable_x64(True):
        params, x, y = to_jax(make_problem(SIZES[2], 5, kw["loss"]), jnp.float64)
        f = jax.jit(lambda p: on_net(bpjax.loss_fn, **kw)(p, x, y))
        check_grads(f, (params,), order=2, modes=["rev"])


FD_STEP = 1e-5


def random_directions(params, seed=1):
    """One random direction per leaf, on that leaf alone: ``[{"W": v_W, "b": v_b}]``."""
    rng = np.random.default_rng(seed)
    return [{leaf: rng.normal(size=np.shape(a)) for leaf, a in p.items()} for p in params]


def finite_differences(loss_of_params, params, directions):
    """``{"l/leaf": (C(p + h v) - C(p - h v)) / 2h}`` for each leaf's direction v."""
    fd = {}
    for l, leaf_directions in enumerate(directions):
        for leaf, v in leaf_directions.items():
            plus, minus = [dict(p) for p in params], [dict(p) for p in params]
            plus[l][leaf] = params[l][leaf] + FD_STEP * v
            minus[l][leaf] = params[l][leaf] - FD_STEP * v
            fd[f"{l}/{leaf}"] = (loss_of_params(plus) - loss_of_params(minus)) / (2 * FD_STEP)
    return fd


def assert_directional_derivatives_match(grads, directions, fd):
    """Each leaf's ⟨grad, v⟩ against its central difference (float64).

    With h = 1e-5 the truncation error is h²/6 |C'''| ~ 1e-11 and the rounding
    error eps |C| / h ~ 1e-11; 1e-8 + 1e-6 |⟨g, v⟩| leaves margin and still sees
    a 1% error in any leaf whose directional derivative exceeds 1e-4.
    """
    for l, leaf_directions in enumerate(directions):
        for leaf, v in leaf_directions.items():
            analytic = float(np.vdot(np.asarray(grads[l][leaf]), v))
            numeric = float(fd[f"{l}/{leaf}"])
            assert abs(analytic) > 1e-4, f"direction on {l}/{leaf} is degenerate"
            assert abs(numeric - analytic) <= 1e-8 + 1e-6 * abs(analytic), (
                f"leaf {l}/{leaf}: finite difference {numeric!r} != <manual_grad, v> {analytic!r}"
            )


def manual_grad_and_finite_differences(activation, loss, params, x, y, directions):
    kw = dict(activation=activation, loss=loss)
    loss_of_params = lambda p: on_net(bpjax.loss_fn, **kw)(p, x, y)  # noqa: E731
    return on_net(bpjax.manual_grad, **kw)(params, x, y), finite_differences(
        loss_of_params, params, directions
    )


def test_manual_grad_matches_finite_differences():
    # Every activation both as one sample (None) and as a batch, each with one loss.
    cases = [
        ((a, l), None if (i + j) % 2 else 7)
        for i, a in enumerate(ACTIVATIONS)
        for j, l in enumerate(LOSSES)
    ]
    arrays = []
    for (_, loss), batch in cases:
        params, x, y = make_problem(SIZES[2], batch, loss)
        arrays.append((params, x, y, random_directions(params)))
    with jax.enable_x64(True):
        results = packed_jit(
            manual_grad_and_finite_differences,
            [combo for combo, _ in cases],
            to_jax(arrays, jnp.float64),
        )
    for case, (*_, directions), (grads, fd) in zip(cases, arrays, results, strict=True):
        try:
            assert_directional_derivatives_match(grads, directions, fd)
        except AssertionError as e:
            raise AssertionError(f"{case}: {e}") from None


# ------------------------------------------------------------------------ 5. properties


@pytest.mark.parametrize(
    ("dtype", "x64"),
    [(jnp.float32, False), (jnp.float32, True), (jnp.float64, True)],
    ids=["float32", "float32_under_x64", "float64"],
)
def test_every_gradient_leaf_has_its_parameters_shape_and_dtype(dtype, x64):
    # Second document, point 0.2: the gradient of a scalar w.r.t. a variable has
    # the variable's shape. Under x64, float32 must not be promoted to float64.
    # Shapes and dtypes are fixed at trace time: jax.eval_shape, no compilation.
    sizes, M, kw = SIZES[4], 7, dict(activation="tanh", loss="softmax_cross_entropy")
    with jax.enable_x64(x64):
        params = jax.eval_shape(lambda k: bpjax.init_params(k, sizes, dtype), jax.random.key(0))
        assert [(p["W"].shape, p["b"].shape, p["W"].dtype, p["b"].dtype) for p in params] == [
            ((n_out, n_in), (n_out,), dtype, dtype) for n_in, n_out in itertools.pairwise(sizes)
        ]
        x = jax.ShapeDtypeStruct((M, sizes[0]), dtype)
        y = jax.ShapeDtypeStruct((M, sizes[-1]), dtype)
        x1 = jax.ShapeDtypeStruct((sizes[0],), dtype)
        y1 = jax.ShapeDtypeStruct((sizes[-1],), dtype)
        shape_of = lambda fn, *args: jax.eval_shape(on_net(fn, **kw), *args)  # noqa: E731
        grad_of_loss = jax.grad(on_net(bpjax.loss_fn, **kw))
        routes = {
            "manual_grad, batch": shape_of(bpjax.manual_grad, params, x, y),
            "manual_grad, one sample": shape_of(bpjax.manual_grad, params, x1, y1),
            "accumulated_grad": shape_of(bpjax.accumulated_grad, params, x, y),
            "jax.grad(loss_fn)": jax.eval_shape(grad_of_loss, params, x, y),
        }
        for name, grads in routes.items():
            chex.assert_trees_all_equal_structs(grads, params)
            assert jax.tree.leaves(grads) == jax.tree.leaves(params), name
        per_example = shape_of(bpjax.per_example_grads, params, x, y)
        chex.assert_trees_all_equal_structs(per_example, params)
        for g, p in zip(jax.tree.leaves(per_example), jax.tree.leaves(params), strict=True):
            assert (g.shape, g.dtype) == ((M, *p.shape), p.dtype)


PROPERTY_CASES = [("relu", "softmax_cross_entropy"), ("tanh", "squared_error")]
PERM = np.array([3, 0, 6, 1, 5, 2, 4])  # of the first M = 7 samples


@pytest.fixture(scope="module")
def sample_independence():
    """For each of PROPERTY_CASES, one compilation: gradients of a batch of M = 7,
    of the same batch permuted, and of the batch with an 8th sample appended."""
    M = len(PERM)

    def grads(activation, loss, params, x, y):
        per_example = on_net(bpjax.per_example_grads, activation, loss)
        manual = on_net(bpjax.manual_grad, activation, loss)
        return {
            "per_example": per_example(params, x[:M], y[:M]),
            "per_example_permuted": per_example(params, x[PERM], y[PERM]),
            "per_example_appended": per_example(params, x, y),
            "batch": manual(params, x[:M], y[:M]),
            "batch_permuted": manual(params, x[PERM], y[PERM]),
            "batch_appended": manual(params, x, y),
            "appended_sample": manual(params, x[M], y[M]),
        }

    problems = [make_problem(SIZES[4], M + 1, loss) for _, loss in PROPERTY_CASES]
    with jax.enable_x64(True):
        return packed_jit(grads, PROPERTY_CASES, to_jax(problems, jnp.float64))


def test_permuting_the_batch_permutes_per_example_grads(sample_independence):
    for g in sample_independence:
        assert_nontrivial(g["batch"])
        assert_trees_close(
            g["per_example_permuted"],
            jax.tree.map(lambda e: e[PERM], g["per_example"]),
            rtol=1e-12,
            atol=1e-15,
        )
        # The batch mean does not depend on the order (only summation order changes).
        assert_trees_close(g["batch_permuted"], g["batch"], rtol=RTOL64, atol=ATOL64)


def test_appending_a_sample_leaves_the_others_unchanged(sample_independence):
    # Second document, point 0.3: samples (columns) never interact.
    M = len(PERM)
    for g in sample_independence:
        assert_nontrivial(g["appended_sample"])
        assert_trees_close(
            jax.tree.map(lambda e: e[:M], g["per_example_appended"]),
            g["per_example"],
            rtol=1e-12,
            atol=1e-15,
        )
        # The full-matrix path too: (M + 1) g_{M+1} = M g_M + g(new sample).
        combined = jax.tree.map(
            lambda old, new: (M * old + new) / (M + 1), g["batch"], g["appended_sample"]
        )
        assert_trees_close(g["batch_appended"], combined, rtol=RTOL64, atol=ATOL64)


def test_single_sample_path_equals_batch_of_one():
    def single_and_batch_of_one(activation, loss, params, x, y):
        manual, loss_fn = on_net(bpjax.manual_grad, activation, loss), on_net(
            bpjax.loss_fn, activation, loss)  # fmt: skip
        return (
            manual(params, x[0], y[0]),  # first document, δ recursion
            manual(params, x, y),  # second document, section 7, M = 1
            loss_fn(params, x[0], y[0]),
            loss_fn(params, x, y),
        )

    problems = [make_problem(SIZES[3], 1, loss) for _, loss in COMBOS]
    with jax.enable_x64(True):
        results = packed_jit(single_and_batch_of_one, COMBOS, to_jax(problems, jnp.float64))
    for combo, (single, batch, single_loss, batch_loss) in zip(COMBOS, results, strict=True):
        assert_nontrivial(batch)
        try:
            assert_trees_close(single, batch, rtol=RTOL64, atol=ATOL64)
            np.testing.assert_allclose(single_loss, batch_loss, rtol=1e-14)
        except AssertionError as e:
            raise AssertionError(f"{combo}: {e}") from None


# ------------------------------------------------------------------------ 6. negative control


def test_planted_one_percent_error_fails_every_check():
    kw = dict(activation="tanh", loss="softmax_cross_entropy")
    params, x, y = make_problem(SIZES[4], 7, kw["loss"])
    directions = random_directions(params)

    def everything(activation, loss, params, x, y, directions):
        reference = jax.grad(on_net(bpjax.loss_fn, activation, loss))(params, x, y)
        return reference, *manual_grad_and_finite_differences(
            activation, loss, params, x, y, directions
        )

    with jax.enable_x64(True):
        [(reference, grads, fd)] = packed_jit(
            everything, [tuple(kw.values())], [to_jax((params, x, y, directions), jnp.float64)]
        )
    # The controls pass...
    assert_trees_close(grads, reference, rtol=RTOL64, atol=ATOL64)
    assert_directional_derivatives_match(grads, directions, fd)
    # ...and a 1% error in any one leaf fails each of them, naming that leaf.
    for layer, leaf in ((0, "W"), (1, "b"), (3, "W")):
        planted = plant_error(grads, layer, leaf)
        where = f"{layer}/{leaf}"
        with pytest.raises(AssertionError, match=where):
            assert_trees_close(planted, reference, rtol=RTOL64, atol=ATOL64)
        with pytest.raises(AssertionError, match=where):
            assert_directional_derivatives_match(planted, directions, fd)
        # Even the loosest (float32) tolerance of this file sees 1%.
        with pytest.raises(AssertionError, match=where):
            assert_trees_close(planted, reference, rtol=RTOL32, atol=ATOL32)


# ------------------------------------------------------------------------ 8. errors


def test_unknown_activation_or_loss_raises_value_error_naming_the_choices():
    params, x, y = to_jax(make_problem(SIZES[2], 3, "squared_error"), jnp.float32)
    fns = (bpjax.loss_fn, bpjax.manual_grad, bpjax.accumulated_grad, bpjax.per_example_grads)
    for fn in fns:
        for bad, valid in (
            (dict(activation="gelu"), ACTIVATIONS),
            (dict(loss="hinge"), LOSSES),
        ):
            with pytest.raises(ValueError) as excinfo:
                on_net(fn, **bad)(params, x, y)
            message = str(excinfo.value)
            assert repr(next(iter(bad.values()))) in message, (fn.__name__, message)
            for name in valid:
                assert name in message, (fn.__name__, name, message)


def test_wrong_shapes_raise_value_error():
    sizes, M = SIZES[2], 3  # (3, 1, 4)
    params, x, y = to_jax(make_problem(sizes, M, "squared_error"), jnp.float32)
    kw = dict(activation="relu", loss="squared_error")
    bad_inputs = {
        "x has the wrong width": (jnp.ones((M, 2)), y),
        "x is 3-D": (x[:, None, :], y[:, None, :]),
        "x is a scalar": (jnp.ones(()), jnp.ones((4,))),
        "y has the wrong width": (x, jnp.ones((M, 1))),
        "y has the wrong batch size": (x, y[:-1]),
        "y is 1-D for a batch": (x, y[0]),
        "y is 2-D for one sample": (x[0], y),
    }
    for fn in (bpjax.loss_fn, bpjax.manual_grad, bpjax.accumulated_grad):
        for case, (bad_x, bad_y) in bad_inputs.items():
            if fn is bpjax.accumulated_grad and bad_x.ndim < 2:
                continue  # accumulation is defined for batches only
            with pytest.raises(ValueError, match=r"must be"):
                on_net(fn, **kw)(params, bad_x, bad_y)
                pytest.fail(f"{fn.__name__}: {case} was accepted")


def test_integer_labels_where_one_hot_rows_are_expected_name_jax_nn_one_hot():
    net = bpjax.Net.mlp((4, 3, 2))
    params = bpjax.init_params(jax.random.key(0), net)
    labels = jnp.array([0, 1, 1])
    for fn in (bpjax.loss_fn, bpjax.manual_grad):
        with pytest.raises(ValueError, match=r"jax\.nn\.one_hot\(y, 2\)"):
            fn(net, params, jnp.ones((3, 4)), labels)
    # the suggested fix is the right one
    bpjax.manual_grad(net, params, jnp.ones((3, 4)), jax.nn.one_hot(labels, 2))


def test_init_params_rejects_bad_sizes():
    for sizes in ((3,), (3, 0, 2), ()):
        with pytest.raises(ValueError, match="sizes"):
            bpjax.init_params(jax.random.key(0), sizes)


# ------------------------------------------------------------------------ 9. compile count


def test_jitted_manual_grad_traces_once_per_input_shape():
    traces = 0

    def counted(params, x, y, *, activation, loss):
        nonlocal traces
        traces += 1
        return on_net(bpjax.manual_grad, activation, loss)(params, x, y)

    jitted = jax.jit(counted, static_argnames=("activation", "loss"))
    kw = dict(activation="relu", loss="softmax_cross_entropy")
    first = to_jax(make_problem(SIZES[2], 5, kw["loss"], seed=0), jnp.float32)
    second = to_jax(make_problem(SIZES[2], 5, kw["loss"], seed=1), jnp.float32)
    g1 = jitted(*first, **kw)
    g2 = jitted(*second, **kw)
    assert traces == 1  # same shapes, new values: no retrace
    assert not np.allclose(g1[0]["W"], g2[0]["W"])  # ...and the values did change
    jitted(*to_jax(make_problem(SIZES[2], 6, kw["loss"]), jnp.float32), **kw)
    assert traces == 2  # a new batch size compiles once more
    jitted(*first, **dict(kw, activation="tanh"))
    assert traces == 3  # so does a new static activation
    jitted(*second, **kw)
    assert traces == 3  # and the first one is still cached


def test_jitted_manual_grad_assert_max_traces():
    chex.clear_trace_counter()
    jitted = jax.jit(chex.assert_max_traces(bpjax.manual_grad, n=1), static_argnums=0)
    net = bpjax.Net.mlp(SIZES[2], "sigmoid", "squared_error")
    for seed in range(3):
        jitted(net, *to_jax(make_problem(SIZES[2], 4, net.loss, seed=seed), jnp.float32))
    # The counter can fail: a second input shape is a second trace.
    with pytest.raises(AssertionError):
        jitted(net, *to_jax(make_problem(SIZES[2], 3, net.loss), jnp.float32))
