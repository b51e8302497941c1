"""The training loop: method equivalence, recompilation, resume, NaN, checkpoints."""

import json
import os

import chex
import jax
import numpy as np
import pytest
from numpy_reference import numpy_metrics

from bpjax.checkpoint import checkpoint_manager, restore_latest
from bpjax.config import Config
from bpjax.data import Dataset
from bpjax.errors import ConfigError, RunError, TrainingError
from bpjax.methods import METHODS
from bpjax.rundir import read_metrics
from bpjax.training import train


def toy_dataset(n_train=96, n_test=32, d=12, k=3, seed=0) -> Dataset:
    """A linearly separable-ish 3-class problem: small, but training changes something."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)).astype(np.float32) * 2
    y = rng.integers(0, k, n_train + n_test).astype(np.int32)
    x = (centers[y] + rng.normal(size=(n_train + n_test, d))).astype(np.float32)
    return Dataset("toy", x[:n_train], y[:n_train], x[n_train:], y[n_train:], k)


TOY = toy_dataset()
SMALL = dict(hidden=(8,), batch=16, epochs=2, dataset="mnist")


def run(tmp_path, name="run", **overrides):
    config = Config(workdir=str(tmp_path / name), **{**SMALL, **overrides})
    return train(config, dataset=TOY, log=lambda line: None)


def test_all_methods_follow_the_same_trajectory_float64(tmp_path):
    # Same seed, same shuffles: every gradient method must end at the same params.
    results = {
        m: run(tmp_path, m, method=m, dtype="float64", optimizer="momentum") for m in METHODS
    }
    reference = results["autodiff"].params
    assert reference[0]["W"].dtype == np.float64
    for method, result in results.items():
        chex.assert_trees_all_close(result.params, reference, rtol=1e-10, atol=1e-12)
        assert result.history[-1]["step"] == 2 * (96 // 16), method
    # And training moved them: the comparison is not between two initial states.
    start = run(tmp_path, "zero", epochs=0, dtype="float64").params
    assert not np.allclose(start[0]["W"], reference[0]["W"])


def test_an_epoch_compiles_once(tmp_path):
    result = run(tmp_path, epochs=4)
    assert result.traces == 1
    assert [m["epoch"] for m in result.history] == [1, 2, 3, 4]


def test_metrics_and_config_files(tmp_path):
    result = run(tmp_path, epochs=3)
    workdir = tmp_path / "run"
    config = json.loads((workdir / "config.json").read_text())
    assert config["batch"] == 16 and config["sizes"] == [12, 8, 3]
    lines = read_metrics(str(workdir))
    assert lines == result.history
    keys = {"epoch", "step", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
            "samples_per_s", "epoch_s", "train_s", "elapsed_s"}
    for m in lines:
        assert set(m) == keys
        assert 0 <= m["test_accuracy"] <= 1 and np.isfinite(m["train_loss"])
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert not [f for f in os.listdir(workdir) if f.startswith(".tmp")]


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_training_reduces_the_loss(tmp_path, optimizer):
    lr = 0.01 if optimizer == "adam" else 0.1
    history = run(tmp_path, optimizer=optimizer, lr=lr, epochs=5).history
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    full = run(tmp_path, "full", epochs=3, optimizer="momentum")
    run(tmp_path, "split", epochs=1, optimizer="momentum")
    resumed = run(tmp_path, "split", epochs=3, optimizer="momentum", resume=True)
    chex.assert_trees_all_equal(resumed.params, full.params)
    assert [m["epoch"] for m in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["step"] == full.history[-1]["step"]


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    run(tmp_path, epochs=1)
    with pytest.raises(ConfigError, match="--resume"):
        run(tmp_path, epochs=1)


def test_a_resume_with_other_settings_is_refused(tmp_path):
    run(tmp_path, epochs=1, hidden=(8,), lr=0.3)
    with pytest.raises(ConfigError, match=r"--lr: recorded 0.3, given 0.1; --hidden: recorded "
                                          r"\(8,\), given \(9,\)\. Drop those flags"):
        run(tmp_path, epochs=2, hidden=(9,), lr=0.1, resume=True)
    # Without its config.json, the checkpoints are not enough to resume (issue 20, point 6).
    (tmp_path / "run" / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"holds checkpoints but no config.json"):
        run(tmp_path, epochs=2, hidden=(9,), lr=0.3, resume=True)


def test_a_nan_loss_stops_the_run_naming_epoch_and_step(tmp_path):
    with pytest.raises(TrainingError, match=r"the loss became nan at epoch 1, step \d+; .*last "
                                            r"good checkpoint is none"):
        run(tmp_path, epochs=3, lr=1e30)
    assert not os.listdir(tmp_path / "run" / "checkpoints")


def test_a_blow_up_in_the_last_update_of_an_epoch_is_never_saved(tmp_path):
    # One step per epoch: every step's loss is computed before its update, so all are
    # finite; the update makes the parameters inf. Nothing may be saved or called good.
    with pytest.raises(TrainingError, match=r"parameters stopped being finite by epoch 1, step 1"
                                            r" .*last good checkpoint is none"):
        run(tmp_path, epochs=3, batch=96, lr=1e38)
    assert not os.listdir(tmp_path / "run" / "checkpoints")
    assert read_metrics(str(tmp_path / "run")) == []


def test_divergence_stops_at_the_factor_and_keeps_the_last_good_checkpoint(tmp_path):
    run(tmp_path, epochs=1)
    # The factor is a resumable setting: a tiny one makes epoch 2 "diverge".
    with pytest.raises(TrainingError, match=r"loss grew to [\d.]+ at epoch 2, more than 0.01x the"
                                            r" loss at the start .*checkpoint is epoch 1 in .*"
                                            r"Lower --lr \(now 0.1\)"):
        run(tmp_path, epochs=3, resume=True, divergence_factor=0.01)
    manager = checkpoint_manager(str(tmp_path / "run"))
    assert manager.all_steps() == [1]
    manager.close()
    assert [m["epoch"] for m in read_metrics(str(tmp_path / "run"))] == [1]


def test_a_large_lr_that_never_reaches_inf_is_stopped_as_diverged(tmp_path):
    # lr 100 on this problem drives the loss to ~1e10 without inf or NaN: it used to exit 0.
    with pytest.raises(TrainingError, match=r"loss grew to .* more than 100x the loss at the "
                                            r"start"):
        run(tmp_path, epochs=3, lr=100.0)


def test_restore_latest_returns_none_without_checkpoints(tmp_path):
    manager = checkpoint_manager(str(tmp_path))
    assert restore_latest(manager, {"a": np.zeros(2)}, {}) is None
    manager.close()


def test_batch_larger_than_training_set_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="larger than the training set"):
        run(tmp_path, batch=128, train_examples=None, dataset="mnist", epochs=1)


def test_regression_trains_with_squared_error(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype(np.float32)
    w = rng.normal(size=(6, 2)).astype(np.float32)
    y = (x @ w).astype(np.float32)
    data = Dataset("reg", x[:96], y[:96], x[96:], y[96:], None)
    config = Config(workdir=str(tmp_path / "r"), hidden=(16,), batch=16, epochs=6,
                    loss="squared_error", activation="tanh", dataset="regression", lr=0.05)
    history = train(config, dataset=data, log=lambda line: None).history
    assert history[-1]["test_accuracy"] is None
    assert history[-1]["test_loss"] < 0.5 * history[0]["test_loss"]


def test_float64_run_does_not_leak_x64(tmp_path):
    run(tmp_path, dtype="float64", epochs=1)
    assert not jax.config.jax_enable_x64


# ----------------------------------------------- the loop against an independent reference
# Each test below catches a realistic bug that an earlier version of this suite let through
# (planted one at a time): a ceil(N/B) epoch, a loss divided by N, test metrics from the
# training set, a shuffle key that ignores the epoch, DP noise reused at every step.

TOY90 = toy_dataset(n_train=90)  # 90 = 5 x 16 + 10: ten samples sit out every epoch




def reference_run(data, *, epochs, batch, lr, seed=0, dp_clip=None, dp_noise=0.0, noise=None):
    """Plain SGD written out from the documented contract, in float64.

    Keys: ``init_key, data_key = split(key(seed))``; epoch e shuffles with the first half of
    ``split(fold_in(data_key, e))`` and step i draws its DP noise from ``fold_in(second
    half, i)`` (one ``split(., n_leaves + 1)`` key per leaf, as optax does). Gradients come
    from ``jax.grad`` of one sample's loss, clipped one by one: nothing of bpjax's backward
    pass, metrics or loop is used.
    """
    import jax.numpy as jnp

    from bpjax.network import Net, init_params, layer_sizes, predict

    def sample_loss(params, x, y):
        return -jnp.sum(y * jax.nn.log_softmax(predict(Net.mlp(layer_sizes(params)), params, x)))

    per_example = jax.jit(jax.vmap(jax.grad(sample_loss), in_axes=(None, 0, 0)))
    with jax.enable_x64(True):
        init_key, data_key = jax.random.split(jax.random.key(seed))
        sizes = (data.x_train.shape[1], 8, data.num_classes)
        params = jax.tree.map(np.asarray, init_params(init_key, sizes, jnp.float64))
        x = data.x_train.astype(np.float64)
        y = np.eye(data.num_classes)[data.y_train]
        n, steps = len(x), len(x) // batch
        history = []
        for epoch in range(1, epochs + 1):
            shuffle_key, noise_key = jax.random.split(jax.random.fold_in(data_key, epoch))
            order = np.asarray(jax.random.permutation(shuffle_key, n))[: steps * batch]
            assert len(set(order.tolist())) == steps * batch  # no sample twice in an epoch
            loss_sum, correct = 0.0, 0
            for i in range(steps):
                idx = order[i * batch : (i + 1) * batch]
                loss, acc = numpy_metrics(params, x[idx], data.y_train[idx])
                loss_sum, correct = loss_sum + loss * batch, correct + acc * batch
                g = jax.tree.map(np.asarray, per_example(params, x[idx], y[idx]))
                leaves, tree = jax.tree.flatten(g)
                norms = np.sqrt(sum(np.sum(v.reshape(batch, -1) ** 2, axis=1) for v in leaves))
                if noise is not None:  # S = mean |g_m|^2 and |G_M|^2, before the update
                    noise.setdefault(epoch, []).append((np.mean(norms**2), sum(
                        np.sum(np.mean(v, axis=0) ** 2) for v in leaves)))  # fmt: skip
                c = np.ones(batch) if dp_clip is None else np.minimum(1.0, dp_clip / norms)
                total = [np.tensordot(c, v, axes=1) for v in leaves]
                if dp_noise:
                    keys = jax.random.split(jax.random.fold_in(noise_key, i), len(leaves) + 1)
                    total = [t + dp_clip * dp_noise * np.asarray(
                        jax.random.normal(k, t.shape, jnp.float64)) for t, k in zip(
                        total, keys[1:], strict=True)]  # fmt: skip
                grads = jax.tree.unflatten(tree, [t / batch for t in total])
                params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
            test_loss, test_acc = numpy_metrics(params, data.x_test, data.y_test)
            history.append({"step": epoch * steps, "train_loss": loss_sum / (steps * batch),
                            "train_accuracy": correct / (steps * batch),
                            "test_loss": test_loss, "test_accuracy": test_acc})  # fmt: skip
    return params, history


@pytest.mark.parametrize("dp", [False, True], ids=["sgd", "dp_sgd"])
def test_training_follows_an_independent_reference_loop(tmp_path, dp):
    dp_args = dict(dp_clip=0.5, dp_noise=0.7) if dp else {}
    config = Config(workdir=str(tmp_path / "run"), hidden=(8,), batch=16, epochs=3, lr=0.3,
                    dtype="float64", **dp_args)  # fmt: skip
    result = train(config, dataset=TOY90, log=None)
    params, history = reference_run(TOY90, epochs=3, batch=16, lr=0.3, **dp_args)
    chex.assert_trees_all_close(result.params, params, rtol=1e-9, atol=1e-12)
    assert [m["step"] for m in result.history] == [5, 10, 15]  # 90 // 16 steps per epoch
    for got, want in zip(result.history, history, strict=True):
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-9, err_msg=key)
    # The runs went somewhere: the loss fell, and the comparison can fail (planted 1%).
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    planted = jax.tree.map(np.copy, params)
    planted[0]["b"][0] *= 1.01
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(result.params, planted, rtol=1e-9, atol=1e-12)


def test_the_logged_noise_scale_is_mccandlish_from_the_epochs_average_statistics(tmp_path):
    config = Config(workdir=str(tmp_path / "run"), hidden=(8,), batch=16, epochs=2, lr=0.3,
                    dtype="float64", noise_scale=True)  # fmt: skip
    result = train(config, dataset=TOY90, log=None)
    noise = {}
    params, _ = reference_run(TOY90, epochs=2, batch=16, lr=0.3, noise=noise)
    chex.assert_trees_all_close(result.params, params, rtol=1e-9, atol=1e-12)  # same trajectory
    m = 16
    for record, epoch in zip(result.history, (1, 2), strict=True):
        s_mean, g_mean = np.mean(noise[epoch], axis=0)  # averages of S and |G_M|^2 over steps
        grad_sq = (m * g_mean - s_mean) / (m - 1)
        trace = (s_mean - g_mean) * m / (m - 1)
        np.testing.assert_allclose(record["grad_sq_norm"], grad_sq, rtol=1e-9)
        np.testing.assert_allclose(record["trace_sigma"], trace, rtol=1e-9)
        np.testing.assert_allclose(record["b_simple"], trace / grad_sq, rtol=1e-9)


def test_test_metrics_come_from_the_returned_params_on_the_test_split(tmp_path):
    result = run(tmp_path, epochs=2)  # float32
    loss, accuracy = numpy_metrics(result.params, TOY.x_test, TOY.y_test)
    np.testing.assert_allclose(result.history[-1]["test_loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(result.history[-1]["test_accuracy"], accuracy, rtol=1e-6)
    train_loss, _ = numpy_metrics(result.params, TOY.x_train, TOY.y_train)
    assert abs(train_loss - loss) > 1e-3  # the two splits tell apart: the check can fail


def _visits(epoch_key, n=90, batch=16):
    """Which rows each step of ``run_epoch`` received, and each step's noise draw."""
    import jax.numpy as jnp

    from bpjax.training import run_epoch

    def step_fn(counts, x_b, y_b, key):
        del y_b
        return counts.at[x_b[:, 0].astype(jnp.int32)].add(1), (
            x_b[:, 0], jax.random.normal(key, ()))

    x = jnp.arange(n, dtype=jnp.float32)[:, None]
    counts, (rows, noise) = jax.jit(
        lambda k: run_epoch(jnp.zeros(n, jnp.int32), x, x, k, step_fn=step_fn, batch=batch)
    )(epoch_key)
    return np.asarray(counts), np.asarray(rows), np.asarray(noise)


def test_an_epoch_takes_full_batches_without_repeats_and_reshuffles():
    counts, rows, noise = _visits(jax.random.key(1))
    assert rows.shape == (5, 16)  # 90 // 16 steps, each a full batch
    assert counts.sum() == 80 and counts.max() == 1  # no sample twice; ten sit out
    assert len(set(noise.tolist())) == 5  # a fresh noise key at every step
    counts2, rows2, _ = _visits(jax.random.key(2))
    assert not np.array_equal(rows, rows2) and not np.array_equal(counts, counts2)


def test_read_metrics_refuses_a_missing_run(tmp_path):
    with pytest.raises(RunError, match="no run directory"):
        read_metrics(str(tmp_path / "nothing"))
    (tmp_path / "started").mkdir()
    assert read_metrics(str(tmp_path / "started")) == []  # no epoch finished yet


def test_read_metrics_skips_a_last_line_cut_short(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert read_metrics(str(tmp_path)) == [{"epoch": 1}, {"epoch": 2}]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(RunError, match="line 2 is not JSON"):
        read_metrics(str(tmp_path))


def test_metrics_are_appended_one_line_per_epoch(tmp_path):
    # A resume rewrites the file once (epochs the checkpoint covers); then it grows by lines.
    run(tmp_path, epochs=2)
    path = tmp_path / "run" / "metrics.jsonl"
    first = path.read_text()
    result = run(tmp_path, epochs=3, resume=True)
    assert path.read_text().startswith(first)
    assert len(path.read_text().splitlines()) == 3 == len(result.history)


def test_train_runs_silently_with_log_none(tmp_path, capsys):
    result = train(Config(workdir=str(tmp_path / "q"), **SMALL), dataset=TOY, log=None)
    assert len(result.history) == 2 and capsys.readouterr().out == ""


# ------------------------------------------- evaluation cadence, targets, learning rates


def test_evaluating_every_k_steps_keeps_the_trajectory(tmp_path):
    per_epoch = run(tmp_path, "epoch", epochs=3, dtype="float64", optimizer="momentum")
    chunked = run(tmp_path, "chunks", epochs=3, dtype="float64", optimizer="momentum",
                  eval_every_steps=2)  # 6 steps per epoch: 3 evaluations each
    chex.assert_trees_all_equal(chunked.params, per_epoch.params)
    assert chunked.traces == 1  # one program for every chunk
    assert [m["epoch"] for m in chunked.history] == pytest.approx(
        [1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2, 7 / 3, 8 / 3, 3], abs=1e-6)
    assert [m["step"] for m in chunked.history] == list(range(2, 19, 2))
    ends = [m for m in chunked.history if isinstance(m["epoch"], int)]
    for a, b in zip(ends, per_epoch.history, strict=True):
        assert a["test_loss"] == b["test_loss"] and a["step"] == b["step"]
    with pytest.raises(ConfigError, match=r"--eval_every_steps=4 does not divide the 6 steps of"
                                          r" an epoch into equal chunks: use one of 1, 2, 3, 6"):
        run(tmp_path, "bad", eval_every_steps=4)


def test_a_target_stops_the_run_and_records_where(tmp_path):
    result = run(tmp_path, epochs=30, eval_every_steps=3, target_accuracy=0.9)
    target, last = result.target, result.history[-1]
    assert target is not None and last["target_reached"] and last["test_accuracy"] >= 0.9
    assert not any(m["target_reached"] for m in result.history[:-1])
    assert (target["epoch"], target["step"]) == (last["epoch"], last["step"])
    assert target["step"] < 180  # before the 30 epochs of 6 steps
    assert 0 < target["train_s"] <= target["elapsed_s"]
    _, accuracy = numpy_metrics(result.params, TOY.x_test, TOY.y_test)  # the params at the target
    assert accuracy == pytest.approx(last["test_accuracy"])
    events = [json.loads(x) for x in open(tmp_path / "run" / "events.jsonl")]
    assert events[-1]["event"] == "target_reached" and events[-1]["step"] == target["step"]


def test_learning_rate_scaling_and_schedules():
    from bpjax.training import learning_rate

    assert Config(batch=512, lr=0.1, lr_scaling="linear").peak_lr == pytest.approx(0.4)
    assert Config(batch=512, lr=0.1, lr_scaling="sqrt").peak_lr == pytest.approx(0.2)
    assert Config(batch=512, lr=0.1).peak_lr == 0.1
    schedule = learning_rate(Config(lr=0.2, epochs=10, lr_schedule="warmup_cosine",
                                    warmup_epochs=2), steps_per_epoch=10)  # fmt: skip
    assert [float(schedule(s)) for s in (0, 10, 20, 100)] == pytest.approx([0, 0.1, 0.2, 0])
    cosine = learning_rate(Config(lr=0.2, epochs=10, lr_schedule="cosine"), steps_per_epoch=10)
    assert float(cosine(50)) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"--warmup_epochs=1\.0 needs a warm-up schedule"):
        Config(warmup_epochs=1.0)


def test_a_scheduled_run_trains_and_cannot_be_stretched_on_resume(tmp_path):
    run(tmp_path, epochs=2, lr_schedule="warmup_cosine", warmup_epochs=1.0, lr=0.3)
    with pytest.raises(ConfigError, match=r"--epochs: recorded 2, given 4"):
        run(tmp_path, epochs=4, lr_schedule="warmup_cosine", warmup_epochs=1.0, lr=0.3,
            resume=True)
    resumed = run(tmp_path, epochs=2, lr_schedule="warmup_cosine", warmup_epochs=1.0, lr=0.3,
                  resume=True)  # fmt: skip
    assert resumed.history[-1]["epoch"] == 2


def test_compiler_options_ask_only_what_this_xla_compiles():
    from bpjax.step import _cpu_accepts, compiler_options

    assert compiler_options("gpu", 8) is None and compiler_options("tpu", 8) is None
    assert compiler_options("cpu", 512) is None  # slower there: the default kernels
    small = compiler_options("cpu", 128)
    assert small is None or _cpu_accepts(tuple(small.items()))
    assert not _cpu_accepts((("xla_no_such_option", "1"),))  # an XLA without it: None
