"""A run directory is a faithful record: resume keeps its settings, --config repeats it,
load_run reads it back, settings that cannot work together are refused up front.

Command-line behaviour is tested through real ``launch.py`` subprocesses; the float64
regression task keeps each run to about a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import TOY, run

import bpjax
from bpjax.config import Config
from bpjax.errors import CheckpointError, ConfigError, RunError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A float64 regression run: bit-for-bit reproducible, about a second per launch.
FLAGS = ["--dataset=regression", "--loss=squared_error", "--activation=tanh", "--hidden=16",
         "--batch=32", "--train_examples=512", "--dtype=float64"]  # fmt: skip
TIMING = {"samples_per_s", "epoch_s", "train_s", "elapsed_s"}  # what measures, not computes


def launch(*args, timeout=240):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)  # fmt: skip


def one_error_line(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def computed(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


# ------------------------------------------------------------------ resume = the same run


@pytest.mark.slow
def test_resume_takes_the_recorded_settings_and_records_what_changed(tmp_path):
    a = tmp_path / "a"
    started = launch(*FLAGS, "--lr=0.03", "--seed=7", "--epochs=2", f"--workdir={a}")
    assert started.returncode == 0, started.stderr
    record = (a / "config.json").read_text()
    # Only --resume: every setting from config.json (not lr 0.1, seed 0, 40 epochs).
    again = launch(f"--workdir={a}", "--resume")
    assert again.returncode == 0, again.stderr
    assert "the run already finished its 2 epochs: pass --epochs=N to extend it" in again.stdout
    extended = launch(f"--workdir={a}", "--resume", "--epochs=4")
    assert extended.returncode == 0, extended.stderr
    assert "resumed" in extended.stdout and "from the checkpoint of epoch 2" in extended.stdout
    assert (a / "config.json").read_text() == record  # never rewritten
    events = [json.loads(line) for line in (a / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "finished", "resume", "finished",
                                            "resume", "finished"]  # fmt: skip
    assert events[4]["changed"] == {"epochs": [2, 4]} and "provenance" in events[4]
    # The extended run is the run an uninterrupted 4-epoch command gives, bit for bit.
    whole = launch(*FLAGS, "--lr=0.03", "--seed=7", "--epochs=4", f"--workdir={tmp_path / 'w'}")
    assert whole.returncode == 0, whole.stderr
    chex.assert_trees_all_equal(bpjax.load_run(str(a)).params,
                                bpjax.load_run(str(tmp_path / "w")).params)  # fmt: skip
    assert bpjax.load_run(str(a)).config.epochs == 4  # the record plus its resumes


@pytest.mark.slow
def test_a_resume_that_contradicts_the_record_is_refused_naming_each_flag(tmp_path):
    a = tmp_path / "a"
    assert launch(*FLAGS, "--lr=0.03", "--epochs=1", f"--workdir={a}").returncode == 0
    result = launch(f"--workdir={a}", "--resume", "--lr=0.1", "--batch=64", "--epochs=3")
    line = one_error_line(result)
    assert ("--batch: recorded 32, given 64; --lr: recorded 0.03, given 0.1. Drop those flags"
            in line), line  # fmt: skip
    assert "epochs" not in line.split("differ:")[1]  # --epochs may change
    assert result.stdout == ""


@pytest.mark.slow
def test_resume_on_an_empty_workdir_starts_the_run_and_says_so(tmp_path):
    result = launch(*FLAGS, "--epochs=1", f"--workdir={tmp_path / 'new'}", "--resume")
    assert result.returncode == 0, result.stderr
    assert f"no checkpoint in {tmp_path / 'new'}: starting the run at epoch 1" in result.stdout
    assert json.loads((tmp_path / "new" / "config.json").read_text())["epochs"] == 1


@pytest.mark.slow
def test_config_flag_repeats_a_run_and_flags_override_it(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert launch(*FLAGS, "--lr=0.03", "--seed=3", "--epochs=2", f"--workdir={a}").returncode == 0
    assert launch(f"--config={a}", f"--workdir={b}").returncode == 0
    assert computed(bpjax.read_metrics(str(a))) == computed(bpjax.read_metrics(str(b)))
    assert launch(f"--config={a / 'config.json'}", "--lr=0.05", "--epochs=1",
                  f"--workdir={c}").returncode == 0  # fmt: skip
    recorded = Config.from_json(str(c))
    assert recorded == Config.from_json(str(a)).replace(lr=0.05, epochs=1, workdir=str(c))
    assert one_error_line(launch(f"--config={a}", f"--workdir={a}", "--resume")).endswith(
        "--config starts a new run and --resume continues one: use one")


@pytest.mark.slow
def test_config_flag_repeats_a_run_that_was_started_with_resume(tmp_path):
    # A scheduled job's "--resume on an empty workdir" records resume=true: repeating it
    # with --config is still a new run (not "--resume needs --workdir").
    a, b = tmp_path / "a", tmp_path / "b"
    assert launch(*FLAGS, "--epochs=1", f"--workdir={a}", "--resume").returncode == 0
    repeat = launch(f"--config={a}", f"--workdir={b}")
    assert repeat.returncode == 0, repeat.stderr[-2000:]
    assert computed(bpjax.read_metrics(str(a))) == computed(bpjax.read_metrics(str(b)))
    assert Config.from_json(str(b)).resume is False


def test_config_json_round_trip_and_unknown_keys():
    config = Config(lr=0.3, hidden=(256, 128), seed=7, dp_clip=1.0, dp_noise=0.5)
    assert Config.from_json(config.to_json()) == config
    record = {**json.loads(config.to_json()), "sizes": [784, 256, 128, 10], "provenance": {}}
    assert Config.from_json(record) == config  # derived keys ignored
    with pytest.raises(ConfigError, match=r"unknown settings lrr in JSON"):
        Config.from_json({**record, "lrr": 0.1})
    with pytest.raises(ConfigError, match="cannot read the config"):
        Config.from_json("/nonexistent/config.json")


def test_config_json_records_provenance_and_no_host_specific_arguments(tmp_path):
    run(tmp_path, epochs=1)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    prov = record["provenance"]
    for key in ("versions", "git", "platform", "device_kind", "device_count", "process_count",
                "host", "started", "command"):  # fmt: skip
        assert key in prov, key
    assert prov["versions"]["jax"] == jax.__version__ and prov["versions"]["bpjax"]
    assert prov["git"] is None or len(prov["git"]["commit"]) == 40
    assert not {"coordinator_address", "process_id"} & set(record)


# ------------------------------------------------------------------------- load_run


def test_load_run_reads_params_of_any_kept_epoch_and_the_initial_ones(tmp_path):
    result = run(tmp_path, epochs=3, dtype="float64")
    loaded = bpjax.load_run(str(tmp_path / "run"))
    assert loaded.epoch == 3 and loaded.checkpoints == (2, 3)
    chex.assert_trees_all_equal(loaded.params, result.params)
    assert loaded.params[0]["W"].dtype == np.float64 and loaded.metrics == result.history
    assert bpjax.load_run(str(tmp_path / "run"), epoch=2).epoch == 2
    initial = bpjax.load_run(str(tmp_path / "run"), epoch=0).params
    with jax.enable_x64(True):
        drawn = bpjax.init_params(jax.random.split(jax.random.key(0))[0], (12, 8, 3),
                                  jnp.float64)  # fmt: skip
    chex.assert_trees_all_equal(initial, jax.device_get(drawn))
    with pytest.raises(CheckpointError, match=r"no checkpoint of epoch 1 \(it has: 2, 3; epoch 0"):
        bpjax.load_run(str(tmp_path / "run"), epoch=1)
    with pytest.raises(RunError, match="no run at"):
        bpjax.load_run(str(tmp_path))


@pytest.mark.slow
def test_plot_runs_draws_the_curves_of_several_runs_labelled_by_their_differences(tmp_path):
    for lr in (0.05, 0.2):
        run(tmp_path, f"lr{lr}", epochs=2, lr=lr)
    workdirs = [str(tmp_path / "lr0.05"), str(tmp_path / "lr0.2")]
    labels = [t.get_text() for t in bpjax.runs_figure(workdirs).axes[0].get_legend().get_texts()]
    assert labels == ["lr=0.05", "lr=0.2"]
    out = tmp_path / "curves.png"
    script = os.path.join(ROOT, "experiments", "plot_runs.py")
    done = subprocess.run([sys.executable, script, *workdirs, f"--out={out}"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------- settings that cannot work together


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--dataset=regression", "--dataset=regression has real-valued targets, which softmax"
                                 " cross-entropy cannot fit: use --loss=squared_error"),
        ("--seed=-1", "--seed must be an integer in [0, 2**32), got -1"),
        ("--seed=4294967296", "--seed must be an integer in [0, 2**32), got 4294967296"),
        ("--divergence_factor=-1", "--divergence_factor must be a finite number >= 0"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_any_work(flag, message):
    result = launch(flag, timeout=120)
    assert message in one_error_line(result) and result.stdout == ""


def test_accuracy_follows_the_classes_not_the_loss(tmp_path):
    history = run(tmp_path, loss="squared_error", lr=0.05).history
    assert all(0 <= m["test_accuracy"] <= 1 and 0 <= m["train_accuracy"] <= 1 for m in history)


def test_a_custom_regression_dataset_refuses_cross_entropy(tmp_path):
    data = bpjax.Dataset("reg", TOY.x_train, np.zeros((96, 3), np.float32), TOY.x_test,
                         np.zeros((32, 3), np.float32), None)  # fmt: skip
    with pytest.raises(ConfigError, match="reg has real-valued targets"):
        bpjax.train(Config(workdir=str(tmp_path / "r"), hidden=(8,), batch=16, epochs=1),
                    dataset=data, log=None)  # fmt: skip


# ----------------------------------------------------------- one-line errors, no tracebacks


def test_a_workdir_that_is_a_file_or_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    assert one_error_line(launch(f"--workdir={tmp_path / 'f'}", timeout=120)).endswith(
        "is a file, not a directory: choose a directory")
    line = one_error_line(launch(f"--workdir={tmp_path / 'f' / 'run'}", timeout=120))
    assert line.startswith(f"error: cannot write to --workdir={tmp_path / 'f' / 'run'}"), line


@pytest.mark.slow
def test_out_of_memory_is_one_line_saying_what_to_lower(tmp_path):
    line = one_error_line(launch("--hidden=40000000", "--dataset=regression",
                                 "--loss=squared_error", f"--workdir={tmp_path / 'm'}"))
    assert "out of memory: an allocation of 125 GB did not fit (network 784-40000000-10:" in line
    assert line.endswith("lower --hidden or --batch"), line


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--jax_platforms=cuda", "--jax_platforms=cuda: JAX cannot start that backend"),
        ("--platform=tpu", "--platform=tpu: JAX finds no tpu device (it has: cpu); on a TPU VM"
                           " pip install 'jax[tpu]'"),
        ("--platform=gpu", "pip install 'jax[cuda13]'"),
    ],
)
def test_a_backend_jax_cannot_start_is_one_line(flag, message):
    assert message in one_error_line(launch(flag, "--epochs=1", timeout=120))


def test_a_run_read_back_gives_the_network_its_params_belong_to():
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "run_before_open_backward")
    run = bpjax.load_run(fixture)
    assert bpjax.layer_sizes(run.params) == run.sizes == (6, 8, 3)
    assert run.net == bpjax.Net.mlp(run.sizes, run.config.activation, run.config.loss)
    logits = bpjax.predict(run.net, run.params, np.zeros((5, 6), run.params[0]["W"].dtype))
    assert logits.shape == (5, 3)
