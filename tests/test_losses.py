"""The losses' output errors (7.1) against ``jax.grad`` of their per-sample loss.

Float64 in a scoped ``jax.enable_x64``, rtol 1e-10 (STYLE.md 9). Each loss's
``error(z, y)`` is dℓ/dz of one sample's ``per_sample(z, y)``; the hand-written
backward starts from it, so ``manual_grad`` must then equal ``jax.grad(loss_fn)``.
A 1% error planted in the output error must fail the same comparison.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax
from bpjax.losses import get_loss

RTOL64, ATOL64 = 1e-10, 1e-12
SIZES = (6, 5, 4, 3)


def _targets(rng: np.random.Generator, shape: tuple[int, ...], loss: str) -> np.ndarray:
    """One-hot rows for the cross-entropies (sigmoid: also soft targets in [0, 1]), else N(0, 1)."""
    if loss == "softmax_cross_entropy":
        return np.eye(shape[-1])[rng.integers(shape[-1], size=shape[:-1])]
    if loss == "sigmoid_cross_entropy":
        hard = np.eye(shape[-1])[rng.integers(shape[-1], size=shape[:-1])]
        return np.where(rng.random(shape) < 0.5, hard, rng.random(shape))
    return rng.normal(size=shape)


@pytest.mark.parametrize("loss", tuple(bpjax.LOSSES))
def test_output_error_is_the_gradient_of_the_per_sample_loss(loss):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        z = jnp.asarray(rng.normal(0.0, 3.0, (16, 5)))
        y = jnp.asarray(_targets(rng, (16, 5), loss))
        fns = get_loss(loss)
        expected = jax.vmap(jax.grad(fns.per_sample))(z, y)
        actual = fns.error(z, y)
        assert actual.dtype == jnp.float64 and actual.shape == z.shape
        np.testing.assert_allclose(actual, expected, rtol=RTOL64, atol=ATOL64)
        planted = actual.at[3, 2].multiply(1.01)  # negative control: 1% off in one entry
        with pytest.raises(AssertionError):
            np.testing.assert_allclose(planted, expected, rtol=RTOL64, atol=ATOL64)


def test_sigmoid_cross_entropy_is_binary_cross_entropy_and_stable():
    rng = np.random.default_rng(1)
    fns = get_loss("sigmoid_cross_entropy")
    with jax.enable_x64(True):
        z = rng.normal(0.0, 2.0, (8, 10))
        y = _targets(rng, (8, 10), "sigmoid_cross_entropy")
        s = 1.0 / (1.0 + np.exp(-z))
        naive = -np.sum(y * np.log(s) + (1 - y) * np.log(1 - s), axis=-1)
        np.testing.assert_allclose(fns.per_sample(jnp.asarray(z), jnp.asarray(y)), naive,
                                   rtol=1e-12)  # fmt: skip
        np.testing.assert_allclose(fns.error(jnp.asarray(z), jnp.asarray(y)), s - y, rtol=1e-12,
                                   atol=1e-15)  # fmt: skip
    # Far-saturated logits, where log(σ(z)) of the naive form is log(0) in float32:
    # the loss stays finite and exact (softplus(z) - y z), the error is σ(z) - y.
    z = jnp.asarray([[1000.0, -1000.0, 200.0, -200.0, 0.0]], jnp.float32)
    y = jnp.asarray([[0.0, 1.0, 1.0, 0.0, 1.0]], jnp.float32)
    loss = fns.per_sample(z, y)
    np.testing.assert_allclose(loss, [1000.0 + 1000.0 + 0.0 + 0.0 + np.log(2.0)], rtol=1e-6)
    np.testing.assert_allclose(fns.error(z, y), [[1.0, -1.0, 0.0, 0.0, -0.5]], atol=1e-7)


@pytest.mark.parametrize("activation", ("sigmoid", "relu"))
def test_manual_grad_equals_jax_grad_with_sigmoid_cross_entropy(activation):
    rng = np.random.default_rng(2)
    net = bpjax.Net.mlp(SIZES, activation, "sigmoid_cross_entropy")
    with jax.enable_x64(True):
        params = bpjax.init_params(jax.random.key(0), SIZES, jnp.float64)
        params = [dict(p, b=jnp.asarray(rng.normal(0.0, 0.5, p["b"].shape))) for p in params]
        x = jnp.asarray(rng.normal(size=(16, SIZES[0])))
        y = jnp.asarray(_targets(rng, (16, SIZES[-1]), "sigmoid_cross_entropy"))
        manual = jax.jit(functools.partial(bpjax.manual_grad, net))(params, x, y)
        expected = jax.jit(jax.grad(functools.partial(bpjax.loss_fn, net)))(params, x, y)
        one = jax.jit(functools.partial(bpjax.manual_grad, net))(params, x[0], y[0])
        one_expected = jax.grad(functools.partial(bpjax.loss_fn, net))(params, x[0], y[0])
    assert jax.tree.structure(manual) == jax.tree.structure(expected)
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(manual),
                            jax.tree.leaves(expected), strict=True):  # fmt: skip
        assert a.dtype == jnp.float64
        np.testing.assert_allclose(a, e, rtol=RTOL64, atol=ATOL64, err_msg=str(path))
    for a, e in zip(jax.tree.leaves(one), jax.tree.leaves(one_expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=RTOL64, atol=ATOL64)
    planted = np.asarray(manual[0]["W"]) * 1.01  # negative control
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(planted, expected[0]["W"], rtol=RTOL64, atol=ATOL64)
