"""bpjax.bench.timing: the protocol every benchmark's numbers go through."""

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpjax.bench import timing
from bpjax.bench.timing import (
    COMPILES,
    carried_state,
    compare_fns,
    compile_fn,
    time_fn,
    timing_from_times,
)
from bpjax.training import TrainState


def test_timing_statistics_from_raw_times():
    t = timing_from_times([3.0, 1.0, 2.0, 4.0, 5.0], compile_s=0.5, cpu_times_s=[2.0, 2.0, 4.0])
    assert (t.median_s, t.min_s, t.repeats, t.compile_s, t.cpu_median_s) == (3.0, 1.0, 5, 0.5, 2.0)
    assert t.p10_s == pytest.approx(1.4) and t.p90_s == pytest.approx(4.6)
    assert t.spread == pytest.approx((4.6 - 1.4) / 3.0)
    assert "times_s" not in t.as_dict() and t.as_dict()["spread"] == pytest.approx(t.spread)
    with pytest.raises(ValueError, match="at least one repeat"):
        timing_from_times([])


def test_compile_fn_compiles_once_and_the_compiled_function_never_recompiles():
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
    x = jnp.arange(7.0)
    compiled, compile_s, n = compile_fn(f, x)
    assert n == 1 and compile_s > 0
    before = COMPILES.count
    np.testing.assert_allclose(compiled(x), np.sin(np.arange(7.0)) * 3 + 1, rtol=1e-6)
    assert COMPILES.count == before
    with pytest.raises(TypeError):  # a new shape is refused, not silently recompiled
        compiled(jnp.arange(8.0))
    host = lambda: None  # noqa: E731
    assert compile_fn(host) == (host, 0.0, 0)


def test_compare_fns_interleaves_in_random_orders():
    calls = []
    fns = {name: ((lambda name=name: calls.append(name)), ()) for name in "abcd"}
    timings = compare_fns(fns, repeats=40, warmup=1)
    assert all(t.repeats == 40 for t in timings.values())
    timed = calls[4:]  # after one warm-up round
    rounds = [timed[i : i + 4] for i in range(0, len(timed), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # every function once per round
    # Each function follows every other one somewhere: no fixed predecessor (a rotation
    # a b c d, b c d a, ... would give "a" the predecessor "d" in every round but the first).
    predecessors = {(x, y) for x, y in itertools.pairwise(timed)}
    assert predecessors >= {(x, y) for x in "abcd" for y in "abcd" if x != y}


def test_carry_feeds_the_first_output_back_like_a_training_loop():
    step = jax.jit(lambda s, inc: (s + inc, s), donate_argnums=0)
    state = jnp.zeros(())
    t = time_fn(step, state, jnp.ones(()), repeats=5, warmup=2, carry=True)
    assert t.repeats == 5
    # Without carry the second call would pass the buffer the first one donated.
    with pytest.raises(ValueError, match="deleted or donated"):
        time_fn(step, jnp.zeros(()), jnp.ones(()), repeats=2, warmup=1, carry=False)


class _State(NamedTuple):
    count: int
    history: tuple


def test_carry_feeds_a_namedtuple_state_back_whole():
    """A step returning its state as a NamedTuple (TrainState) gets that state back, not field 0."""
    seen = []

    def step(state, inc):
        seen.append(state)
        return _State(state.count + inc, (*state.history, state.count))

    time_fn(step, _State(0, ()), 1, repeats=3, warmup=1, carry=True)
    assert all(isinstance(s, _State) for s in seen) and [s.count for s in seen] == [0, 1, 2, 3]
    # ... and a plain tuple (state, metrics) gets its first element back.
    pairs = []
    time_fn(lambda s: pairs.append(s) or (s + 1, {"loss": 0.0}), 0, repeats=2, warmup=1,
            carry=True)  # fmt: skip
    assert pairs == [0, 1, 2]


def test_carry_threads_a_donated_train_state_through_a_jitted_step():
    def step(state, x):
        params = jax.tree.map(lambda p: p + x, state.params)
        return TrainState(params, state.opt_state, state.step + 1)

    state = TrainState({"W": jnp.zeros((3,))}, (), jnp.zeros((), jnp.int32))
    t = time_fn(jax.jit(step, donate_argnums=0), state, jnp.ones(()), repeats=4, warmup=1,
                carry=True)  # fmt: skip
    assert t.repeats == 4
    assert carried_state(state) is state and carried_state((state, {})) is state


def test_min_time_adds_rounds_for_fast_functions():
    t = time_fn(lambda: None, repeats=3, warmup=0, min_time_s=0.02)
    assert t.repeats > 3


@jax.jit
def _matmul_chain(a):
    """About 50 ms of float32 work on one CPU core: eight 600x600 products."""
    for _ in range(8):
        a = jnp.tanh(a @ a)
    return a


def _timed_against_a_blocking_reference() -> tuple[float, float]:
    """Medians of ``compare_fns`` timing the jitted chain, interleaved with a reference that
    blocks on the chain's result itself (a plain function, called as is)."""
    x = jnp.full((600, 600), 1.0 / 600, jnp.float32)
    reference = lambda a: jax.block_until_ready(_matmul_chain(a))  # noqa: E731
    t = compare_fns({"timed": (_matmul_chain, (x,)), "reference": (reference, (x,))},
                    repeats=5, warmup=1)  # fmt: skip
    return t["timed"].median_s, t["reference"].median_s


def test_the_timer_waits_for_work_that_was_dispatched_asynchronously(monkeypatch):
    """A jitted call returns at dispatch, before its result is computed (asynchronous
    dispatch, on the CPU too): a timer that forgot ``block_until_ready`` would time the
    dispatch (~0.1 ms), not the work (~50 ms). The two are interleaved, so a loaded machine
    slows both alike; the factor 0.3 leaves room for noise, not for a missing block."""
    timed, reference = _timed_against_a_blocking_reference()
    assert timed >= 0.3 * reference, (timed, reference)
    # Negative control: the timer without its block measures the dispatch only, so the
    # check above fails; if it did not, dispatch here were synchronous and the test blind.
    monkeypatch.setattr(timing, "_block", lambda out: out)
    unblocked, reference = _timed_against_a_blocking_reference()
    assert unblocked < 0.3 * reference, (unblocked, reference)
