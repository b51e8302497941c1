"""Checkpoints and the end of a run: however a run ends, the newest checkpoint holds the
state of its last metrics record; checkpoints record the settings and a checksum of every
array, and a reader writes nothing.

In-process ``train`` on a tiny float64 problem (96 examples, 12-64-3, 6 steps per epoch, evaluated
every 3 steps: epochs 0.5, 1, 1.5, ...), so every comparison is bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import chex
import numpy as np
import pytest
from test_train import TOY, numpy_metrics

import bpjax
from bpjax.config import Config
from bpjax.errors import CheckpointError, ConfigError, TrainingError
from bpjax.interrupt import graceful_stop

SETTINGS = dict(hidden=(64,), batch=16, dataset="mnist", dtype="float64", eval_every_steps=3)
EPOCHS = 4
# What measures rather than computes, and what only a run with a target records.
UNCOMPARED = {"samples_per_s", "epoch_s", "train_s", "elapsed_s", "target_reached"}


def config(workdir, **overrides) -> Config:
    return Config(workdir=str(workdir), **{**SETTINGS, "epochs": EPOCHS, **overrides})


def train(workdir, lines=None, **overrides) -> bpjax.TrainResult:
    log = (lambda line: None) if lines is None else lines.append
    return bpjax.train(config(workdir, **overrides), dataset=TOY, log=log)


def computed(metrics):
    return [{k: v for k, v in m.items() if k not in UNCOMPARED} for m in metrics]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An undisturbed run of ``EPOCHS`` epochs: its records and the params of every epoch."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    result = train(workdir, keep_checkpoints=EPOCHS)
    params = {e: bpjax.load_run(str(workdir), epoch=e).params for e in range(1, EPOCHS + 1)}
    return result.history, params


def loss_at(history, epoch):
    return next(m["test_loss"] for m in history if m["epoch"] == epoch)


def target_at(history, epoch):
    """A --target_loss first met at ``epoch`` (the loss there, above it at every record before)."""
    loss = loss_at(history, epoch)
    assert all(m["test_loss"] > loss for m in history if m["epoch"] < epoch), history
    return loss


def recomputed_loss(params):
    """The test loss of ``params``, recomputed in NumPy: no bpjax code involved."""
    return float(numpy_metrics(params, TOY.x_test, TOY.y_test)[0])


def assert_agree(workdir):
    """The newest checkpoint holds the state of the last metrics record."""
    loaded = bpjax.load_run(str(workdir))
    last = loaded.metrics[-1]
    assert loaded.epoch == last["epoch"], (loaded.epoch, last["epoch"])
    np.testing.assert_allclose(recomputed_loss(loaded.params), last["test_loss"], rtol=1e-12)
    return loaded


# --------------------------------------------------------------- the end of a run (point 2)


def test_a_target_at_an_epoch_end_is_checkpointed_whatever_the_cadence(tmp_path, reference):
    history, params = reference
    workdir = tmp_path / "run"
    target = target_at(history, 2)
    result = train(workdir, checkpoint_every=3, target_loss=target)
    assert result.target["epoch"] == 2 and not result.interrupted
    loaded = bpjax.load_run(str(workdir))
    assert loaded.epoch == 2 and loaded.checkpoints == (2,)
    chex.assert_trees_all_equal(loaded.params, result.params, params[2])
    # A resume with the same target has nothing to train and says so.
    before = (workdir / "metrics.jsonl").read_text()
    lines = []
    again = train(workdir, lines, checkpoint_every=3, target_loss=target, resume=True)
    assert any("already reached its target at epoch 2, step 12: nothing to train" in x
               for x in lines), lines  # fmt: skip
    assert again.target["epoch"] == 2 and (workdir / "metrics.jsonl").read_text() == before
    chex.assert_trees_all_equal(again.params, params[2])
    # Without the target, it continues from that checkpoint to the undisturbed end.
    lines = []
    done = train(workdir, lines, checkpoint_every=3, resume=True)
    assert any("from the checkpoint of epoch 2" in x for x in lines), lines
    chex.assert_trees_all_equal(done.params, params[EPOCHS])
    assert computed(bpjax.read_metrics(str(workdir))) == computed(history)


def test_a_target_reached_mid_epoch_is_what_load_run_returns_and_resume_continues(
    tmp_path, reference
):
    history, params = reference
    workdir = tmp_path / "run"
    target = target_at(history, 1.5)
    result = train(workdir, target_loss=target)
    assert result.target["epoch"] == 1.5
    loaded = assert_agree(workdir)
    assert loaded.epoch == 1.5 and loaded.checkpoints == (1, 2)  # 1.5 is numbered 2
    chex.assert_trees_all_equal(loaded.params, result.params)
    assert loaded.metrics[-1]["epoch"] == 1.5 and loaded.metrics == result.history
    assert bpjax.load_run(str(workdir), epoch=2).epoch == 1.5
    lines = []
    train(workdir, lines, target_loss=target, resume=True)
    assert any("already reached its target at epoch 1.5" in x for x in lines), lines
    # Continued without the target: from step 9, the rest of epoch 2 and on, bit for bit.
    lines = []
    done = train(workdir, lines, resume=True)
    assert any("from the checkpoint of epoch 1.5" in x for x in lines), lines
    chex.assert_trees_all_equal(done.params, params[EPOCHS])
    assert computed(bpjax.read_metrics(str(workdir))) == computed(history)
    assert bpjax.load_run(str(workdir)).checkpoints == (3, 4)
    chex.assert_trees_all_equal(bpjax.load_run(str(workdir), epoch=3).params, params[3])


def _stop_with(error):
    """A ``stop`` that raises ``error`` when polled before epoch 4."""
    polls = []

    def stop():
        polls.append(None)
        if len(polls) == 4:
            raise error
        return False

    return stop


@pytest.mark.parametrize("ending", ["epochs", "target", "target_mid_epoch", "signal", "error",
                                    "divergence"])  # fmt: skip
def test_every_way_a_run_ends_leaves_the_checkpoint_and_the_records_agreeing(
    tmp_path, reference, ending
):
    history, params = reference
    workdir = tmp_path / "run"
    cadence = dict(checkpoint_every=2, epochs=5)
    if ending == "epochs":
        result = train(workdir, **{**cadence, "epochs": 3})
        assert_agree(workdir)
        chex.assert_trees_all_equal(bpjax.load_run(str(workdir)).params, result.params, params[3])
    elif ending in ("target", "target_mid_epoch"):
        at = 3 if ending == "target" else 2.5
        result = train(workdir, **cadence, target_loss=target_at(history, at))
        assert result.target["epoch"] == at
        assert assert_agree(workdir).epoch == at
        chex.assert_trees_all_equal(bpjax.load_run(str(workdir)).params, result.params)
    elif ending == "signal":  # a real SIGINT, sent while epoch 3 is being logged
        def log(line):
            if line.startswith("epoch   3/"):
                os.kill(os.getpid(), signal.SIGINT)

        with graceful_stop() as stop:
            result = bpjax.train(config(workdir, **cadence), dataset=TOY, log=log, stop=stop)
        assert result.interrupted and stop.signum == signal.SIGINT
        assert assert_agree(workdir).epoch == 3
        chex.assert_trees_all_equal(bpjax.load_run(str(workdir)).params, params[3])
    elif ending == "error":  # raised between epochs 3 and 4: not a checkpoint epoch
        with pytest.raises(RuntimeError, match="boom"):
            bpjax.train(config(workdir, **cadence), dataset=TOY, log=None,
                        stop=_stop_with(RuntimeError("boom")))  # fmt: skip
        assert assert_agree(workdir).epoch == 3
        chex.assert_trees_all_equal(bpjax.load_run(str(workdir)).params, params[3])
    else:  # divergence: a resume whose --divergence_factor the next interval's loss exceeds
        train(workdir, **{**cadence, "epochs": 3})
        with pytest.raises(TrainingError) as stopped:
            train(workdir, **cadence, divergence_factor=1e-9, resume=True)
        message = str(stopped.value)
        named = re.search(r"The last good checkpoint is epoch (\S+) in", message)
        assert "at epoch 3.5" in message and named and named.group(1) == "3", message
        loaded = assert_agree(workdir)  # the records end where the last good checkpoint is
        assert loaded.epoch == 3 and loaded.checkpoints == (2, 3)
        chex.assert_trees_all_equal(loaded.params, params[3])
        assert loaded.events[-1]["event"] == "stopped" and loaded.events[-1]["epoch"] == 3.5


# ------------------------------------------------------------ settings recorded (point 6)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A run of 2 epochs, checkpoints of epochs 1 and 2 (copied by each test that changes it)."""
    workdir = tmp_path_factory.mktemp("two") / "run"
    train(workdir, epochs=2)
    return workdir


def copy_of(run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    return workdir


def test_resume_without_config_json_is_refused_while_checkpoints_exist(tmp_path, two_epochs):
    workdir = copy_of(two_epochs, tmp_path)
    (workdir / "config.json").unlink()
    before = sorted(os.listdir(workdir)), (workdir / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as refused:
        train(workdir, resume=True)
    line = str(refused.value)
    assert "\n" not in line and f"{workdir} holds checkpoints but no config.json" in line
    assert f"restore {workdir}/config.json" in line and "--config" in line
    assert (sorted(os.listdir(workdir)), (workdir / "metrics.jsonl").read_text()) == before


def test_a_hand_edited_config_json_is_refused_naming_the_fields(tmp_path, two_epochs):
    workdir = copy_of(two_epochs, tmp_path)
    path = workdir / "config.json"
    record = json.loads(path.read_text())
    record.update(lr=0.2, seed=5)
    path.write_text(json.dumps(record))
    before = (workdir / "metrics.jsonl").read_text()
    edited = Config.from_json(str(path)).replace(workdir=str(workdir), resume=True, epochs=3)
    with pytest.raises(CheckpointError) as refused:
        bpjax.train(edited, dataset=TOY, log=None)
    line = str(refused.value)
    assert "\n" not in line and "was made with other settings than the run's config.json" in line
    assert "--lr: checkpoint 0.1, config.json 0.2; --seed: checkpoint 0, config.json 5" in line
    assert (workdir / "metrics.jsonl").read_text() == before
    with pytest.raises(CheckpointError, match=r"--lr: checkpoint 0\.1, config\.json 0\.2"):
        bpjax.load_run(str(workdir))  # a reader does not label params with the wrong settings


def test_checkpoints_made_before_settings_and_checksums_were_recorded_still_resume(
    tmp_path, two_epochs, reference
):
    workdir = copy_of(two_epochs, tmp_path)
    for meta in (workdir / "checkpoints").glob("*/meta/metadata"):
        old = {k: v for k, v in json.loads(meta.read_text()).items()
               if k not in ("settings", "checksums", "epoch")}  # fmt: skip
        meta.write_text(json.dumps(old))
    lines = []
    result = train(workdir, lines, resume=True)
    assert any("from the checkpoint of epoch 2" in x for x in lines), lines
    chex.assert_trees_all_equal(result.params, reference[1][EPOCHS])


# --------------------------------------------------------- checksums of arrays (point 7)


def largest_file(directory):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def test_a_checkpoint_corrupted_in_place_falls_back_to_the_one_before(
    tmp_path, two_epochs, reference
):
    workdir = copy_of(two_epochs, tmp_path)
    path = largest_file(workdir / "checkpoints" / "2")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # same size, other bytes: Orbax reads it without complaint
        f.seek(size // 2)
        flipped = bytes(b ^ 0xFF for b in f.read(8))
        f.seek(size // 2)
        f.write(flipped)
    assert os.path.getsize(path) == size
    with pytest.warns(UserWarning, match=r"checkpoints/2 cannot be read \(ChecksumError"):
        assert bpjax.load_run(str(workdir)).epoch == 1  # a reader skips it, moves nothing
    assert not (workdir / "damaged").exists()
    lines = []
    result = train(workdir, lines, resume=True)
    warning = [x for x in lines if x.startswith("warning: checkpoint")]
    assert len(warning) == 1 and "/checkpoints/2 cannot be read (ChecksumError:" in warning[0]
    assert "moved to" in warning[0] and "using the one before it" in warning[0]
    assert any("from the checkpoint of epoch 1" in x for x in lines), lines
    assert len(os.listdir(workdir / "damaged")) == 1
    chex.assert_trees_all_equal(result.params, reference[1][EPOCHS])


# ------------------------------------------------------------ a reader writes nothing (12)


def tree(directory):
    return sorted(os.path.relpath(os.path.join(d, n), directory)
                  for d, dirs, files in os.walk(directory) for n in dirs + files)  # fmt: skip


def test_load_run_without_checkpoints_writes_nothing_and_says_so(tmp_path, two_epochs,
                                                                 monkeypatch):  # fmt: skip
    workdir = copy_of(two_epochs, tmp_path)
    shutil.rmtree(workdir / "checkpoints")
    os.chmod(workdir, 0o555)  # read-only (root ignores it: the listing below is the check)
    try:
        before = tree(workdir)
        start = re.escape(f"no checkpoints in {workdir} (no {workdir}/checkpoints)")
        with pytest.raises(CheckpointError, match=f"^{start}"):
            bpjax.load_run(str(workdir))
        assert tree(workdir) == before
        assert bpjax.load_run(str(workdir), epoch=0).epoch == 0  # the seed's, no checkpoint
        assert tree(workdir) == before

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Read-only file system")

        monkeypatch.setattr(os, "makedirs", refuse)
        monkeypatch.setattr(os, "mkdir", refuse)
        with pytest.raises(CheckpointError, match=r"^no checkpoints in .*load_run\(workdir, epoch"):
            bpjax.load_run(str(workdir))
        monkeypatch.undo()
        assert tree(workdir) == before
    finally:
        os.chmod(workdir, 0o755)


def test_load_run_of_a_run_with_checkpoints_writes_nothing(tmp_path, two_epochs, monkeypatch):
    workdir = copy_of(two_epochs, tmp_path)
    before = tree(workdir)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(os, "makedirs", refuse)
    monkeypatch.setattr(os, "mkdir", refuse)
    assert bpjax.load_run(str(workdir)).epoch == 2
    monkeypatch.undo()
    assert tree(workdir) == before
