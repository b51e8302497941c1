"""The values a run records and the state it leaves behind (issue 20, "the classes behind
the misses"): derived numbers in the records and log lines checked against their
definitions (throughput, cumulative training time across a resume, step numbers, the
closing line), test metrics against the checkpointed parameters, process-wide settings
after ``train`` returns on every path (finished, interrupted, failed), and the settings'
boundaries and resumable fields.

One resumed run (module fixture) serves most tests: 2 epochs evaluated every half epoch,
its last record's totals then edited to unmistakable values, and resumed to 3 epochs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import signal
import threading
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from numpy_reference import numpy_metrics, toy_dataset

import bpjax
from bpjax.config import Config
from bpjax.errors import ConfigError, TrainingError
from bpjax.evaluation import all_finite, check_health, interval_record, target_reached
from bpjax.interrupt import Stop, graceful_stop
from bpjax.rundir import read_metrics

N_TRAIN, BATCH, CHUNK = 100, 16, 3  # 6 steps per epoch, evaluated every 3
STEPS = N_TRAIN // BATCH
BASE = dict(dataset="mnist", hidden=(5,), batch=BATCH, dtype="float64", lr=0.3,
            eval_every_steps=CHUNK, keep_checkpoints=10, matmul_precision="highest")  # fmt: skip
EDIT_TRAIN_S, EDIT_ELAPSED_S = 500.0, 1000.0  # added to the last record before the resume


TOY = toy_dataset(N_TRAIN)




def _sentinel_int(signum, frame):  # handlers a caller had before train: must come back
    pass


def _sentinel_term(signum, frame):
    pass


def process_state() -> dict:
    return {"SIGINT": signal.getsignal(signal.SIGINT), "SIGTERM": signal.getsignal(signal.SIGTERM),
            "x64": jax.config.jax_enable_x64,
            "matmul_precision": jax.config.jax_default_matmul_precision}  # fmt: skip


@pytest.fixture
def caller_handlers():
    """SIGINT and SIGTERM handlers of the caller's own, restored after the test."""
    old = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, _sentinel_int),
                                               (signal.SIGTERM, _sentinel_term))}  # fmt: skip
    yield process_state()
    for s, h in old.items():
        signal.signal(s, h)


def edit_last_record(workdir: str, **added: float) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    records = read_metrics(workdir)
    for key, value in added.items():
        records[-1][key] += value
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    return records


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of 2 epochs, its totals edited, resumed to 3; both parts under graceful_stop."""
    workdir = str(tmp_path_factory.mktemp("values") / "run")
    old = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, _sentinel_int),
                                               (signal.SIGTERM, _sentinel_term))}  # fmt: skip
    try:
        before = process_state()
        lines1, lines2 = [], []
        with graceful_stop() as stop:
            first = bpjax.train(Config(workdir=workdir, epochs=2, **BASE), dataset=TOY,
                                log=lines1.append, stop=stop)  # fmt: skip
        after_first = process_state()
        edited = edit_last_record(workdir, train_s=EDIT_TRAIN_S, elapsed_s=EDIT_ELAPSED_S)
        with graceful_stop() as stop:
            second = bpjax.train(Config(workdir=workdir, epochs=3, resume=True, **BASE),
                                 dataset=TOY, log=lines2.append, stop=stop)  # fmt: skip
        after_second = process_state()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return SimpleNamespace(workdir=workdir, first=first, second=second, lines1=lines1,
                           lines2=lines2, edited=edited, before=before,
                           after=(after_first, after_second))  # fmt: skip


# ------------------------------------------------------------- derived numbers


def test_records_count_epochs_and_optimizer_steps(run):
    history = run.second.history
    assert [m["epoch"] for m in history] == [0.5, 1, 1.5, 2, 2.5, 3]
    assert [type(m["epoch"]) for m in history[1::2]] == [int, int, int]
    assert [m["step"] for m in history] == [CHUNK * (k + 1) for k in range(6)]
    assert history[:4] == run.edited  # the resume kept the records its checkpoint covers
    assert not any("target_reached" in m for m in history)  # no --target_*: no such key


def test_samples_per_s_is_the_intervals_samples_over_its_training_seconds(run):
    for m in run.first.history + run.second.history:
        assert m["samples_per_s"] == pytest.approx(CHUNK * BATCH / m["epoch_s"], rel=1e-12)


def test_train_s_sums_the_intervals_and_a_resume_continues_it(run):
    # Training seconds only: no compilation, no evaluation; across a resume it goes on
    # from the recorded total (edited here to +500 s), never from 0.
    first = run.first.history
    np.testing.assert_allclose([m["train_s"] for m in first],
                               np.cumsum([m["epoch_s"] for m in first]), rtol=1e-12)  # fmt: skip
    new = run.second.history[4:]
    expected = run.edited[-1]["train_s"] + np.cumsum([m["epoch_s"] for m in new])
    np.testing.assert_allclose([m["train_s"] for m in new], expected, rtol=1e-12)
    assert run.second.target is None and run.second.compile_s > 0


def test_elapsed_s_counts_from_the_runs_start_and_continues_across_a_resume(run):
    # Wall seconds since the run started, compilation included; a resume goes on from the
    # recorded value (edited here to +1000 s).
    parts = ((run.first.history, 0.0, run.first.compile_s),
             (run.second.history[4:], run.edited[-1]["elapsed_s"], run.second.compile_s))
    for part, start, compile_s in parts:
        assert part[0]["elapsed_s"] >= start + compile_s + part[0]["epoch_s"]
        for a, b in itertools.pairwise(part):
            assert b["elapsed_s"] >= a["elapsed_s"] + b["epoch_s"]
    assert all(m["elapsed_s"] >= m["train_s"] for m in run.first.history)
    assert run.second.history[4]["elapsed_s"] > EDIT_ELAPSED_S


LINE = re.compile(
    r"epoch +(?P<epoch>\S+)/(?P<epochs>\d+) +step (?P<step>\d+) +loss (?P<loss>\S+) +train_acc"
    r" (?P<train_acc>\S+)% +test_loss (?P<test_loss>\S+) +test_acc (?P<test_acc>\S+)% +"
    r"(?P<speed>\S+)k samples/s +epoch (?P<epoch_s>\S+)s +elapsed (?P<elapsed>\S+)s +"
    r"ETA (?P<eta>\S+)s$"
)


def test_each_log_line_says_its_records_numbers(run):
    (header,) = [line for line in run.lines1 if line.startswith("toy: ")]
    assert header.startswith(
        "toy: 100 train / 40 test examples, network 7-5-3 (relu, softmax_cross_entropy), method"
        " manual, sgd lr 0.3, batch 16 (6 steps/epoch, 4 left out per epoch), float64 on ")
    for lines, result in ((run.lines1, run.first), (run.lines2, run.second)):
        assert f"compiled the epoch in {result.compile_s:.2f}s" in lines
    for lines, part, epochs in ((run.lines1, run.first.history, 2),
                                (run.lines2, run.second.history[4:], 3)):  # fmt: skip
        parsed = [m.groupdict() for m in map(LINE.match, lines) if m]
        assert len(parsed) == len(part)
        for k, (got, m) in enumerate(zip(parsed, part, strict=True)):
            typical_epoch = float(np.median([r["epoch_s"] for r in part[: k + 1]])) * 2
            want = {"epoch": str(m["epoch"]), "epochs": str(epochs), "step": str(m["step"]),
                    "loss": f"{m['train_loss']:.4f}",
                    "train_acc": f"{100 * m['train_accuracy']:.2f}",
                    "test_loss": f"{m['test_loss']:.4f}",
                    "test_acc": f"{100 * m['test_accuracy']:.2f}",
                    "speed": f"{m['samples_per_s'] / 1e3:.1f}", "epoch_s": f"{m['epoch_s']:.2f}",
                    "elapsed": f"{m['elapsed_s']:.1f}",
                    "eta": f"{typical_epoch * (epochs - m['epoch']):.1f}"}  # fmt: skip
            assert got == want


SUMMARY = re.compile(
    r"done: (?P<epochs>\S+) epochs, test accuracy (?P<acc>\S+)%, median epoch (?P<median>\S+)s,"
    r" training loop (?P<loop>\S+)s, whole run (?P<whole>\S+)s; metrics in (?P<path>.+)$"
)


def test_the_closing_line_summarizes_the_records(run):
    for lines, part in ((run.lines1, run.first.history), (run.lines2, run.second.history[4:])):
        summary = SUMMARY.match(lines[-1])
        assert summary, lines[-1]
        last = part[-1]
        assert summary["epochs"] == str(last["epoch"])
        assert summary["acc"] == f"{100 * last['test_accuracy']:.2f}"
        # A typical epoch: the median interval of this run times the intervals per epoch.
        assert summary["median"] == f"{float(np.median([m['epoch_s'] for m in part])) * 2:.3f}"
        assert float(summary["loop"]) >= sum(m["epoch_s"] for m in part) - 0.05
        assert float(summary["whole"]) >= float(summary["loop"])
        assert summary["path"] == os.path.join(run.workdir, "metrics.jsonl")


def test_the_resume_is_recorded_with_what_changed(run):
    with open(os.path.join(run.workdir, "events.jsonl")) as f:
        events = [json.loads(line) for line in f]
    assert [e["event"] for e in events] == ["start", "finished", "resume", "finished"]
    assert events[1]["epoch"] == 2 and events[3]["epoch"] == 3
    assert events[2]["epoch"] == 2 and events[2]["changed"] == {"epochs": [2, 3]}


# ------------------------------------------------------------------ evaluation


def test_test_metrics_are_those_of_the_checkpointed_parameters(run):
    records = {m["epoch"]: m for m in run.second.history}
    seen = []
    for epoch in (1, 2, 3):
        params = bpjax.load_run(run.workdir, epoch=epoch).params
        loss, accuracy = numpy_metrics(params, TOY.x_test, TOY.y_test)
        np.testing.assert_allclose(records[epoch]["test_loss"], loss, rtol=1e-10)
        assert records[epoch]["test_accuracy"] == pytest.approx(accuracy, abs=1e-12)
        train_loss, _ = numpy_metrics(params, TOY.x_train, TOY.y_train)
        assert abs(train_loss - loss) > 1e-3  # the splits tell apart: the check can fail
        seen.append(loss)
    assert len(set(seen)) == 3  # three different parameter sets
    latest = bpjax.load_run(run.workdir)
    assert latest.epoch == 3
    assert numpy_metrics(latest.params, TOY.x_test, TOY.y_test)[0] == pytest.approx(seen[-1])


def test_a_target_stops_at_the_first_record_that_meets_it_and_says_where(run, tmp_path):
    # The target is exactly the best accuracy of the first run's records: met (>=) first at
    # that record. The target changes nothing before it: the same records up to there.
    history = run.first.history
    accuracies = [m["test_accuracy"] for m in history]
    j = int(np.argmax(accuracies))
    workdir = str(tmp_path / "target")
    lines = []
    result = bpjax.train(Config(workdir=workdir, epochs=2, target_accuracy=accuracies[j], **BASE),
                         dataset=TOY, log=lines.append)  # fmt: skip
    assert len(result.history) == j + 1
    for got, want in zip(result.history, history, strict=False):
        assert (got["step"], got["test_loss"]) == (want["step"], want["test_loss"])
    assert [m["target_reached"] for m in result.history] == [False] * j + [True]
    last = result.history[-1]
    assert result.target == {k: last[k] for k in ("epoch", "step", "train_s", "elapsed_s")}
    assert lines[-1].split("; target reached at ")[1].startswith(
        f"epoch {last['epoch']}, step {last['step']}, after {last['train_s']:.1f}s of training"
        f" ({last['elapsed_s']:.1f}s wall)")  # fmt: skip


def test_a_target_counts_as_reached_exactly_at_it():
    record = {"test_accuracy": 0.75, "test_loss": 0.5}

    def reached(accuracy=None, loss=None, record=record):
        return target_reached(Config(target_accuracy=accuracy, target_loss=loss), record)

    assert reached(accuracy=0.75) and reached(loss=0.5)
    assert not reached(accuracy=0.76) and not reached(loss=0.49)
    assert reached(0.9, 0.5) and reached(0.7, 0.1)  # either one
    assert not reached()
    assert not reached(accuracy=0.1, record={"test_accuracy": None, "test_loss": 1.0})


class FakeRun:
    """What ``check_health`` asks of a run directory: its newest checkpoint and an event log."""

    def __init__(self, last):
        self.last, self.events = last, []
        self.manager = SimpleNamespace(directory="/runs/a/checkpoints")

    def last_checkpoint(self):
        return self.last

    def event(self, kind, **fields):
        self.events.append((kind, fields))


def health(losses, test_loss=0.5, finite=True, last=2, start_loss=1.0, **settings):
    """The line ``check_health`` stops with (None: the interval is healthy), and its events."""
    config = Config(lr=0.4, batch=16, lr_reference_batch=64, lr_scaling="linear", **settings)
    run = FakeRun(last)
    state = SimpleNamespace(step=np.int32(30))  # 30 steps taken, this interval the last 3
    steps = {"loss_sum": 16 * np.asarray(losses, np.float64)}
    try:
        check_health(config, 2.5, state, steps, {"loss": test_loss, "finite": finite},
                     start_loss, run)  # fmt: skip
    except TrainingError as e:
        assert run.events == [("stopped", {"epoch": 2.5, "reason": str(e).split("; stopped.")[0]})]
        return str(e)
    assert run.events == []
    return None


def test_check_health_names_what_broke_and_the_optimizer_step():
    tail = ("; stopped. The last good checkpoint is epoch 2 in /runs/a/checkpoints. Lower --lr"
            " (now 0.1) or check the data")  # the scaled rate: 0.4 * 16 / 64
    assert health([0.5, 0.4, 0.3]) is None
    assert health([0.5, np.nan, np.nan]) == "the loss became nan at epoch 2.5, step 29" + tail
    assert health([np.inf, 1.0, 1.0]) == "the loss became inf at epoch 2.5, step 28" + tail
    assert health([0.5, 0.4, np.nan]).startswith("the loss became nan at epoch 2.5, step 30;")
    assert health([0.5] * 3, finite=False) == (
        "the parameters stopped being finite by epoch 2.5, step 30 (test loss 0.5)" + tail)
    assert health([0.5] * 3, test_loss=np.nan).startswith(
        "the parameters stopped being finite by epoch 2.5, step 30 (test loss nan);")
    assert health([np.nan] * 3, last=None).endswith(
        "The last good checkpoint is none (no epoch finished). Lower --lr (now 0.1) or check"
        " the data")


def test_check_health_stops_past_the_divergence_factor_naming_the_larger_loss():
    grew = "at epoch 2.5, more than 10x the loss at the start (1; --divergence_factor=10); stopped"
    assert health([11.0, 13.0, 12.0], test_loss=3.0, divergence_factor=10.0).startswith(
        f"the train loss grew to 12 {grew}")  # the interval's mean train loss
    assert health([1.0, 1.0, 1.0], test_loss=10.5, divergence_factor=10.0).startswith(
        f"the test loss grew to 10.5 {grew}")
    assert health([10.0] * 3, test_loss=10.0, divergence_factor=10.0) is None  # not more than
    assert health([1e6] * 3, test_loss=1e6, divergence_factor=0.0) is None  # 0: never


def test_an_interval_record_averages_over_the_samples_its_steps_saw():
    steps = {"loss_sum": np.array([8.0, 4.0, 4.0]), "correct": np.array([10, 12, 14])}
    seconds = {"epoch_s": 0.5, "train_s": 3.0, "elapsed_s": 9.0}
    test = {"loss": 0.25, "accuracy": 0.75, "finite": True}
    record = interval_record(2.5, SimpleNamespace(step=np.int32(30)), steps, 16, test, seconds)
    assert record == {"epoch": 2.5, "step": 30, "train_loss": 16 / 48, "train_accuracy": 36 / 48,
                      "test_loss": 0.25, "test_accuracy": 0.75, "samples_per_s": 48 / 0.5,
                      "epoch_s": 0.5, "train_s": 3.0, "elapsed_s": 9.0}  # fmt: skip
    whole = interval_record(3.0, SimpleNamespace(step=np.int32(36)), steps, 16, test, seconds)
    assert whole["epoch"] == 3 and type(whole["epoch"]) is int and type(whole["step"]) is int
    third = interval_record(1 / 3, SimpleNamespace(step=np.int32(2)), steps, 16, test, seconds)
    assert third["epoch"] == 0.333333
    regression = interval_record(1.0, SimpleNamespace(step=np.int32(3)),
                                 {"loss_sum": steps["loss_sum"]}, 16, {"loss": 0.25}, seconds)
    assert regression["train_accuracy"] is None and regression["test_accuracy"] is None


def test_all_finite_is_false_for_one_bad_entry_in_any_leaf():
    good = [{"W": np.ones((2, 3)), "b": np.zeros(2)}, {"W": np.ones((1, 2)), "b": np.zeros(1)}]
    assert bool(all_finite(good))
    for leaf, bad in (("W", np.inf), ("b", np.nan), ("W", -np.inf)):
        params = jax.tree.map(np.copy, good)
        params[1][leaf].flat[-1] = bad
        assert not bool(all_finite(params)), (leaf, bad)


# ----------------------------------------------------- what train() leaves behind


def test_a_finished_run_restores_signal_handlers_x64_and_matmul_precision(run):
    assert run.before["SIGINT"] is _sentinel_int and run.before["x64"] is False
    for after in run.after:
        assert after == run.before


def test_an_interrupted_run_checkpoints_its_last_epoch_and_restores_the_process(
    tmp_path, caller_handlers
):
    # A real SIGINT to this process after the first epoch, under graceful_stop: the run
    # ends after that epoch, checkpoints it (checkpoint_every=5 would not have) and returns.
    workdir = str(tmp_path / "run")
    polls = []

    with graceful_stop() as stop:
        def stop_after_one_epoch():
            polls.append(len(polls))
            if len(polls) == 2:
                os.kill(os.getpid(), signal.SIGINT)
                deadline = time.monotonic() + 10
                while not stop() and time.monotonic() < deadline:
                    time.sleep(0.001)
            return stop()

        result = bpjax.train(Config(workdir=workdir, epochs=3, checkpoint_every=5, **BASE),
                             dataset=TOY, log=None, stop=stop_after_one_epoch)  # fmt: skip
    assert process_state() == caller_handlers
    assert stop.signum == signal.SIGINT and stop.exit_status == 130
    assert result.interrupted and [m["epoch"] for m in result.history] == [0.5, 1]
    loaded = bpjax.load_run(workdir)
    assert loaded.epoch == 1 and loaded.checkpoints == (1,)
    assert numpy_metrics(loaded.params, TOY.x_test, TOY.y_test)[0] == pytest.approx(
        result.history[-1]["test_loss"], rel=1e-10)
    assert loaded.events[-1]["event"] == "interrupted" and loaded.events[-1]["epoch"] == 1


def _nan_sample(seed: int) -> tuple[int, int]:
    """A sample that sits out epoch 1 and its step in epoch 2 (0-based), under ``seed``."""
    data_key = jax.random.split(jax.random.key(seed))[1]
    orders = []
    for epoch in (1, 2):
        shuffle_key = jax.random.split(jax.random.fold_in(data_key, epoch))[0]
        orders.append(np.asarray(jax.random.permutation(shuffle_key, N_TRAIN))[: STEPS * BATCH])
    left_out = sorted(set(range(N_TRAIN)) - set(orders[0].tolist()))
    position = {int(k): i for i, k in enumerate(orders[1])}
    k = next(k for k in left_out if k in position)
    return k, position[k] // BATCH


def test_a_nan_loss_names_the_optimizer_step_it_happened_at(tmp_path, caller_handlers):
    # A NaN input that epoch 1 leaves out and epoch 2 draws at step i: the loss of global
    # step 6 + i + 1 is the first that is not finite. Then the process is as it was.
    k, i = _nan_sample(seed=0)
    x = TOY.x_train.copy()
    x[k] = np.nan
    data = dataclasses.replace(TOY, x_train=x)
    step, at = STEPS + i + 1, 1 + (i // CHUNK + 1) / 2  # the half epoch it falls in
    workdir = str(tmp_path / "run")
    with graceful_stop(), pytest.raises(TrainingError) as e:
        bpjax.train(Config(workdir=workdir, epochs=3, **BASE), dataset=data, log=None)
    assert f"the loss became nan at epoch {at:g}, step {step}; stopped" in str(e.value)
    assert "last good checkpoint is epoch 1 in" in str(e.value)
    assert "\n" not in str(e.value)
    assert process_state() == caller_handlers
    assert all(m["step"] < step for m in read_metrics(workdir))


def test_graceful_stop_turns_a_signal_into_a_request_and_restores_the_handlers(
    capfd, caller_handlers
):
    with graceful_stop() as stop:
        assert not stop() and stop.signum is None
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not stop() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
    assert stop.exit_status == 143
    assert "bpjax: SIGTERM received: stopping after the current epoch" in capfd.readouterr().err
    assert process_state() == caller_handlers
    with pytest.raises(RuntimeError), graceful_stop():
        raise RuntimeError("a failing block")
    assert process_state() == caller_handlers
    assert Stop().exit_status == 128 and Stop().name == ""


def test_graceful_stop_off_the_main_thread_installs_nothing(caller_handlers):
    seen = {}

    def worker():
        with graceful_stop() as stop:
            seen["inside"] = process_state()
            seen["stop"] = stop()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"inside": caller_handlers, "stop": False}


# --------------------------------------------------------------------- settings
# Which settings a resume may change: an independent list, field by field.
RESUMABLE = {"epochs", "data_dir", "workdir", "platform", "resume", "checkpoint_every",
             "keep_checkpoints", "eval_every_steps", "target_accuracy", "target_loss",
             "noise_scale", "divergence_factor", "num_devices", "parallel", "num_processes",
             "accept_rule_change", "accept_data_change", "target_split"}
# Another valid value of every field (with what it needs beside it).
OTHER = {"method": dict(method="autodiff"), "feedback": dict(feedback="fa"),
         "feedback_scale": dict(feedback_scale=True, feedback="usf"),
         "accept_rule_change": dict(accept_rule_change=True),
         "kp_decay": dict(kp_decay=0.5), "batch": dict(batch=64), "epochs": dict(epochs=7),
         "lr": dict(lr=0.2), "lr_scaling": dict(lr_scaling="sqrt"),
         "lr_reference_batch": dict(lr_reference_batch=256),
         "lr_schedule": dict(lr_schedule="cosine"),
         "warmup_epochs": dict(warmup_epochs=1.0, lr_schedule="warmup_constant"),
         "optimizer": dict(optimizer="adam"), "momentum": dict(momentum=0.5),
         "hidden": dict(hidden=(7, 3)), "activation": dict(activation="tanh"),
         "loss": dict(loss="squared_error"), "dataset": dict(dataset="fashion_mnist"),
         "label_column": dict(label_column="y", dataset="csv:a.csv,b.csv"),
         "standardize": dict(standardize=True), "validation_examples": dict(validation_examples=9),
         "target_split": dict(target_split="validation", validation_examples=9),
         "accept_data_change": dict(accept_data_change=True), "data_shape": dict(data_shape=(4, 2)),
         "data_dir": dict(data_dir="/somewhere"), "workdir": dict(workdir="/w"),
         "seed": dict(seed=3), "dtype": dict(dtype="float64"),
         "matmul_precision": dict(matmul_precision="highest"), "platform": dict(platform="cpu"),
         "resume": dict(resume=True, workdir="/w"), "train_examples": dict(train_examples=1000),
         "checkpoint_every": dict(checkpoint_every=3), "keep_checkpoints": dict(keep_checkpoints=5),
         "eval_every_steps": dict(eval_every_steps=2), "target_accuracy": dict(target_accuracy=0.9),
         "target_loss": dict(target_loss=0.1), "noise_scale": dict(noise_scale=True),
         "divergence_factor": dict(divergence_factor=5.0), "dp_clip": dict(dp_clip=1.0),
         "dp_noise": dict(dp_noise=1.0, dp_clip=1.0), "num_devices": dict(num_devices=2),
         "parallel": dict(parallel="shard_map"),
         "num_processes": dict(num_processes=2, num_devices=2, workdir="/w")}  # fmt: skip


def test_every_field_is_either_resumable_or_refused_on_resume():
    assert set(OTHER) == {f.name for f in dataclasses.fields(Config)}  # a new field: add it
    base = Config()
    for name, changes in OTHER.items():
        other = base.replace(**changes)
        fixed = base.differences(other)
        assert (name in fixed) == (name not in RESUMABLE), name
        assert base.differences(other, resumable=True)[name] == (
            getattr(base, name), getattr(other, name))


@pytest.mark.parametrize("schedule", ["cosine", "warmup_cosine", "warmup_constant", "constant"])
def test_epochs_are_fixed_on_resume_only_under_a_cosine(schedule):
    # A cosine decays over the run's epochs: more epochs change every step's rate.
    base = Config(lr_schedule=schedule)
    assert ("epochs" in base.differences(base.replace(epochs=80))) == ("cosine" in schedule)


VALID = [dict(momentum=0.0), dict(momentum=0.999), dict(target_accuracy=1.0), dict(seed=0),
         dict(seed=2**32 - 1), dict(epochs=0), dict(kp_decay=0.0), dict(dp_noise=0.0),
         dict(eval_every_steps=0), dict(divergence_factor=0.0), dict(batch=1),
         dict(train_examples=128, batch=128), dict(lr_schedule="warmup_constant",
         warmup_epochs=40.0), dict(num_devices=0), dict(dp_clip=1e-9)]  # fmt: skip
INVALID = [dict(momentum=1.0), dict(momentum=-0.1), dict(target_accuracy=0.0),
           dict(target_accuracy=1.01), dict(seed=2**32), dict(seed=-1), dict(epochs=-1),
           dict(kp_decay=-1e-3), dict(dp_noise=-1.0), dict(eval_every_steps=-1),
           dict(divergence_factor=-1.0), dict(batch=0), dict(train_examples=127),
           dict(warmup_epochs=40.5, lr_schedule="warmup_constant"), dict(lr=0.0),
           dict(target_loss=0.0), dict(lr_reference_batch=0), dict(num_devices=-1),
           dict(checkpoint_every=0), dict(keep_checkpoints=0), dict(dp_clip=0.0),
           dict(warmup_epochs=1.0), dict(dp_noise=1.0)]  # fmt: skip


@pytest.mark.parametrize("changes", VALID, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_the_edges_of_each_setting_are_accepted(changes):
    Config(**changes)


@pytest.mark.parametrize("changes", INVALID,
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))  # fmt: skip
def test_just_past_the_edges_each_setting_is_refused_in_one_line(changes):
    with pytest.raises(ConfigError) as e:
        Config(**changes)
    assert "\n" not in str(e.value) and f"--{next(iter(changes))}" in str(e.value)


def test_learning_rate_and_dtypes_derived_from_the_settings():
    assert Config(lr=0.3, batch=32, lr_reference_batch=128, lr_scaling="linear").peak_lr == (
        pytest.approx(0.075))
    assert Config(lr=0.3, batch=512, lr_reference_batch=128, lr_scaling="sqrt").peak_lr == (
        pytest.approx(0.6))
    assert Config(lr=0.3, batch=512, lr_reference_batch=128).peak_lr == 0.3
    assert Config(dtype="bfloat16").param_dtype == "float32"
    assert Config(dtype="float64").param_dtype == "float64"
    assert Config(hidden=(7, 3)).sizes == (784, 7, 3, 10)
    config = Config(**{k: v for c in (OTHER["dp_noise"], OTHER["optimizer"], OTHER["hidden"],
                                      OTHER["seed"]) for k, v in c.items()})  # fmt: skip
    assert Config.from_json(config.to_json()) == config
