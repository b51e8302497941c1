"""Settings are refused in one line before anything is written, whatever their source.

Every field of ``Config`` from JSON with a value of the wrong type; settings that cannot
work together (refused by ``Config`` itself, so a refused launch leaves no trace and the
corrected command then runs); every setting a resume may not change, and every one it
may; a signal while ``launch.py`` is still importing JAX; ``launch.py``'s usage errors.
Processes only where the point is the process (exit status, signals, argv); the rest
trains in-process on a toy dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
import typing

import numpy as np
import pytest
from script_loader import load_script
from test_train import TOY

import bpjax
from bpjax.config import Config
from bpjax.errors import ConfigError
from bpjax.interrupt import SIGNALS, graceful_stop
from bpjax.rundir import RunDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch.py")
# A float64 regression run of a second or two.
TINY = ["--dataset=regression", "--loss=squared_error", "--activation=tanh", "--hidden=8",
        "--batch=32", "--train_examples=256", "--dtype=float64", "--epochs=1"]  # fmt: skip
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
HINTS = typing.get_type_hints(Config)


def launch(*args, timeout=180):
    return subprocess.run([sys.executable, LAUNCH, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def one_error_line(result) -> str:
    """The refusal's one ``error:`` line (exit status 2, no traceback, nothing else said)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def files_of(workdir) -> dict[str, bytes]:
    """Every record file of a run, by path (checkpoints included), with its bytes."""
    found = {}
    for folder, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, workdir)] = f.read()
    return found


# --------------------------------------------------------------------- types


def _base(hint):
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return hint


def wrong_values(hint) -> list:
    """Values JSON could give that are not of type ``hint`` (None only where not allowed)."""
    base = _base(hint)
    wrong = {bool: [1, "true", 0.0], int: [True, 1.5, "1", [1]], float: [True, "0.5", [0.5]],
             str: [5, True, ["a"]]}.get(base)  # fmt: skip
    if typing.get_origin(base) is tuple:
        wrong = [500, "500", ["a"], [True], [1.5], {"a": 1}]
    if wrong is None:
        return []  # a type this test does not know: the coverage test below names the field
    return wrong if base is not hint else [*wrong, None]


CASES = [(name, value) for name, hint in HINTS.items() for value in wrong_values(hint)]


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v!r}" for n, v in CASES])
def test_every_setting_of_the_wrong_type_in_json_is_one_line_naming_it(name, value):
    with pytest.raises(ConfigError) as refused:
        Config.from_json(json.dumps({name: value}))
    message = str(refused.value)
    assert message.startswith(f"--{name}=") and "wrong type: expected" in message, message
    assert "\n" not in message and message.endswith("(in JSON)"), message


def test_bool_is_no_number_and_every_field_is_covered():
    missing = set(FIELDS) - {name for name, _ in CASES}  # a new field gets cases by its type
    assert not missing, f"no wrong values for {missing}: extend wrong_values()"
    for record in ({"lr": True}, {"epochs": True}, {"batch": False}, {"seed": True}):
        with pytest.raises(ConfigError, match="got bool"):
            Config.from_json(record)


def test_json_lists_become_tuples_and_numbers_keep_their_meaning():
    config = Config.from_json('{"hidden": [256, 128], "lr": 1, "dp_clip": 2}')
    assert config.hidden == (256, 128) and isinstance(config.hidden, tuple)
    assert config.lr == 1.0 and isinstance(config.lr, float) and hash(config)
    # A notebook's NumPy scalars become Python numbers: JSON can write them.
    from_numpy = Config(hidden=[np.int64(8)], batch=np.int32(16), lr=np.float32(0.5))
    assert json.loads(from_numpy.to_json())["hidden"] == [8] and from_numpy.batch == 16
    assert Config.from_json(from_numpy.to_json()) == from_numpy


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"lr": 0.1, "workdir": "caf\xe9"}')
    with pytest.raises(ConfigError, match=r"config.json is not UTF-8 text, so not JSON: byte 27"
                       r" is 0xe9$"):  # fmt: skip
        Config.from_json(str(path))


@pytest.mark.slow
@pytest.mark.parametrize(
    "record, message",
    [
        ({"hidden": 500}, "--hidden=500 has the wrong type: expected a list of integers, got int"),
        ({"momentum": "0.5"}, "--momentum='0.5' has the wrong type: expected a number, got str"),
        ({"lr": True}, "--lr=True has the wrong type: expected a number, got bool"),
        (b'{"lr": 0.1, "seed": 7\xff}', "is not UTF-8 text"),
    ],
)
def test_launch_with_a_config_of_the_wrong_type_is_one_line_exit_2(tmp_path, record, message):
    path = tmp_path / "config.json"
    path.write_bytes(record if isinstance(record, bytes) else json.dumps(record).encode())
    result = launch(f"--config={path}", f"--workdir={tmp_path / 'run'}")
    assert message in one_error_line(result) and result.stdout == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_of_a_hand_edited_config_of_the_wrong_type_is_one_line_exit_2(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"epochs": "3"}))
    line = one_error_line(launch(f"--workdir={workdir}", "--resume"))
    assert line == (f"error: --epochs='3' has the wrong type: expected an integer, got str"
                    f" (in {workdir / 'config.json'})")  # fmt: skip
    assert os.listdir(workdir) == ["config.json"]


# ------------------------------------------------- refused before anything is written


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(lr_schedule="warmup_cosine", warmup_epochs=2.0, epochs=2),
         "--warmup_epochs=2.0 leaves warmup_cosine no step of --epochs=2 to decay over"),
        (dict(noise_scale=True, batch=1), "--noise_scale needs --batch >= 2"),
        (dict(dataset="regression", loss="squared_error", data_dir="/data"),
         "--data_dir holds the IDX files of an image dataset; --dataset=regression is generated"),
    ],
)
def test_settings_config_can_judge_are_refused_by_config(settings, message):
    with pytest.raises(ConfigError, match=message):
        Config(**settings)


def test_a_refused_run_leaves_nothing_and_the_corrected_one_runs(tmp_path):
    # 96 toy examples at batch 16: 6 steps an epoch, which 4 does not divide. Only the
    # data say so, so train refuses it, but before config.json exists.
    config = Config(hidden=(8,), batch=16, epochs=1, eval_every_steps=4,
                    workdir=str(tmp_path / "run"))  # fmt: skip
    with pytest.raises(ConfigError, match="--eval_every_steps=4 does not divide the 6 steps"):
        bpjax.train(config, dataset=TOY, log=None)
    assert not (tmp_path / "run" / "config.json").exists()
    result = bpjax.train(config.replace(eval_every_steps=3), dataset=TOY, log=None)
    assert [m["epoch"] for m in result.history] == [0.5, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, corrected",
    [
        (["--lr_schedule=warmup_cosine", "--warmup_epochs=1"], None),
        (["--noise_scale", "--batch=1"], ["--noise_scale", "--batch=2"]),
        (["--data_dir=/nonexistent"], None),
    ],
)
def test_a_refused_launch_writes_nothing_and_the_corrected_one_runs(tmp_path, flags, corrected):
    workdir = f"--workdir={tmp_path / 'run'}"
    result = launch(*TINY, *flags, workdir)
    one_error_line(result)
    assert not (tmp_path / "run").exists() and result.stdout == ""
    if corrected:  # in the same workdir: not "already holds a run"
        again = launch(*TINY, *corrected, workdir)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "b_simple" in bpjax.read_metrics(str(tmp_path / "run"))[-1]


def test_zero_epochs_on_a_new_run_says_so_truly(tmp_path):
    lines = []
    config = Config(hidden=(8,), batch=16, epochs=0, workdir=str(tmp_path / "run"))
    result = bpjax.train(config, dataset=TOY, log=lines.append)
    assert result.history == [] and not any("already finished" in line for line in lines)
    assert "--epochs=0: no epoch to train; the parameters are the initial ones" in lines


# ----------------------------------------------------------- the command line itself


@pytest.mark.slow
def test_an_unexpected_positional_argument_is_a_usage_error():
    result = launch("--epochs=1", "extra")
    assert one_error_line(result) == (
        "error: unexpected arguments ['extra']: flags take the form --name=value"
    )


@pytest.mark.slow
def test_config_of_a_run_recorded_with_resume_repeats_it_as_a_new_run(tmp_path):
    # A scheduled job records resume=true; a hand-written record may even lack a workdir.
    record = {**json.loads(Config(dataset="regression", loss="squared_error", hidden=(8,),
                                  batch=32, train_examples=256, epochs=1).to_json()),
              "resume": True, "workdir": None}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(record))
    result = launch(f"--config={tmp_path / 'config.json'}", f"--workdir={tmp_path / 'b'}")
    assert result.returncode == 0, result.stderr[-2000:]
    repeated = Config.from_json(str(tmp_path / "b"))
    assert repeated.resume is False and repeated.workdir == str(tmp_path / "b")


def _sigcgt(pid: int) -> int:
    """The signals process ``pid`` catches (a bit mask, bit n-1 for signal n)."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)


@pytest.mark.slow
@pytest.mark.parametrize("signum, delay", [(signal.SIGINT, 0.0), (signal.SIGINT, 0.4),
                                           (signal.SIGTERM, 0.2)])  # fmt: skip
def test_a_signal_while_importing_exits_at_once_in_one_line(tmp_path, signum, delay):
    # launch.py catches SIGTERM (Python does not by default) before it imports JAX and
    # Orbax; the signal goes in then, or `delay` seconds later, still importing.
    proc = subprocess.Popen([sys.executable, LAUNCH, *TINY, f"--workdir={tmp_path / 'run'}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _sigcgt(proc.pid) & (1 << (signal.SIGTERM - 1)):
            assert proc.poll() is None and time.monotonic() < deadline, "never caught SIGTERM"
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-2000:]
    assert err.splitlines() == [f"bpjax: {name} received outside the training loop: exiting"]
    assert out == "" and not (tmp_path / "run").exists()


def test_graceful_stop_turns_a_signal_into_a_request_and_restores_the_handlers():
    def mine(signum, frame):
        raise AssertionError("the block's own handler should have caught it")

    saved = {s: signal.signal(s, mine) for s in SIGNALS}
    try:
        for failing in (False, True):
            with contextlib.suppress(KeyError), graceful_stop() as stop:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # Python runs the handler at the next bytecode boundary
                assert stop() and stop.exit_status == 143 and stop.name == "SIGTERM"
                if failing:
                    raise KeyError("the block fails: the handlers come back all the same")
            assert all(signal.getsignal(s) is mine for s in SIGNALS)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    """A finished 1-epoch run whose every non-resumable setting can change alone."""
    workdir = tmp_path_factory.mktemp("fixed") / "run"
    config = Config(hidden=(8,), batch=16, epochs=1, dp_clip=1.0, lr_schedule="warmup_cosine",
                    warmup_epochs=0.5, feedback="usf", workdir=str(workdir))  # fmt: skip
    bpjax.train(config, dataset=TOY, log=None)
    return config


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A finished 1-epoch run whose every resumable setting can change alone."""
    workdir = tmp_path_factory.mktemp("plain") / "run"
    config = Config(hidden=(8,), batch=16, epochs=1, workdir=str(workdir),
                    validation_examples=16)  # so that --target_split=validation can be set
    bpjax.train(config, dataset=TOY, log=None)
    return config


def changed(config: Config, name: str) -> Config:
    """``config`` with field ``name`` alone changed to another valid value."""
    value, base = getattr(config, name), _base(HINTS[name])
    if name == "num_devices":
        candidates = [0]  # all devices: on a one-device machine the same device
    elif name == "feedback":  # a name, or an import path: the built-in rules
        candidates = [r for r in bpjax.FEEDBACK_RULES if r != value]
    elif name == "dataset":  # a name, or a file (npz:PATH, ...): the built-in datasets
        candidates = [d for d in bpjax.data.DATASETS if d != value]
    elif FIELDS[name].metadata.get("choices"):
        candidates = [c for c in FIELDS[name].metadata["choices"] if c != value]
    elif base is bool:
        candidates = [not value]
    elif base in (int, float):
        start = value if value is not None else (64 if base is int else 0.5)
        candidates = [start, start + 1, start * 2, start / 2] if value is None else [
            value + 1, value * 2, value / 2 if base is float else value - 1]
    elif base is str:
        candidates = [os.path.join(value or "", "elsewhere")]
    else:
        candidates = [(*value, 4)]
    for candidate in candidates:
        try:
            return config.replace(**{name: candidate})
        except ConfigError:
            continue
    raise AssertionError(f"no other valid value of --{name} from {candidates}: extend changed()")


FIXED = [n for n, f in FIELDS.items() if not f.metadata["resumable"]  # data_shape: derived,
         and n != "data_shape"] + ["epochs"]  # cosine; (test_userdata checks it on resume)


@pytest.mark.parametrize("name", FIXED)
def test_a_resume_that_changes_a_fixed_setting_is_refused_naming_it(fixed_run, name):
    before = files_of(fixed_run.workdir)
    config = changed(fixed_run.replace(resume=True), name)
    with pytest.raises(ConfigError) as refused:
        bpjax.train(config, dataset=TOY, log=None)
    old, new = getattr(fixed_run, name), getattr(config, name)
    message = str(refused.value)
    assert f"--{name}: recorded {old!r}, given {new!r}" in message and "\n" not in message
    assert message.count(": recorded ") == 1  # that setting alone
    assert files_of(fixed_run.workdir) == before  # nothing written or altered


RESUMABLE = [n for n, f in FIELDS.items() if f.metadata["resumable"]]


@pytest.mark.parametrize("name", RESUMABLE)
def test_every_resumable_setting_can_change_on_resume(plain_run, tmp_path, name):
    workdir = tmp_path / "copy"  # each case resumes its own copy: the workdir changes too
    shutil.copytree(plain_run.workdir, workdir)
    config = plain_run.replace(resume=True, workdir=str(workdir))
    if name == "num_processes":  # needs a split of the devices; train would need 2 processes
        config = config.replace(num_devices=0, num_processes=2)
        RunDir.open(config, log=lambda line: None).close()  # the resume check passes
        return
    config = changed(config, name) if name not in ("workdir", "resume") else config
    result = bpjax.train(config, dataset=TOY, log=None)
    assert [m["epoch"] for m in result.history] == list(range(1, config.epochs + 1))
    events = [json.loads(x) for x in (workdir / "events.jsonl").read_text().splitlines()]
    assert events[-2]["event"] == "resume", events
    want = {"workdir": [plain_run.workdir, str(workdir)]}
    if name not in ("workdir", "resume"):
        want[name] = [getattr(plain_run, name), getattr(config, name)]
    assert events[-2]["changed"] == want


# ----------------------------------------------------------------- batch_study


def test_batch_study_refuses_a_negative_step_budget():
    study, _ = load_script("batch_study")
    with pytest.raises(ConfigError, match=r"--max_steps must be 0 \(no step budget\) or a"):
        study.StudySettings(max_steps=-5, platforms=("cpu",))
