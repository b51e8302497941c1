"""launch.py as a user runs it: in a subprocess, with real flags and real data."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from bpjax.checkpoint import checkpoint_manager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args, timeout=300):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--batch=0", "--batch must be a positive integer"),
        ("--batch=-5", "--batch must be a positive integer"),
        ("--method=magic", "flag --method=magic: value should be one of <manual|autodiff|"),
        ("--lr=nan", "--lr must be a finite number > 0"),
        ("--epochs=-1", "--epochs must be a non-negative integer"),
        ("--batch=70000", "larger than the training set"),
        ("--hidden=500,x", "--hidden must be a comma list"),
        ("--optimizer=lbfgs", "flag --optimizer=lbfgs: value should be one of <sgd|"),
        ("--dp_noise=1.0", "--dp_noise needs --dp_clip"),
        ("--resume", "--resume needs --workdir"),
        ("--platform=quantum", "flag --platform=quantum: value should be one of <cpu|gpu|tpu>"),
    ],
)
def test_bad_flags_give_one_line_error_before_any_work(flag, message):
    result = launch(flag, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert result.stdout == ""  # refused before loading data or compiling


def test_non_numeric_flag_is_one_line_error():
    result = launch("--batch=abc", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: flag --batch=abc: invalid literal for int() with base 10: 'abc' (see --help)"
    ]


@pytest.mark.slow
def test_end_to_end_on_a_slice_of_real_mnist(tmp_path):
    workdir = tmp_path / "run"
    result = launch(
        "--method=manual", "--batch=100", "--epochs=2", "--train_examples=3000",
        f"--workdir={workdir}",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("epoch ") for line in lines) == 2
    # Orbax logs ~40 absl INFO lines per checkpoint; launch.py keeps them out unless -v=0.
    assert "checkpoint_manager.py" not in result.stderr, result.stderr[:2000]
    assert lines[-1].startswith("done: 2 epochs, test accuracy")
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    # 3000 real MNIST digits, 2 epochs of SGD: far above chance (10%), well short of perfect.
    assert 0.7 < metrics[-1]["test_accuracy"] < 0.99
    config = json.loads((workdir / "config.json").read_text())
    assert config["sizes"] == [784, 500, 10] and config["method"] == "manual"


@pytest.mark.slow
def test_fashion_mnist_trains_with_the_same_command(tmp_path):
    result = launch(
        "--dataset=fashion_mnist", "--batch=100", "--epochs=1", "--train_examples=3000",
        f"--workdir={tmp_path / 'f'}",
    )
    assert result.returncode == 0, result.stderr
    assert "fashion_mnist: 3000 train / 10000 test" in result.stdout
    acc = json.loads((tmp_path / "f" / "metrics.jsonl").read_text())["test_accuracy"]
    assert 0.5 < acc < 0.95


def _final_params(workdir):
    manager = checkpoint_manager(str(workdir))
    step = manager.latest_step()
    restored = manager.restore(step)
    manager.close()
    return step, restored["state"]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["--dataset=regression", "--loss=squared_error", "--activation=tanh",
            "--hidden=64", "--batch=8", "--epochs=4", "--train_examples=4000", "--lr=0.01"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "launch.py"), *args, f"--workdir={killed}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        # The first committed checkpoint means epoch 2 is under way: kill it there.
        while not (killed / "checkpoints" / "1").is_dir():
            assert proc.poll() is None and time.time() < deadline, "run ended before epoch 1"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    step, _ = _final_params(killed)
    assert step is not None and step < 4
    resumed = launch(*args, f"--workdir={killed}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from the checkpoint of epoch {step}" in resumed.stdout
    full = launch(*args, f"--workdir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr
    (s1, p1), (s2, p2) = _final_params(killed), _final_params(tmp_path / "full")
    assert s1 == s2 == 4
    chex.assert_trees_all_equal(p1["params"], p2["params"])
    metrics = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert np.isfinite(metrics[-1]["test_loss"])
