"""The training loop: method equivalence, recompilation, resume, NaN, checkpoints."""

import json
import os

import chex
import jax
import numpy as np
import pytest

from bpjax.checkpoint import CheckpointError, checkpoint_manager, restore_latest
from bpjax.config import Config, ConfigError
from bpjax.data import Dataset
from bpjax.methods import METHODS
from bpjax.train import TrainingError, read_metrics, train


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
    assert result.compiles == 1
    assert [m["epoch"] for m in result.history] == [1, 2, 3, 4]


def test_metrics_and_config_files(tmp_path):
    result = run(tmp_path, epochs=3)
    workdir = tmp_path / "run"
    config = json.loads((workdir / "config.json").read_text())
    assert config["batch"] == 16 and config["sizes"] == [12, 8, 3]
    lines = read_metrics(str(workdir))
    assert lines == result.history
    required = {"epoch", "step", "train_loss", "test_loss", "test_accuracy", "samples_per_sec",
                "wall_time", "train_accuracy"}
    for m in lines:
        assert required <= set(m)
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


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    run(tmp_path, epochs=1, hidden=(8,))
    with pytest.raises(CheckpointError, match=r"sizes=\[12, 8, 3\].*\[12, 9, 3\]"):
        run(tmp_path, epochs=2, hidden=(9,), resume=True)


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(tmp_path):
    run(tmp_path, epochs=1)
    with pytest.raises(TrainingError, match=r"epoch 2, step \d+.*checkpoint is epoch 1"):
        run(tmp_path, epochs=3, lr=1e30, resume=True)
    manager = checkpoint_manager(str(tmp_path / "run"))
    assert manager.latest_step() == 1
    like = run(tmp_path, "fresh", epochs=0)
    del like
    manager.close()
    assert [m["epoch"] for m in read_metrics(str(tmp_path / "run"))] == [1]


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
