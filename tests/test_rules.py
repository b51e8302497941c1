"""Feedback rules as values (``bpjax.rules``): BioTorch's rules, your own rule, old runs.

The protocol of ``test_feedback.py`` (float64 in a scoped ``jax.enable_x64``, rtol
1e-10, a negative control where a check could pass vacuously), plus the record:
a rule named by import path trains through ``launch.py`` (a real process), is
recorded by name, path and source hash, resumes bit-identically, and is refused in
one line when its module is missing or changed. A run directory written before the
redesign (``tests/fixtures/run_before_open_backward``) still loads and resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax
from bpjax import rules
from bpjax import step as step_lib
from bpjax.rules import glorot_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
FIXTURE = os.path.join(TESTS, "fixtures", "run_before_open_backward")
RTOL, ATOL = 1e-10, 1e-12
M = 5
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # small programs: compile time dominates


def jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def problem(sizes, seed=0, activation="tanh", loss="softmax_cross_entropy"):
    """``(net, params, x, y)`` in float64 (call inside ``jax.enable_x64``)."""
    net = bpjax.Net.mlp(sizes, activation, loss)
    params = bpjax.init_params(jax.random.key(seed), net, jnp.float64)
    params = [dict(p, b=jnp.full_like(p["b"], 0.1)) for p in params]  # nonzero biases
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(M, sizes[0])))
    y = jnp.asarray(np.eye(sizes[-1])[rng.integers(sizes[-1], size=M)])
    return net, params, x, y


def close(actual, expected, rtol=RTOL, atol=ATOL):
    chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)
    chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def fixture_dataset():
    """The data the old-run fixture was trained on, regenerated (see make_old_run below)."""
    rng = np.random.default_rng(21)
    n_train, n_test, d, k = 96, 32, 6, 3
    x = rng.normal(size=(n_train + n_test, d)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(d, k)), axis=1).astype(np.int32)
    return bpjax.Dataset("fixture", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 3)


# The fixture was written by the code before the redesign (commit 5d991d0), with
#   bpjax.train(Config(hidden=(8,), feedback="fa", dtype="float64", epochs=2, batch=16,
#       lr=0.1, seed=3, workdir=..., checkpoint_every=1, keep_checkpoints=2),
#       dataset=fixture_dataset(), log=None)
# and its .lock removed: two checkpoints of a 6-8-3 network, 73 KB.


# ----------------------------------------------------------------- BioTorch's rules


def sign_weights(params, c):
    return [dict(p, W=c * jnp.sign(p["W"])) for p in params]


@pytest.mark.parametrize("scale", [False, True])
def test_usf_on_weights_of_plus_minus_c_is_bp_with_each_step_scaled(scale):
    # sign(W) = W / c, so B^l = s_l sign(W^l) = (s_l / c) W^l: every (7.2) step from the
    # output down to layer l multiplies bp's error by s_k / c (s_k = 1 unscaled).
    c, sizes = 0.37, (4, 6, 5, 7, 3)
    with jax.enable_x64(True):
        net, params, x, y = problem(sizes)
        params = sign_weights(params, c)
        rule = rules.usf.scaled() if scale else rules.usf
        got, true = jit(lambda p: (bpjax.manual_grad(net, p, x, y, rule=rule),
                                   bpjax.manual_grad(net, p, x, y)))(params)  # fmt: skip
        step = [(rules.fan_scale(p["W"].shape) if scale else 1.0) / c for p in params]
        L = len(params)
        factors = [math.prod(step[l + 1:]) for l in range(L)]  # layer l: steps l+1..L-1
        expected = [jax.tree.map(lambda g, f=f: g * f, g) for g, f in zip(true, factors,
                                                                        strict=True)]  # fmt: skip
        close(got, expected)
        with pytest.raises(AssertionError):  # negative control: unscaled bp is not it
            close(got, true)


def test_the_scale_is_biotorchs_sqrt_2_over_fan_in_plus_fan_out():
    assert rules.fan_scale((500, 784)) == pytest.approx(math.sqrt(2 / 1284))
    assert rules.fan_scale((8, 3, 5, 5)) == pytest.approx(math.sqrt(2 / (3 * 25 + 8 * 25)))
    assert rules.usf.scaled() == rules.usf.scaled()  # a value: one jit cache entry
    with pytest.raises(ValueError, match="'sign' has no scaled form"):
        rules.sign.scaled()


@pytest.mark.parametrize("scale", [False, True])
def test_frsf_with_all_magnitudes_one_is_usf(scale):
    with jax.enable_x64(True):
        net, params, x, y = problem((3, 5, 4, 2), seed=1)
        frsf, usf = (rules.frsf.scaled(), rules.usf.scaled()) if scale else (rules.frsf, rules.usf)
        ones = [jnp.ones_like(p["W"]) for p in params[1:]]
        R = bpjax.init_feedback(jax.random.key(0), net, frsf, jnp.float64)
        grad = lambda rule, fb: bpjax.manual_grad(net, params, x, y, rule=rule, feedback=fb)  # noqa: E731
        frsf_ones, frsf_R, usf_ = jit(lambda ones, R: (
            grad(frsf, ones), grad(frsf, R), grad(usf, [])))(ones, R)  # fmt: skip
        close(frsf_ones, usf_)
        with pytest.raises(AssertionError):  # negative control: random magnitudes are not
            close(frsf_R, usf_)


def test_brsf_draws_its_magnitudes_from_the_key_and_only_from_it():
    with jax.enable_x64(True):
        net, params, x, y = problem((3, 5, 4, 2), seed=2)
        k1, k2 = jax.random.key(1), jax.random.key(2)
        brsf = jit(lambda k: bpjax.manual_grad(net, params, x, y, rule="brsf", key=k))
        # R^l = Glorot-uniform from fold_in(key, l): brsf is frsf with those magnitudes.
        R = [glorot_state(jax.random.fold_in(k1, l), p["W"].shape, jnp.float64)
             for l, p in enumerate(params[1:], start=1)]  # fmt: skip
        close(brsf(k1), jit(lambda R: bpjax.manual_grad(net, params, x, y, rule="frsf",
                                                       feedback=R))(R))  # fmt: skip
        close(brsf(k1), brsf(k1))
        assert not np.allclose(brsf(k1)[0]["W"], brsf(k2)[0]["W"])  # another key, another R
        np.testing.assert_array_equal(brsf(k1)[-1]["W"], brsf(k2)[-1]["W"])  # output exact
        with pytest.raises(ValueError, match="per-step key"):
            bpjax.manual_grad(net, params, x, y, rule="brsf")


@pytest.mark.parametrize("hidden", [1, 2, 3, 4, 5])
def test_every_rule_jits_and_vmaps_on_one_to_five_hidden_layers(hidden):
    sizes = (4, *(6 - h % 2 for h in range(hidden)), 3)
    key = jax.random.key(7)
    with jax.enable_x64(True):
        net, params, x, y = problem(sizes, seed=hidden, activation="relu")

        def all_rules(params, x, y):
            out = {}
            for name in bpjax.FEEDBACK_RULES:
                rule = bpjax.get_rule(name)
                fb = bpjax.init_feedback(jax.random.key(3), net, rule, jnp.float64)
                kw = dict(rule=rule, feedback=fb, key=key)
                one = lambda xm, ym, kw=kw: bpjax.manual_grad(  # noqa: E731
                    net, params, xm, ym, **kw)
                out[name] = (bpjax.manual_grad(net, params, x, y, **kw),
                             jax.tree.map(lambda g: g.mean(0), jax.vmap(one)(x, y)))  # fmt: skip
            return out

        results = jit(all_rules)(params, x, y)
    for name, (batch, per_example) in results.items():
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(batch)), name
        try:
            close(per_example, batch)
        except AssertionError as e:
            raise AssertionError(f"{name}, {hidden} hidden: {e}") from None
    assert not np.allclose(results["usf"][0][0]["W"], results["bp"][0][0]["W"])


# ----------------------------------------------------------------- your own rule


def test_a_rule_is_a_value_registered_by_name_and_refused_in_one_line():
    from custom_rules import sparse_fa

    assert bpjax.register_rule(sparse_fa) is sparse_fa
    assert bpjax.get_rule("sparse_fa") is sparse_fa
    assert bpjax.get_rule("custom_rules:sparse_fa") is sparse_fa
    bad = {
        "nonexistent": "unknown feedback rule 'nonexistent'",
        "no_such_module:rule": "cannot import no_such_module",
        "custom_rules:nothing": "has no bpjax.Rule named 'nothing'",
        "custom_rules:": "an import path is package.module:name",
    }
    for spec, message in bad.items():
        with pytest.raises(ValueError, match=message) as e:
            bpjax.Config(feedback=spec)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="already registered"):
        bpjax.register_rule(bpjax.Rule("fa", lambda W, B, key: W))
    with pytest.raises(ValueError, match="no scaled form"):
        bpjax.Config(feedback="sparse_fa", feedback_scale=True)


def test_a_registered_rule_trains_in_process_and_is_recorded_by_its_name(tmp_path):
    from custom_rules import sparse_fa

    bpjax.register_rule(sparse_fa)
    config = bpjax.Config(hidden=(8,), feedback="sparse_fa", dtype="float64", epochs=1,
                          batch=16, workdir=str(tmp_path / "run"))  # fmt: skip
    result = bpjax.train(config, dataset=fixture_dataset(), log=None)
    [record] = result.history
    assert record["feedback"] == "sparse_fa" and len(record["weight_deg"]) == 1
    B = result.feedback[0]
    assert 0.2 < float(np.mean(B == 0)) < 0.8  # the rule's own state: about half zero


def test_kp_under_adam_warns_once_and_records_it(tmp_path):
    lines = []
    config = bpjax.Config(hidden=(8,), feedback="kp", optimizer="adam", lr=0.01, epochs=1,
                          batch=16, dtype="float64", workdir=str(tmp_path / "run"))  # fmt: skip
    bpjax.train(config, dataset=fixture_dataset(), log=lines.append)
    warnings = [line for line in lines if "holds for plain SGD only" in line]
    assert len(warnings) == 1 and "--optimizer=adam" in warnings[0]
    with open(tmp_path / "run" / "events.jsonl") as f:
        events = [json.loads(line) for line in f]
    assert [e["detail"] for e in events if e["event"] == "warning"] == warnings
    lines.clear()
    bpjax.train(config.replace(optimizer="sgd", lr=0.1, workdir=str(tmp_path / "sgd")),
                dataset=fixture_dataset(), log=lines.append)  # fmt: skip
    assert not [line for line in lines if "plain SGD" in line]  # control: SGD says nothing


def test_a_rule_that_ignores_the_key_compiles_a_step_that_draws_nothing():
    # The step's key reaches only a rule that draws (brsf): bp's program has no RNG.
    def step_hlo(feedback):
        config = bpjax.Config(feedback=feedback, hidden=(5,))
        net = config.net(4, 3)
        step = step_lib.make_grad(config, net=net)
        params = bpjax.init_params(jax.random.key(0), net)
        fb = bpjax.init_feedback(jax.random.key(0), net, config.rule)
        args = (params, jnp.ones((8, 4)), jnp.eye(3)[jnp.arange(8) % 3], jax.random.key(1), fb)
        return jax.jit(step).lower(*args).as_text()

    assert "threefry" not in step_hlo("bp") and "threefry" not in step_hlo("usf")
    assert "threefry" in step_hlo("brsf")  # control: the check sees a draw when there is one


def test_brsf_redraws_every_step_and_reruns_and_resumes_identically(tmp_path):
    # Two steps of the training step from one state: another step key, another R.
    config = bpjax.Config(hidden=(6,), feedback="brsf", dtype="float64", epochs=2, batch=16,
                          seed=5)  # fmt: skip
    data = fixture_dataset()
    run = lambda **kw: bpjax.train(config.replace(**kw), dataset=data, log=None)  # noqa: E731
    whole = run(workdir=str(tmp_path / "whole"))
    again = run(workdir=str(tmp_path / "again"))
    run(workdir=str(tmp_path / "resumed"), epochs=1)
    resumed = run(workdir=str(tmp_path / "resumed"), resume=True)
    for other in (again, resumed):
        for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(other.params), strict=True):
            np.testing.assert_array_equal(a, b)
    with jax.enable_x64(True):
        net = config.net(6, 3)
        step = step_lib.make_train_step(config, net=net, steps_per_epoch=6)
        params = bpjax.init_params(jax.random.key(0), net, jnp.float64)
        state = step_lib.TrainState(params, step_lib.initial_opt_state(config, params),
                                    jnp.zeros((), jnp.int32))  # fmt: skip
        x, y = jnp.asarray(data.x_train[:16], jnp.float64), jnp.eye(3)[data.y_train[:16]]
        new = lambda i: step(state, x, y, jax.random.fold_in(jax.random.key(9), i))[0]  # noqa: E731
        assert not np.allclose(new(0).params[0]["W"], new(1).params[0]["W"])
        np.testing.assert_array_equal(new(0).params[0]["W"], new(0).params[0]["W"])


# ----------------------------------------------------------------- a run before the redesign


def test_a_run_written_before_the_redesign_loads_and_resumes_bit_identically(tmp_path):
    old = str(tmp_path / "old")
    shutil.copytree(FIXTURE, old)
    run = bpjax.load_run(old)
    assert run.config.feedback == "fa" and run.sizes == (6, 8, 3)
    assert [m["epoch"] for m in run.metrics] == [1, 2] and run.epoch == 2
    assert run.params[0]["W"].dtype == np.float64
    config = run.config.replace(workdir=old, resume=True, epochs=3)
    resumed = bpjax.train(config, dataset=fixture_dataset(), log=None)
    fresh = bpjax.train(config.replace(workdir=str(tmp_path / "fresh"), resume=False),
                        dataset=fixture_dataset(), log=None)  # fmt: skip
    assert [m["epoch"] for m in resumed.history] == [1, 2, 3]
    pairs = zip(jax.tree.leaves((resumed.params, resumed.feedback)),
                jax.tree.leaves((fresh.params, fresh.feedback)), strict=True)  # fmt: skip
    for a, b in pairs:
        assert a.dtype == np.float64
        np.testing.assert_array_equal(a, b)
    # The old run's epochs 1-2 are the new code's too: the same trajectory, recomputed.
    assert resumed.history[:2] == run.metrics
    assert [m["test_loss"] for m in fresh.history[:2]] == [m["test_loss"] for m in run.metrics]


# ----------------------------------------------------------------- the command line


def launch(*args, pythonpath=TESTS, timeout=300):
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env)  # fmt: skip


CUSTOM = ["--feedback=custom_rules:sparse_fa", "--train_examples=256", "--hidden=16",
          "--batch=64", "--dtype=float64", "--seed=4"]  # fmt: skip


@pytest.fixture(scope="module")
def custom_runs(tmp_path_factory):
    """A 3-epoch run of the test-defined rule, and one of 2 epochs resumed to 3."""
    base = tmp_path_factory.mktemp("custom")
    whole, part = str(base / "whole"), str(base / "part")
    results = [launch(*CUSTOM, "--epochs=3", f"--workdir={whole}"),
               launch(*CUSTOM, "--epochs=2", f"--workdir={part}"),
               launch(f"--workdir={part}", "--resume", "--epochs=3")]  # fmt: skip
    for r in results:
        assert r.returncode == 0, r.stderr
    return base, whole, part


def test_a_rule_from_a_file_under_tests_trains_through_launch_and_is_recorded(custom_runs):
    _, whole, _ = custom_runs
    with open(os.path.join(whole, "config.json")) as f:
        record = json.load(f)
    assert record["feedback"] == "custom_rules:sparse_fa"
    rule = record["feedback_rule"]
    assert rule["name"] == "sparse_fa" and rule["path"] == "custom_rules:sparse_fa"
    assert rule["sha256"] == rules.source_sha256("custom_rules:sparse_fa")
    metrics = bpjax.read_metrics(whole)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert all(m["feedback"] == "sparse_fa" and len(m["weight_deg"]) == 1 for m in metrics)


def test_a_custom_rule_resumes_to_the_bit_identical_end(custom_runs):
    _, whole, part = custom_runs
    a, b = bpjax.load_run(whole), bpjax.load_run(part)
    assert a.epoch == b.epoch == 3
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        assert x.dtype == np.float64
        np.testing.assert_array_equal(x, y)


def test_plot_runs_labels_a_custom_rule_by_its_name(custom_runs):
    _, whole, _ = custom_runs
    config = bpjax.Config.from_json(whole)
    labels = bpjax.runs._labels([config, config.replace(feedback="fa")], [whole, whole])
    assert labels == ["feedback=custom_rules:sparse_fa", "feedback=fa"]


def test_a_missing_or_changed_rule_module_is_refused_in_one_line(custom_runs):
    base, _, part = custom_runs
    elsewhere = str(base / "elsewhere")
    os.makedirs(elsewhere, exist_ok=True)
    missing = launch(f"--workdir={part}", "--resume", "--epochs=4", pythonpath=elsewhere)
    changed_dir = str(base / "changed")
    os.makedirs(changed_dir, exist_ok=True)
    with open(os.path.join(TESTS, "custom_rules.py")) as f:
        source = f.read()
    with open(os.path.join(changed_dir, "custom_rules.py"), "w") as f:
        f.write(source + "\n# changed after the run started\n")
    changed = launch(f"--workdir={part}", "--resume", "--epochs=4", pythonpath=changed_dir)
    repeat = launch(f"--config={part}", f"--workdir={base / 'repeat'}", pythonpath=changed_dir)
    for result, message in ((missing, "cannot import custom_rules"),
                            (changed, "the source of custom_rules changed"),
                            (repeat, "the source of custom_rules changed")):  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.stderr
    assert "--accept_rule_change" in changed.stderr and not os.path.exists(base / "repeat")
    accepted = launch(f"--workdir={part}", "--resume", "--epochs=4", "--accept_rule_change",
                      pythonpath=changed_dir)  # fmt: skip
    assert accepted.returncode == 0, accepted.stderr
    with open(os.path.join(part, "events.jsonl")) as f:
        events = [json.loads(line) for line in f]
    [event] = [e for e in events if e["event"] == "feedback_rule_changed"]
    changed_sha = hashlib.sha256((source + "\n# changed after the run started\n").encode())
    assert event["sha256"] == changed_sha.hexdigest() != rules.source_sha256(
        "custom_rules:sparse_fa")  # the tests' own file is untouched
    assert [m["epoch"] for m in bpjax.read_metrics(part)] == [1, 2, 3, 4]
