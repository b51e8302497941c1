"""Runs survive what happens to real runs: signals, SIGKILL, damaged checkpoints, a second
writer, a full disk. Every case uses real ``launch.py`` processes, real signals and real
files, and ends by resuming and comparing, bit for bit in float64, with a run that was
never disturbed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import chex
import pytest

import bpjax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch.py")
EPOCHS = 24
ARGS = ["--dataset=regression", "--loss=squared_error", "--activation=tanh", "--hidden=16",
        "--batch=32", "--train_examples=512", "--dtype=float64", "--lr=0.01",
        f"--epochs={EPOCHS}"]  # fmt: skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache for the launches here: the same programs are
    compiled in about 50 processes; the cached executables are the ones XLA compiled."""
    global ENV
    ENV = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax-cache")),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}  # fmt: skip


ENV = dict(os.environ)


def start(workdir, *extra, file_size_kb=None):
    """``launch.py`` in the background; its output goes to files beside the workdir.

    ``file_size_kb``: the shell's ``ulimit -f`` for the run (SIGXFSZ ignored), so a write
    past it fails with EFBIG, a real error from the kernel, as a full disk gives ENOSPC.
    """
    out = open(f"{workdir}.out", "w")  # closed by finish()
    err = open(f"{workdir}.err", "w")
    command = [sys.executable, LAUNCH, *extra, f"--workdir={workdir}"]
    if file_size_kb is not None:
        limit = f"ulimit -f {file_size_kb}; trap '' XFSZ; exec \"$@\""
        command = ["bash", "-c", limit, "bash", *command]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err, env=ENV)
    proc.files = (out, err)
    return proc


def finish(proc, timeout=240):
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
        for f in proc.files:
            f.close()
    return proc.returncode


def output(workdir):
    with open(f"{workdir}.out") as o, open(f"{workdir}.err") as e:
        return o.read(), e.read()


def wait_for(predicate, proc, timeout=120):
    """Polls every 2 ms; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.002)
    return True


def lines(workdir, name="metrics.jsonl"):
    try:
        with open(os.path.join(workdir, name)) as f:
            return f.read().count("\n")
    except FileNotFoundError:
        return 0


def writing_checkpoint(workdir):
    try:
        return any("tmp" in n for n in os.listdir(os.path.join(workdir, "checkpoints")))
    except FileNotFoundError:
        return False


def resume(workdir, *extra):
    done = subprocess.run([sys.executable, LAUNCH, f"--workdir={workdir}", "--resume", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=ENV)  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final parameters of an undisturbed run of ``ARGS``."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    assert finish(start(workdir, *ARGS)) == 0, output(workdir)[1]
    return bpjax.load_run(workdir).params


def assert_ends_like(reference, workdir):
    loaded = bpjax.load_run(str(workdir))
    assert loaded.epoch == EPOCHS
    assert [m["epoch"] for m in loaded.metrics] == list(range(1, EPOCHS + 1))
    chex.assert_trees_all_equal(loaded.params, reference)


MOMENTS = {
    "compiling": lambda w: os.path.exists(os.path.join(w, "config.json")),
    "between epochs": lambda w: lines(w) >= 3,
    "writing a checkpoint": lambda w: lines(w) >= 2 and writing_checkpoint(w),
}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_signal_stops_at_the_next_epoch_end_and_the_resume_ends_bit_identical(
    tmp_path, reference, sig, moment
):
    workdir = str(tmp_path / "run")
    proc = start(workdir, *ARGS)
    assert wait_for(lambda: MOMENTS[moment](workdir), proc), output(workdir)
    proc.send_signal(sig)
    assert finish(proc) == 128 + sig  # 130 for SIGINT, 143 for SIGTERM
    stderr = output(workdir)[1]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"interrupted at epoch (\d+); resume with: python (\S+) "
                         r"--workdir=(\S+) --resume", last)  # fmt: skip
    assert match and match.group(2) == LAUNCH and match.group(3) == workdir, last
    epoch = int(match.group(1))
    assert epoch < EPOCHS and lines(workdir) == epoch
    if epoch:  # the last completed epoch is checkpointed, whatever the cadence
        assert bpjax.load_run(workdir).epoch == epoch
    events = [json.loads(x) for x in open(os.path.join(workdir, "events.jsonl"))]
    assert events[-1]["event"] == "interrupted" and events[-1]["epoch"] == epoch
    resumed = resume(workdir)
    if epoch:
        assert f"from the checkpoint of epoch {epoch}" in resumed.stdout
    assert_ends_like(reference, workdir)


def test_a_second_ctrl_c_exits_at_once_and_leaves_the_last_checkpoint_intact(tmp_path, reference):
    workdir = str(tmp_path / "run")
    proc = start(workdir, *ARGS, "--checkpoint_every=1")
    assert wait_for(lambda: lines(workdir) >= 2 and writing_checkpoint(workdir), proc)
    proc.send_signal(signal.SIGINT)
    # The kernel merges a signal sent while the same one is still pending: wait until the
    # first was handled (its line is out), then send the second.
    assert wait_for(lambda: "SIGINT received" in output(workdir)[1], proc)
    proc.send_signal(signal.SIGINT)
    assert finish(proc) == 130
    stderr = output(workdir)[1]
    assert "Traceback" not in stderr and "SIGINT again: exiting now" in stderr
    resume(workdir)
    assert_ends_like(reference, workdir)


def test_sigkill_at_twenty_moments_each_resumes_to_the_undisturbed_run(tmp_path, reference):
    """Fault injection: kill -9 at 20 points (compiling, mid-run, writing checkpoints)."""
    killed_alive = 0
    for k in range(20):
        workdir = str(tmp_path / f"kill{k}")
        proc = start(workdir, *ARGS)
        if k == 0:
            moment = MOMENTS["compiling"]
        elif k % 3 == 0:
            moment = lambda w, k=k: lines(w) >= k and writing_checkpoint(w)  # noqa: E731
        else:
            moment = lambda w, k=k: lines(w) >= k  # noqa: E731
        alive = wait_for(lambda w=workdir, m=moment: m(w), proc)
        time.sleep(0.001 * (k % 5))  # spread the moments within an epoch too
        killed_alive += alive and proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        finish(proc)
        resume(workdir)
        assert_ends_like(reference, workdir)
    assert killed_alive >= 18, f"only {killed_alive} of 20 kills hit a live run"


def largest_file(directory):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, reference):
    workdir = str(tmp_path / "run")
    assert finish(start(workdir, *ARGS[:-1], f"--epochs={EPOCHS - 2}")) == 0
    damaged = largest_file(os.path.join(workdir, "checkpoints", str(EPOCHS - 2)))
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)
    done = resume(workdir, f"--epochs={EPOCHS}")
    warning = [x for x in done.stdout.splitlines() if x.startswith("warning: checkpoint")]
    assert len(warning) == 1 and f"/checkpoints/{EPOCHS - 2} cannot be read" in warning[0]
    assert "using the one before it" in warning[0]
    assert f"from the checkpoint of epoch {EPOCHS - 3}" in done.stdout
    assert os.listdir(os.path.join(workdir, "damaged"))  # kept aside for inspection
    assert_ends_like(reference, workdir)
    # Every checkpoint damaged: one line, no traceback.
    for epoch in os.listdir(os.path.join(workdir, "checkpoints")):
        path = largest_file(os.path.join(workdir, "checkpoints", epoch))
        with open(path, "r+b") as f:
            f.truncate(1)
    done = subprocess.run([sys.executable, LAUNCH, f"--workdir={workdir}", "--resume"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=ENV)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: no intact checkpoint in {workdir}/checkpoints")


def test_one_writer_per_run_and_a_dead_writers_lock_is_taken_over(tmp_path, reference):
    workdir = str(tmp_path / "run")
    first = start(workdir, *ARGS[:-1], "--epochs=100000")
    assert wait_for(lambda: lines(workdir) >= 1, first)
    second = subprocess.run([sys.executable, LAUNCH, f"--workdir={workdir}", "--resume"],
                            cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env=ENV)  # fmt: skip
    assert second.returncode == 2 and "Traceback" not in second.stderr
    line = second.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: --workdir={workdir} is in use by pid {first.pid} on host \S+ "
                        r"\(since [\d\-T:]+\): wait for that run to end \(or stop it\), or "
                        r"choose another --workdir", line), line  # fmt: skip
    first.send_signal(signal.SIGKILL)
    finish(first)
    with open(os.path.join(workdir, ".lock")) as f:
        assert json.load(f)["pid"] == first.pid  # the dead run's lock is still there
    done = resume(workdir, f"--epochs={EPOCHS}")
    assert re.search(rf"warning: took over the lock of pid {first.pid} on host \S+ .*, which is "
                     "no longer running", done.stdout), done.stdout[:2000]  # fmt: skip


@pytest.mark.parametrize("what", ["checkpoint", "metrics"])
def test_a_failed_write_is_one_line_and_keeps_what_was_written(tmp_path, reference, what):
    # A real write error from the kernel: a file-size limit (ulimit -f), the same path
    # through the code as a full disk. The checkpoint's weight file (~100 kB) is over
    # 30 kB; with checkpoints only at the end, metrics.jsonl reaches 3 kB first.
    workdir = str(tmp_path / "run")
    extra, limit = ([], 30) if what == "checkpoint" else (["--checkpoint_every=1000"], 3)
    proc = start(workdir, *ARGS, *extra, file_size_kb=limit)
    assert finish(proc) == 2
    stderr = output(workdir)[1]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    target = "the checkpoint of epoch 1" if what == "checkpoint" else "metrics.jsonl"
    assert line.startswith(f"error: could not write {target} in {workdir} ("), line
    assert line.endswith(f"continue with --workdir={workdir} --resume")
    assert bpjax.Config.from_json(workdir).epochs == EPOCHS  # config.json intact
    written = bpjax.read_metrics(workdir)  # whole lines only
    assert [m["epoch"] for m in written] == list(range(1, len(written) + 1))
    resume(workdir)
    assert_ends_like(reference, workdir)
