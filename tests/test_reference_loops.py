"""``train()`` against reference loops written out here: every optimizer, learning-rate
scaling and schedule, and every feedback rule's wiring (issue 20, "the classes behind the
misses": optimizer settings used to be compared only with themselves).

Each case trains a tiny float64 problem through ``bpjax.train`` and compares the final
parameters and every metrics record with a loop that owns its formulas: SGD, heavy-ball
momentum as optax.sgd applies it (v <- mu v + g; p <- p - lr v), Adam with bias correction,
the four learning-rate schedules as formulas of the step, ``--lr_scaling`` from its
definition, and the keys as ``bpjax.train``'s docstring documents them:
``init_key, data_key = split(key(seed))``, epoch e shuffles with the first half of
``split(fold_in(data_key, e))`` and takes the first ``(N // B) * B`` rows. The records'
train metrics average the loss (and accuracy) each step saw before its update; the test
metrics are those of the parameters at the record's end.

Only two things come from bpjax: the initial parameters (``init_params``, tested in
test_formulas.py) and, in the rules section, a rule's gradient and feedback matrices
(``manual_grad``, ``init_feedback``: their formulas are tested in test_feedback.py; here
the loop's wiring is under test).
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import numpy_metrics, toy_dataset

import bpjax
from bpjax.config import Config
from bpjax.data import Dataset

N_TRAIN, BATCH = 100, 16  # 6 steps per epoch; 4 samples sit out every epoch
STEPS = N_TRAIN // BATCH
RTOL, ATOL = 1e-10, 1e-12


TOY = toy_dataset(N_TRAIN)


# ------------------------------------------------------------------- the reference




def _mean_loss(params, x, y):
    a = x
    for l, p in enumerate(params):
        a = a @ p["W"].T + p["b"][None, :]
        if l < len(params) - 1:
            a = jnp.maximum(a, 0)
    return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(a), axis=1))


true_grad = jax.jit(jax.grad(_mean_loss))


def rate(config: Config, t: int, steps_per_epoch: int) -> float:
    """The learning rate of update t (0-based), from the settings' definitions."""
    ratio = config.batch / config.lr_reference_batch
    peak = config.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[config.lr_scaling]
    total = config.epochs * steps_per_epoch  # cosine reaches 0 at the end of the last epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)  # linear from 0, in whole steps
    kind = config.lr_schedule
    if kind == "constant":
        return peak
    if kind.startswith("warmup") and t < warmup:
        return peak * t / warmup
    if kind == "warmup_constant":
        return peak
    start = warmup if kind == "warmup_cosine" else 0
    progress = min(t - start, total - start) / (total - start)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


class Optimizer:
    """SGD, momentum and Adam on a list of NumPy arrays, written out."""

    def __init__(self, config: Config, leaves: list[np.ndarray]):
        self.kind, self.mu, self.t = config.optimizer, config.momentum, 0
        self.m = [np.zeros_like(p) for p in leaves]
        self.v = [np.zeros_like(p) for p in leaves]

    def step(self, leaves, grads, lr):
        self.t += 1
        if self.kind == "sgd":
            return [p - lr * g for p, g in zip(leaves, grads, strict=True)]
        if self.kind == "momentum":
            self.m = [self.mu * m + g for m, g in zip(self.m, grads, strict=True)]
            return [p - lr * m for p, m in zip(leaves, self.m, strict=True)]
        b1, b2, eps = 0.9, 0.999, 1e-8  # Adam (Kingma & Ba), optax's defaults
        self.m = [b1 * m + (1 - b1) * g for m, g in zip(self.m, grads, strict=True)]
        self.v = [b2 * v + (1 - b2) * g * g for v, g in zip(self.v, grads, strict=True)]
        out = []
        for p, m, v in zip(leaves, self.m, self.v, strict=True):
            m_hat, v_hat = m / (1 - b1**self.t), v / (1 - b2**self.t)
            out.append(p - lr * m_hat / (np.sqrt(v_hat) + eps))
        return out


def to_numpy(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@functools.cache
def reference_run(config: Config, data: Dataset = TOY):
    """``(params, feedback, records, snapshots)`` of ``config`` trained by the loop here.

    ``records`` holds one dict per evaluation (every ``eval_every_steps`` steps, else
    every epoch); ``snapshots`` the (params, feedback) at each. Cached: read, never modify.
    """
    rule, batch = config.feedback, config.batch
    n = config.train_examples or len(data.x_train)  # the first n examples
    steps, chunk = n // batch, config.eval_every_steps or n // batch
    x, labels = np.asarray(data.x_train[:n], np.float64), data.y_train[:n]
    onehot = np.eye(data.num_classes)[labels]
    records, snapshots = [], []
    with jax.enable_x64(True):
        init_key, data_key = jax.random.split(jax.random.key(config.seed))
        sizes = (x.shape[1], *config.hidden, data.num_classes)
        params = to_numpy(bpjax.init_params(init_key, sizes, jnp.float64))
        feedback = to_numpy(initial_feedback(init_key, sizes, rule))
        kp = rule == "kp"
        leaves, tree = jax.tree.flatten((params, feedback) if kp else params)
        optimizer, t = Optimizer(config, leaves), 0
        for epoch in range(1, config.epochs + 1):
            shuffle_key, _ = jax.random.split(jax.random.fold_in(data_key, epoch))
            order = np.asarray(jax.random.permutation(shuffle_key, n))[: steps * batch]
            for first in range(0, steps, chunk):
                seen = []
                for i in range(first, first + chunk):
                    idx = order[i * batch : (i + 1) * batch]
                    seen.append(numpy_metrics(params, x[idx], labels[idx]))  # before the update
                    grads = batch_update(params, feedback, x[idx], onehot[idx], config)
                    leaves = optimizer.step(leaves, jax.tree.leaves(grads), rate(config, t, steps))
                    t += 1
                    if kp:
                        params, feedback = jax.tree.unflatten(tree, leaves)
                    else:
                        params = jax.tree.unflatten(tree, leaves)
                test_loss, test_acc = numpy_metrics(params, data.x_test, data.y_test)
                train_loss, train_acc = np.mean(seen, axis=0)
                records.append({"epoch": epoch - 1 + (first + chunk) / steps, "step": t,
                                "train_loss": train_loss, "train_accuracy": train_acc,
                                "test_loss": test_loss, "test_accuracy": test_acc})  # fmt: skip
                snapshots.append((params, feedback))
    return params, feedback, records, snapshots


def batch_update(params, feedback, x, y, config: Config):
    """What the optimizer receives for one batch: the gradient, or the rule's update.

    Under kp, the pair ``(param_grads, feedback_grads)``: dW^l + λ W^l for every W (biases
    as they are) and dW^l + λ B^l for B^l, l = 2..L (Akrout et al. 2019).
    """
    if config.feedback == "bp":
        return to_numpy(true_grad(params, x, y))
    grads = to_numpy(rule_grads(params, feedback, x, y, config.feedback))
    if config.feedback != "kp":
        return grads
    lam = config.kp_decay
    param_grads = [{"W": g["W"] + lam * p["W"], "b": g["b"]}
                   for g, p in zip(grads, params, strict=True)]  # fmt: skip
    feedback_grads = [g["W"] + lam * B for g, B in zip(grads[1:], feedback, strict=True)]
    return param_grads, feedback_grads


def assert_matches(result, config: Config, *, rtol=RTOL):
    """The run's final parameters and every record equal the reference loop's."""
    params, feedback, records, _ = reference_run(config)
    chex.assert_trees_all_close(result.params, params, rtol=rtol, atol=ATOL)
    assert len(result.history) == len(records)
    for got, want in zip(result.history, records, strict=True):
        assert got["epoch"] == pytest.approx(want["epoch"], abs=1e-6)
        assert got["step"] == want["step"]
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            np.testing.assert_allclose(got[key], want[key], rtol=rtol, err_msg=key)
    return params, feedback, records


def trained(tmp_path, **settings) -> tuple[Config, bpjax.TrainResult]:
    config = Config(workdir=str(tmp_path / "run"), dataset="mnist", batch=BATCH,
                    dtype="float64", **{"hidden": (5,), "epochs": 2, **settings})  # fmt: skip
    return config, bpjax.train(config, dataset=TOY, log=None)


# --------------------------------------------------- optimizers, scaling, schedules

OPTIMIZER_CASES = {
    # momentum 0.8 (not the default), lr 0.4 given at batch 64: linear scaling gives 0.1;
    # evaluated every 3 steps: the records of half epochs, each averaging its own steps.
    "momentum-linear": dict(optimizer="momentum", momentum=0.8, lr=0.4, lr_scaling="linear",
                            lr_reference_batch=64, eval_every_steps=3, seed=1),
    # Adam at lr 0.02 given at batch 64: sqrt scaling gives 0.01, decayed by a cosine; on
    # the first 80 examples only (5 steps per epoch, none left out).
    "adam-sqrt-cosine": dict(optimizer="adam", lr=0.02, lr_scaling="sqrt",
                             lr_reference_batch=64, lr_schedule="cosine", seed=2,
                             train_examples=80),
    # 0.6 epochs of 6 steps: a warm-up of round(3.6) = 4 steps (3 if truncated).
    "momentum-warmup_constant": dict(optimizer="momentum", lr=0.1,
                                     lr_schedule="warmup_constant", warmup_epochs=0.6),
    # 0.4 epochs: round(2.4) = 2 steps of warm-up (3 if rounded up), then a cosine to 0.
    "sgd-warmup_cosine": dict(optimizer="sgd", lr=0.5, lr_schedule="warmup_cosine",
                              warmup_epochs=0.4, epochs=3, seed=3),
}  # fmt: skip


@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_optimizers_and_schedules_follow_the_reference_loop(tmp_path, case):
    config, result = trained(tmp_path, **OPTIMIZER_CASES[case])
    # optax evaluates a schedule of its int32 step count in float32, so a float64 run's
    # scheduled rates carry float32 rounding (relative 1e-7): a planted schedule bug moves
    # them by percents. A constant rate is the float64 number itself.
    rtol = RTOL if config.lr_schedule == "constant" else 1e-6
    _, _, records = assert_matches(result, config, rtol=rtol)
    assert records[-1]["train_loss"] < 0.9 * records[0]["train_loss"]  # training went somewhere


def test_the_reference_comparison_can_fail():
    # Negative controls: a 1% change of any one setting the reference reads moves the
    # parameters beyond the tolerance, so the comparisons above can fail.
    base = Config(dataset="mnist", batch=BATCH, dtype="float64", hidden=(5,),
                  **OPTIMIZER_CASES["sgd-warmup_cosine"])  # fmt: skip
    want = reference_run(base)[0]
    for changed in (dict(lr=0.505), dict(warmup_epochs=0.5), dict(optimizer="momentum",
                                                                  momentum=0.01)):  # fmt: skip
        with pytest.raises(AssertionError):
            chex.assert_trees_all_close(reference_run(base.replace(**changed))[0], want,
                                        rtol=RTOL, atol=ATOL)  # fmt: skip


def test_the_schedules_written_here_are_the_documented_shapes():
    # The reference's own formulas, pinned by their defining values, so that a wrong
    # reference cannot agree with a wrong library by accident.
    c = Config(dataset="mnist", batch=BATCH, lr=0.2, epochs=10, lr_schedule="warmup_cosine",
               warmup_epochs=2)  # fmt: skip
    assert [rate(c, t, 10) for t in (0, 10, 20, 60, 100, 120)] == pytest.approx(
        [0, 0.1, 0.2, 0.1, 0, 0])
    c = c.replace(lr_schedule="warmup_constant")
    assert [rate(c, t, 10) for t in (0, 5, 20, 99)] == pytest.approx([0, 0.05, 0.2, 0.2])
    c = c.replace(lr_schedule="cosine", warmup_epochs=0.0)
    assert [rate(c, t, 10) for t in (0, 50, 100)] == pytest.approx([0.2, 0.1, 0])
    c = c.replace(lr_schedule="constant", lr_scaling="linear", lr_reference_batch=64)
    assert rate(c, 7, 10) == pytest.approx(0.05)
    assert rate(c.replace(lr_scaling="sqrt"), 7, 10) == pytest.approx(0.1)


# --------------------------------------------------------------- feedback rules
# The one place that calls the rule API (rules are values, ``bpjax.rules``; the gradient
# and the alignment take the ``Net``): were it to change again, adapt these functions,
# and the rest of the section stays as it is.


def initial_feedback(init_key, sizes, rule):
    """The rule's B matrices as a run draws them: from the run's init key."""
    return bpjax.init_feedback(init_key, sizes, rule, jnp.float64)


def _sizes(params) -> tuple[int, ...]:
    return (params[0]["W"].shape[1], *(p["W"].shape[0] for p in params))


@functools.cache
def _rule_grad(rule, sizes):
    return jax.jit(functools.partial(bpjax.manual_grad, bpjax.Net.mlp(sizes), rule=rule))


def rule_grads(params, feedback, x, y, rule):
    """The rule's update of one batch (the gradient under bp), from bpjax's formulas."""
    return _rule_grad(rule, _sizes(params))(params, x, y, feedback=feedback)


@functools.cache
def _rule_alignment(rule, sizes):
    return jax.jit(functools.partial(bpjax.alignment, bpjax.Net.mlp(sizes), rule=rule))


def rule_alignment(params, feedback, x, y, rule):
    """The rule's angles against the true gradient on the batch ``x``."""
    return jax.device_get(_rule_alignment(rule, _sizes(params))(params, feedback, x, y))


RULE_CASES = {
    "fa": dict(feedback="fa"),
    "dfa": dict(feedback="dfa"),
    "sign": dict(feedback="sign", lr=0.05),
    # kp: one optimizer over (params, feedback): momentum's state covers B too.
    "kp-momentum": dict(feedback="kp", optimizer="momentum", lr=0.1, kp_decay=0.05),
}


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_every_rule_trains_end_to_end_like_the_reference_loop(tmp_path, case):
    # Two hidden layers: dfa differs from fa, and every rule has two hidden layers to feed.
    # Evaluated every 3 steps, so the angles of half epochs are recorded too.
    settings = {"hidden": (6, 5), "lr": 0.3, "seed": 4, "eval_every_steps": 3,
                **RULE_CASES[case]}  # fmt: skip
    config, result = trained(tmp_path, **settings)
    _, feedback, _ = assert_matches(result, config, rtol=1e-9)
    chex.assert_trees_all_close(list(result.feedback), list(feedback), rtol=1e-9, atol=ATOL)
    with jax.enable_x64(True):
        init_key = jax.random.split(jax.random.key(config.seed))[0]
        start = to_numpy(initial_feedback(init_key, (7, 6, 5, 3), config.feedback))
    if config.feedback in ("fa", "kp"):
        assert "weight_deg" in result.history[-1]  # W^{l+1} against its B^{l+1}
    if config.feedback in ("fa", "dfa"):  # fixed: the B the run started from, unchanged
        chex.assert_trees_all_equal(list(result.feedback), start)
        assert len(start) == 2
    if config.feedback == "kp":  # learned: B moved
        assert not np.allclose(result.feedback[0], start[0])

    # Each record's angles are those of that record's params and B, on the first (up to
    # 512) training examples: the fixed alignment batch. The per-example angles (delta_deg)
    # jump where a ReLU's input is 0 to rounding, so they are compared where the params are
    # the run's own, bit for bit: at the end.
    snapshots = reference_run(config)[3]
    x, y = TOY.x_train[:512], np.eye(3)[TOY.y_train[:512]]
    assert len(snapshots) == len(result.history) == 4
    names = {"alignment_deg": "alignment_deg", "weight_deg": "weight_deg"}
    with jax.enable_x64(True):
        for record, (params, feedback) in zip(result.history, snapshots, strict=True):
            angles = rule_alignment(params, feedback, x, y, config.feedback)
            assert ("weight_deg" in record) == ("weight_deg" in angles)  # W against B
            if "weight_deg" not in angles:
                names.pop("weight_deg", None)
            for key, name in names.items():
                np.testing.assert_allclose(record[key], angles[name], rtol=1e-7, atol=1e-7,
                                           err_msg=key)  # fmt: skip
        last = rule_alignment(result.params, result.feedback, x, y, config.feedback)
    names["delta_deg"] = "delta_deg_mean"
    for key, name in names.items():
        np.testing.assert_allclose(result.history[-1][key], last[name], rtol=1e-12, err_msg=key)
    assert result.history[-1]["alignment_deg"] != result.history[0]["alignment_deg"]


def test_kolen_pollack_under_sgd_closes_w_minus_b_by_the_decay_law(tmp_path):
    # Akrout et al.: B^l receives W^l's update and both decay by λ, so under SGD
    # W^l_t - B^l_t = (1 - ηλ)^t (W^l_0 - B^l_0) for l = 2..L, whatever the data.
    lr, lam = 0.3, 0.1
    config, result = trained(tmp_path, hidden=(6, 5), feedback="kp", lr=lr, kp_decay=lam,
                             seed=5)  # fmt: skip
    assert_matches(result, config, rtol=1e-9)
    t = result.history[-1]["step"]
    assert t == 2 * STEPS
    with jax.enable_x64(True):
        init_key = jax.random.split(jax.random.key(config.seed))[0]
        w0 = bpjax.init_params(init_key, (7, 6, 5, 3), jnp.float64)
        b0 = to_numpy(initial_feedback(init_key, (7, 6, 5, 3), "kp"))
    for l in (1, 2):  # W^2 and W^3, paired with B^2 and B^3
        gap = np.asarray(result.params[l]["W"]) - np.asarray(result.feedback[l - 1])
        np.testing.assert_allclose(gap, (1 - lr * lam) ** t * (np.asarray(w0[l]["W"]) - b0[l - 1]),
                                   rtol=1e-9, atol=1e-12)  # fmt: skip
