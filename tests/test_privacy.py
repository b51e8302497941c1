"""Per-example norms, ghost clipping and DP-SGD against jax.vmap(jax.grad) and optax.

Every comparison runs in float64 inside a scoped ``jax.enable_x64`` at rtol 1e-10.
The reference per-example gradients are ``jax.vmap(jax.grad(loss_fn))`` on single
samples, independent of ``bpjax.privacy``.
"""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bpjax import privacy
from bpjax.feedback import feedback_shapes
from bpjax.formulas import manual_grad
from bpjax.methods import METHODS
from bpjax.network import Net, layer_sizes, loss_fn, predict
from bpjax.rules import get_rule, step_key

RTOL = 1e-10
ATOL = 1e-12


def _problem(sizes, loss, m=8, seed=0, dtype=jnp.float64):
    """Glorot-like params, Gaussian inputs, targets; NumPy-built, so no eager JAX compiles."""
    rng = np.random.default_rng(seed)
    params = [
        {"W": jnp.asarray(rng.normal(size=(n_out, n_in)) / np.sqrt(n_in), dtype),
         "b": jnp.asarray(0.1 * rng.normal(size=(n_out,)), dtype)}
        for n_in, n_out in itertools.pairwise(sizes)
    ]
    x = jnp.asarray(rng.normal(size=(m, sizes[0])), dtype)
    if loss == "softmax_cross_entropy":
        y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], size=m)]
    else:
        y = rng.normal(size=(m, sizes[-1]))
    return params, x, jnp.asarray(y, dtype)


def net_of(params, activation="relu", loss="softmax_cross_entropy"):
    """The MLP whose params these are (its widths read off the weights' shapes)."""
    return Net.mlp(layer_sizes(params), activation, loss)


@functools.partial(jax.jit, static_argnames=("activation", "loss"))
def _reference_per_example_grads(params, x, y, activation, loss):
    one = functools.partial(loss_fn, net_of(params, activation, loss))
    return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)


@jax.jit
def _tree_norms(grads_M):
    return jax.vmap(optax.tree.norm)(grads_M)


CASES = [
    ((5, 7, 3), "relu", "softmax_cross_entropy"),
    ((4, 6, 5, 3), "tanh", "squared_error"),
    ((6, 4, 8, 5, 2), "sigmoid", "softmax_cross_entropy"),
    ((3, 2), "identity", "squared_error"),
]


@pytest.mark.parametrize("sizes,activation,loss", CASES)
def test_norms_equal_vmapped_grad_norms(sizes, activation, loss):
    with jax.enable_x64(True):
        params, x, y = _problem(sizes, loss)
        net = net_of(params, activation, loss)
        norms = jax.jit(functools.partial(privacy.per_example_grad_norms, net))(params, x, y)
        expected = _tree_norms(_reference_per_example_grads(params, x, y, activation, loss))
        assert norms.shape == (x.shape[0],) and norms.dtype == jnp.float64
        chex.assert_trees_all_close(norms, expected, rtol=RTOL, atol=ATOL)


@jax.jit
def _optax_clipped_sum(grads_M, clip):
    leaves, treedef = jax.tree.flatten(grads_M)
    clipped, _ = optax.per_example_global_norm_clip(leaves, clip)
    return jax.tree.unflatten(treedef, clipped)


@pytest.mark.parametrize("sizes,activation,loss", CASES)
def test_clipped_sum_equals_clipping_vmapped_grads(sizes, activation, loss):
    with jax.enable_x64(True):
        params, x, y = _problem(sizes, loss)
        grads_M = _reference_per_example_grads(params, x, y, activation, loss)
        norms = _tree_norms(grads_M)
        clip = float(jnp.median(norms))  # clips about half of the samples
        assert 0 < int(jnp.sum(norms > clip)) < x.shape[0]
        expected = _optax_clipped_sum(grads_M, clip)

        net = net_of(params, activation, loss)
        fn = functools.partial(privacy.clipped_grad, net)
        grads_sum, outputs = jax.jit(fn)(params, x, y, clip=clip)
        chex.assert_trees_all_close(grads_sum, expected, rtol=RTOL, atol=ATOL)
        logits = jax.jit(functools.partial(predict, net))(params, x)
        chex.assert_trees_all_close(outputs, logits, rtol=RTOL, atol=ATOL)
        # Negative control: a 1% error planted in one leaf must fail the same check.
        planted = [dict(layer) for layer in grads_sum]
        planted[0]["W"] = planted[0]["W"] * 1.01
        with pytest.raises(AssertionError):
            chex.assert_trees_all_close(planted, expected, rtol=RTOL, atol=ATOL)


def test_no_clip_no_noise_is_manual_grad_and_outputs_are_logits():
    with jax.enable_x64(True):
        params, x, y = _problem((5, 7, 3), "softmax_cross_entropy")

        net = net_of(params)

        @jax.jit
        def both(params, x, y):
            fn = privacy.private_grad_fn(net, "manual", clip=jnp.inf, noise_multiplier=0.0)
            return fn(params, x, y, None), (manual_grad(net, params, x, y),
                                            predict(net, params, x))  # fmt: skip

        got, expected = both(params, x, y)
        chex.assert_trees_all_close(got, expected, rtol=RTOL, atol=ATOL)


def test_noised_mean_equals_optax_dp_aggregate_for_same_key():
    with jax.enable_x64(True):
        activation, loss = "tanh", "softmax_cross_entropy"
        params, x, y = _problem((5, 7, 3), loss)
        grads_M = _reference_per_example_grads(params, x, y, activation, loss)
        clip = float(jnp.median(_tree_norms(grads_M)))
        key = jax.random.key(42)

        @jax.jit
        def both(params, x, y, grads_M, key):
            tx = optax.contrib.differentially_private_aggregate(clip, 1.3, key)
            expected, _ = tx.update(grads_M, tx.init(params))
            got = privacy.private_grad(
                net_of(params, activation, loss), params, x, y, key, clip=clip,
                noise_multiplier=1.3,
            )
            return got, expected

        got, expected = both(params, x, y, grads_M, key)
        chex.assert_trees_all_close(got, expected, rtol=RTOL, atol=ATOL)


def test_every_method_gives_the_manual_result_for_the_same_key():
    with jax.enable_x64(True):
        activation, loss = "relu", "squared_error"
        params, x, y = _problem((5, 7, 6, 3), loss)
        net = net_of(params, activation, loss)
        clip = float(jnp.median(jax.jit(functools.partial(privacy.per_example_grad_norms, net))(
            params, x, y)))

        @jax.jit
        def all_methods(params, x, y, key):  # one compile; the noise is drawn once (CSE)
            return {
                m: privacy.private_grad_fn(net, m, clip=clip, noise_multiplier=0.7)(
                    params, x, y, key
                )
                for m in METHODS
            }

        results = all_methods(params, x, y, jax.random.key(3))
        for method in METHODS:
            grads, outputs = results[method]
            chex.assert_trees_all_equal_structs(grads, params)
            chex.assert_trees_all_close(
                (grads, outputs), results["manual"], rtol=RTOL, atol=ATOL,
                custom_message=f"method {method}",
            )


def test_reproducible_for_a_fixed_key_and_compiled_once():
    params, x, y = _problem((5, 7, 3), "softmax_cross_entropy", dtype=jnp.float32)
    traces = []

    def step(params, x, y, key, clip, sigma):
        traces.append(1)
        return privacy.private_grad_fn(net_of(params), "manual", clip=clip,
                                       noise_multiplier=sigma)(params, x, y, key)  # fmt: skip

    jitted = jax.jit(step)  # clip and noise multiplier traced: no recompilation per value
    a, out_a = jitted(params, x, y, jax.random.key(1), 0.5, 1.1)
    b, out_b = jitted(params, x, y, jax.random.key(1), 0.5, 1.1)
    c, _ = jitted(params, x, y, jax.random.key(2), 0.4, 1.0)
    assert len(traces) == 1
    chex.assert_trees_all_equal(a, b)
    chex.assert_trees_all_equal(out_a, out_b)
    assert not np.allclose(a[0]["W"], c[0]["W"])


def test_noise_is_gaussian_with_std_sigma_clip_over_m():
    with jax.enable_x64(True):
        params, x, y = _problem((30, 40, 10), "softmax_cross_entropy", m=4)
        clip, sigma = 0.3, 2.0

        @jax.jit
        def standardized_noise(params, x, y, key):
            grad = functools.partial(privacy.private_grad, net_of(params), params, x, y, clip=clip)
            clean, noisy = grad(None, noise_multiplier=0.0), grad(key, noise_multiplier=sigma)
            diffs = jax.tree.leaves(jax.tree.map(lambda n, c: jnp.ravel(n - c), noisy, clean))
            return jnp.concatenate(diffs) * x.shape[0] / (sigma * clip)

        z = standardized_noise(params, x, y, jax.random.key(0))  # 1650 standard normals if (P)
        assert z.shape == (1650,)
        assert abs(float(jnp.mean(z))) < 0.1
        assert abs(float(jnp.std(z)) - 1.0) < 0.06


def test_clip_factors_follow_optax_conventions():
    norms = np.array([0.0, 1.0, 4.0], np.float32)
    np.testing.assert_allclose(privacy.clip_factors(norms, 2.0), [1.0, 1.0, 0.5])
    # C = 0: every nonzero gradient is zeroed; 0/0 maps to 1 (optax's nan_to_num).
    np.testing.assert_allclose(privacy.clip_factors(norms, 0.0), [1.0, 0.0, 0.0])
    # Zero per-example gradients (zero weights, zero targets): c = 1, no NaN.
    params, x, y = _problem((3, 4, 2), "squared_error", dtype=jnp.float32)
    params = jax.tree.map(jnp.zeros_like, params)
    fn = functools.partial(privacy.clipped_grad, net_of(params, loss="squared_error"), clip=1.0)
    grads, _ = jax.jit(fn)(params, x, jnp.zeros_like(y))
    assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(grads))


def test_ghost_clipping_memory_grows_with_width_not_parameters():
    sizes, m = (64, 128, 10), 256
    params, x, y = _problem(sizes, "softmax_cross_entropy", m=m, dtype=jnp.float32)
    n_params = sum(a.size for a in jax.tree.leaves(params))

    def temp_bytes(method):
        fn = privacy.private_grad_fn(net_of(params), method, clip=1.0, noise_multiplier=0.0)
        compiled = jax.jit(fn).lower(params, x, y, None).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    per_example_bytes = m * n_params * 4
    assert temp_bytes("manual") < per_example_bytes / 4
    assert temp_bytes("autodiff") >= per_example_bytes


def test_bad_arguments_raise_one_line_errors():
    params, x, y = _problem((3, 4, 2), "squared_error", dtype=jnp.float32)
    net = net_of(params, loss="squared_error")
    with pytest.raises(ValueError, match="unknown method"):
        privacy.private_grad_fn(net, "nope", clip=1.0)
    with pytest.raises(ValueError, match="clip must be >= 0"):
        privacy.private_grad_fn(net, "manual", clip=-1.0)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        privacy.private_grad(net, params, x, y, None, clip=1.0, noise_multiplier=1.0)


# ------------------------------------------------------------------------ feedback rules
RULE_CASES = [
    ("fa", (5, 7, 6, 3), "tanh", "softmax_cross_entropy"),
    ("kp", (4, 6, 3), "relu", "squared_error"),
    ("dfa", (6, 4, 8, 5, 2), "sigmoid", "softmax_cross_entropy"),
    ("sign", (5, 7, 6, 3), "relu", "softmax_cross_entropy"),
    ("frsf", (5, 7, 6, 3), "tanh", "softmax_cross_entropy"),
    ("brsf", (4, 6, 5, 3), "relu", "squared_error"),  # its R from the step key's own stream
]


def _feedback(sizes, rule, seed=1):
    rng = np.random.default_rng(seed)
    shapes = feedback_shapes(sizes, rule)
    return [jnp.asarray(rng.uniform(-0.5, 0.5, shape), jnp.float64) for shape in shapes]


@pytest.mark.parametrize("rule,sizes,activation,loss", RULE_CASES)
def test_rule_ghost_norms_and_clipping_equal_vmapped_per_example_rule_updates(
    rule, sizes, activation, loss
):
    # Under a rule, sample m's update is dZ^l_m (A^{l-1}_m)^T with the rule's own rows:
    # ghost norms and ghost clipping against the rule's explicit per-example updates
    # (the single-sample formulas under jax.vmap), clipped as optax does.
    net = Net.mlp(sizes, activation, loss)

    @jax.jit
    def everything(params, x, y, feedback, key):
        kw = dict(rule=rule, feedback=feedback, key=step_key(get_rule(rule), key))
        one = lambda xm, ym: manual_grad(net, params, xm, ym, **kw)  # noqa: E731
        updates_M = jax.vmap(one)(x, y)
        norms_M = jax.vmap(optax.tree.norm)(updates_M)
        clip = jnp.median(norms_M)  # clips about half of the samples
        ghost = privacy.per_example_grad_norms(net, params, x, y, **kw)
        bp = privacy.per_example_grad_norms(net, params, x, y)
        expected = jax.tree.map(lambda g: g / x.shape[0], _optax_clipped_sum(updates_M, clip))
        dp = {
            m: privacy.private_grad_fn(net, m, clip=clip, noise_multiplier=0.0, rule=rule)(
                params, x, y, key, feedback
            )[0]
            for m in ("manual", "manual_vmap", "per_sample")
        }
        return norms_M, ghost, bp, clip, expected, dp

    with jax.enable_x64(True):
        params, x, y = _problem(sizes, loss)
        feedback = _feedback(sizes, rule)
        norms_M, ghost, bp, clip, expected, dp = everything(params, x, y, feedback,
                                                            jax.random.key(4))  # fmt: skip
        assert 0 < int(jnp.sum(norms_M > clip)) < x.shape[0]
        chex.assert_trees_all_close(ghost, norms_M, rtol=RTOL, atol=ATOL)
        for method, grads in dp.items():
            chex.assert_trees_all_close(
                grads, expected, rtol=RTOL, atol=ATOL, custom_message=f"{rule}, {method}"
            )
        # Negative control: the rule's norms are not the true gradients' norms.
        with pytest.raises(AssertionError):
            chex.assert_trees_all_close(bp, norms_M, rtol=RTOL, atol=ATOL)


def test_autodiff_routes_refuse_a_rule_and_a_rule_needs_its_feedback():
    params, x, y = _problem((3, 4, 2), "squared_error", dtype=jnp.float32)
    net = net_of(params, loss="squared_error")
    for method in ("autodiff", "autodiff_vmap"):
        with pytest.raises(ValueError, match="rules other than bp need --method=manual") as e:
            privacy.private_grad_fn(net, method, clip=1.0, rule="fa")
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="rule 'dfa' needs feedback"):
        privacy.private_grad_fn(net, "manual", clip=1.0, rule="dfa")(params, x, y, None)
