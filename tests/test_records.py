"""A run's record files against what happens to files: symbolic links, a crash mid-append,
short writes, truncation at any byte, the umask, a stale lock (issue 20: 1, 3, 4, 5, 14).

Everything runs in-process on a tiny float64 problem; "the undisturbed run" is a
straight 3-epoch run, and a damaged run must end bit-identical to it (params and
every deterministic field of every epoch's record) or be refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import chex
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

import bpjax
from bpjax import files
from bpjax.config import Config
from bpjax.data import Dataset
from bpjax.errors import BpjaxError, RunError
from bpjax.files import write_atomic
from bpjax.runlock import RunLock


def _tiny() -> Dataset:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 6)) * 2
    y = rng.integers(0, 3, 96).astype(np.int32)
    x = (centers[y] + rng.normal(size=(96, 6))).astype(np.float32)
    return Dataset("tiny", x[:64], y[:64], x[64:], y[64:], 3)


TINY = _tiny()
SETTINGS = dict(dataset="mnist", hidden=(5,), batch=16, dtype="float64", checkpoint_every=1,
                optimizer="momentum", lr=0.2)  # fmt: skip
# The fields of a record that do not depend on the clock.
EXACT = ("epoch", "step", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
RECORDS = (".lock", "events.jsonl", "metrics.jsonl", "config.json")


def train(workdir, epochs: int, resume: bool = False, log=None):
    config = Config(workdir=str(workdir), epochs=epochs, resume=resume, **SETTINGS)
    return bpjax.train(config, dataset=TINY, log=log)


def exact(history):
    return [{k: m.get(k) for k in EXACT} for m in history]


def snapshot(root) -> dict[str, bytes]:
    """Every file under ``root`` (a file or a directory), by relative path, with its bytes."""
    root = str(root)
    if os.path.isfile(root):
        return {"": open(root, "rb").read()}
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = open(path, "rb").read()
    return found


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """JAX's persistent cache, for this module only: the same two programs are compiled
    in about 100 in-process runs, and loading them back is 5x faster than compiling."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")  # fmt: skip
    saved = {name: getattr(jax.config, name) for name in names}
    values = (str(tmp_path_factory.mktemp("jax-cache")), 0, 0)
    for name, value in zip(names, values, strict=True):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``full``: the undisturbed 3-epoch run; ``after2``: the same run stopped after epoch 2."""
    root = tmp_path_factory.mktemp("runs")
    full = train(root / "full", 3)
    train(root / "after2", 2)
    return {"full": full, "after2": root / "after2"}


def copy_after2(runs, dest):
    shutil.copytree(runs["after2"], dest)
    return dest


def assert_same_end(workdir, full) -> None:
    """``load_run`` gives the undisturbed run's params and records: no gap, no difference."""
    run = bpjax.load_run(str(workdir))
    assert run.epoch == 3
    chex.assert_trees_all_equal(run.params, full.params)
    assert exact(run.metrics) == exact(full.history)
    for line in open(os.path.join(workdir, "events.jsonl")).read().splitlines():
        json.loads(line)  # every event is a whole line


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message, message
    return message


# ------------------------------------------------------------- 1: symbolic links


@pytest.mark.parametrize("name", [*RECORDS, "checkpoints"])
def test_a_symlinked_record_is_refused_and_its_target_untouched(runs, tmp_path, name):
    workdir = copy_after2(runs, tmp_path / "run")
    outside = tmp_path / "outside"
    if name == ".lock":
        outside.write_text('{"note": "someone else\'s file"}\n')  # .lock is empty after a run
        os.unlink(workdir / name)
    else:
        shutil.move(workdir / name, outside)  # the content a reader would find through it
    os.symlink(outside, workdir / name)
    before = snapshot(outside)
    with pytest.raises(RunError) as refused:
        train(workdir, 3, resume=True)
    assert one_line(refused.value).startswith(f"{workdir / name} is a symbolic link;")
    assert "choose another --workdir" in str(refused.value)
    assert snapshot(outside) == before


def test_the_lock_is_opened_without_following_a_link(tmp_path):
    # Below the up-front check: RunLock itself never writes through a link.
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious\n")
    (tmp_path / "run").mkdir()
    os.symlink(outside, tmp_path / "run" / ".lock")
    with pytest.raises(RunError, match=r"\.lock is a symbolic link;"):
        RunLock.acquire(str(tmp_path / "run"), warn=print)
    assert outside.read_bytes() == b"precious\n"


def test_appends_and_atomic_writes_refuse_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious\n")
    os.symlink(outside, tmp_path / "events.jsonl")
    with pytest.raises(RunError, match=r"events\.jsonl is a symbolic link;"):
        files.append_line(tmp_path / "events.jsonl", '{"event": "x"}\n')
    with pytest.raises(RunError, match=r"events\.jsonl is a symbolic link;"):
        write_atomic(tmp_path / "events.jsonl", "replaced\n")
    assert outside.read_bytes() == b"precious\n"
    assert os.path.islink(tmp_path / "events.jsonl")


# ------------------------------------------------------- 3, 4: torn last lines


def tear_last_line(path) -> bytes:
    """Cuts the file in the middle of its last line, as a crash mid-append leaves it."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    cut = start + (len(data) - start) // 2
    path.write_bytes(data[:cut])
    return data[start:cut]


def test_a_torn_last_event_is_cut_off_before_the_next_append(runs, tmp_path):
    workdir = copy_after2(runs, tmp_path / "run")
    torn = tear_last_line(workdir / "events.jsonl")
    train(workdir, 3, resume=True)
    assert_same_end(workdir, runs["full"])
    events = bpjax.load_run(str(workdir)).events
    assert [e["event"] for e in events] == ["start", "repaired", "resume", "finished"]
    assert events[1]["file"] == "events.jsonl" and events[1]["cut"] == torn.decode()


def test_a_torn_last_metrics_record_is_recomputed_not_a_hole(runs, tmp_path):
    workdir = copy_after2(runs, tmp_path / "run")
    tear_last_line(workdir / "metrics.jsonl")  # epoch 2's record; its checkpoint is whole
    result = train(workdir, 3, resume=True)
    assert [m["epoch"] for m in result.history] == [1, 2, 3]
    assert_same_end(workdir, runs["full"])
    kinds = [e["event"] for e in bpjax.load_run(str(workdir)).events]
    assert kinds == ["start", "finished", "repaired", "records_behind", "resume", "finished"]


def test_a_checkpoint_without_its_record_is_kept_and_its_epoch_recomputed(runs, tmp_path):
    # A crash between the checkpoint of epoch 2 and its metrics line.
    workdir = copy_after2(runs, tmp_path / "run")
    lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (workdir / "metrics.jsonl").write_text(lines[0])
    kept = snapshot(workdir / "checkpoints" / "2")
    logged = []
    train(workdir, 3, resume=True, log=logged.append)
    assert_same_end(workdir, runs["full"])
    assert snapshot(workdir / "checkpoints" / "2") == kept  # not rewritten, not lost
    assert any("records epochs up to 1 only" in line and "epochs 2 to 2 are recomputed" in line
               for line in logged), logged  # fmt: skip


@pytest.mark.parametrize("bad, says", [
    ('{"step": 4, "train_loss": 1.0}', r"record 2 has epoch None after epoch 1;"),
    ('{"epoch": 1, "step": 4}', r"record 2 has epoch 1 after epoch 1;"),
    ("[2, 4]", r"line 2 is not a JSON object"),
])  # fmt: skip
def test_a_metrics_record_without_its_epoch_is_refused_in_one_line(runs, tmp_path, bad, says):
    workdir = copy_after2(runs, tmp_path / "run")
    lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (workdir / "metrics.jsonl").write_text(lines[0] + bad + "\n")
    before = snapshot(workdir / "metrics.jsonl"), snapshot(workdir / "checkpoints")
    with pytest.raises(RunError, match=says) as refused:
        train(workdir, 3, resume=True)
    one_line(refused.value)
    assert (snapshot(workdir / "metrics.jsonl"), snapshot(workdir / "checkpoints")) == before


# --------------------------------------------------------------- 5: short writes


@pytest.fixture
def short_writes(monkeypatch):
    """``os.write``/``os.pwrite`` that write 1 to 3 bytes per call, as the kernel may."""
    rng = np.random.default_rng(5)
    real_write, real_pwrite = os.write, os.pwrite

    def write(fd, data):
        return real_write(fd, bytes(data[: rng.integers(1, 4)]))

    def pwrite(fd, data, offset):
        return real_pwrite(fd, bytes(data[: rng.integers(1, 4)]), offset)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "pwrite", pwrite)


def test_appends_complete_short_writes(tmp_path, short_writes):
    line = json.dumps({"epoch": 1, "loss": 0.123456789, "note": "é"}) + "\n"
    files.append_line(tmp_path / "m.jsonl", line)
    files.append_line(tmp_path / "m.jsonl", line)
    assert (tmp_path / "m.jsonl").read_text() == line * 2
    write_atomic(tmp_path / "c.json", line)
    assert (tmp_path / "c.json").read_text() == line


def test_a_run_and_its_lock_survive_short_writes(runs, tmp_path, short_writes):
    result = train(tmp_path / "run", 3)
    assert exact(bpjax.load_run(str(tmp_path / "run")).metrics) == exact(runs["full"].history)
    assert len(result.history) == 3
    lock = RunLock.acquire(str(tmp_path / "other"), warn=print)
    try:
        held = json.loads((tmp_path / "other" / ".lock").read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    finally:
        lock.release()


# ---------------------------------------------------- 14: umask, lock messages


def test_record_files_follow_the_umask(runs, tmp_path):
    for umask, mode in [(0o077, 0o600), (0o022, 0o644)]:
        before = os.umask(umask)
        try:
            workdir = tmp_path / f"run{umask:o}"
            train(workdir, 1)
            lock = RunLock.acquire(str(workdir), warn=lambda line: None)  # a held lock's file
            held = stat.S_IMODE(os.stat(workdir / ".lock").st_mode)
            lock.release()
        finally:
            os.umask(before)
        modes = {name: stat.S_IMODE(os.stat(workdir / name).st_mode) for name in RECORDS}
        assert modes == dict.fromkeys(RECORDS, mode) and held == mode, (oct(umask), modes)


def _lock_left_by(workdir, pid, host) -> None:
    os.makedirs(workdir)
    record = {"pid": pid, "host": host, "since": "2024-01-01T00:00:00"}
    (workdir / ".lock").write_text(json.dumps(record) + "\n")


def _takeover_warning(workdir) -> str:
    warned = []
    RunLock.acquire(str(workdir), warn=warned.append).release()
    assert len(warned) == 1, warned
    return one_line(warned[0])


def test_a_lock_naming_a_live_pid_is_not_called_dead(tmp_path):
    _lock_left_by(tmp_path / "run", 1, socket.gethostname())  # pid 1 always runs
    warning = _takeover_warning(tmp_path / "run")
    assert "pid 1 on host" in warning and "no longer running" not in warning
    assert warning.endswith("so that run has ended (pid 1 is running, but does not hold the lock)")


def test_a_lock_naming_a_dead_pid_says_so(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(done.stdout)
    _lock_left_by(tmp_path / "run", pid, socket.gethostname())
    assert _takeover_warning(tmp_path / "run").endswith("which is no longer running")


def test_a_lock_from_another_host_is_not_judged(tmp_path):
    _lock_left_by(tmp_path / "run", 1, "elsewhere.invalid")
    warning = _takeover_warning(tmp_path / "run")
    assert "host elsewhere.invalid" in warning and "unknown" in warning
    assert "no longer running" not in warning and "is running" not in warning


def test_a_lock_that_is_a_directory_is_named(tmp_path):
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    with pytest.raises(RunError) as refused:
        train(tmp_path / "run", 1)
    assert one_line(refused.value).startswith(
        f"{tmp_path / 'run' / '.lock'} is a directory, not the run's lock file"
    )


@pytest.mark.parametrize("target, says", [("loop", "is a loop of symbolic links"),
                                          ("missing", "which does not exist")])  # fmt: skip
def test_a_workdir_link_that_leads_nowhere_is_named(tmp_path, target, says):
    os.symlink(tmp_path / target, tmp_path / "loop")
    with pytest.raises(RunError) as refused:
        train(tmp_path / "loop", 1)
    assert one_line(refused.value).startswith(f"--workdir={tmp_path / 'loop'} is ")
    assert says in str(refused.value)


# ------------------------------------------------- truncation at any byte


def _checkpoint_data_file(workdir) -> str:
    """The largest array data file of the newest checkpoint (epoch 2)."""
    found = snapshot(workdir / "checkpoints" / "2" / "state")
    data = [p for p in found if "ocdbt.process_0/d/" in p]
    return os.path.join("checkpoints", "2", "state", max(data, key=lambda p: len(found[p])))


def _lock_left_by_a_killed_run(workdir) -> None:
    """A killed run leaves its lock record behind (a clean end empties ``.lock``)."""
    record = {"pid": 2**22 + 7, "host": socket.gethostname(), "since": "2024-01-01T00:00:00"}
    (workdir / ".lock").write_text(json.dumps(record) + "\n")


@pytest.mark.parametrize("name", [*RECORDS, "checkpoint data"])
def test_a_record_truncated_at_any_byte_resumes_to_the_same_end_or_is_refused(runs, tmp_path,
                                                                              name):  # fmt: skip
    template = copy_after2(runs, tmp_path / "template")
    _lock_left_by_a_killed_run(template)
    relative = _checkpoint_data_file(template) if name == "checkpoint data" else name
    size = os.path.getsize(template / relative)
    rng = np.random.default_rng(20)
    offsets = sorted(rng.choice(size, size=min(size, 20), replace=False))
    assert len(offsets) == 20
    outcomes = []
    for offset in offsets:
        workdir = shutil.copytree(template, tmp_path / f"cut{offset}")
        with open(workdir / relative, "r+b") as f:
            f.truncate(offset)
        before = snapshot(workdir)
        try:
            train(workdir, 3, resume=True)
            assert_same_end(workdir, runs["full"])
            outcomes.append("same end")
        except BpjaxError as e:
            outcomes.append(one_line(e))
            assert snapshot(workdir) == before, f"a refusal changed {workdir}"
        shutil.rmtree(workdir)
    # Only the settings cannot be recovered (refused: the run's recorded settings are gone);
    # every other record is rebuilt from what survives.
    if name != "config.json":
        assert outcomes == ["same end"] * len(offsets), outcomes
