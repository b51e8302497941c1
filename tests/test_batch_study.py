"""The batch-size study (issue 14): its pure pieces, its settings, and the script end to end.

The pure pieces live in ``bpjax.bench.study``; the script is loaded as a module with its
absl flags defined on a private ``FlagValues`` (nothing lands on the global ``FLAGS``); the
end-to-end test runs it as a user does, in a subprocess on a slice of real MNIST.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import subprocess

import numpy as np
import pytest
from script_loader import run_script, script_fixture

import bpjax
from bpjax.bench import study
from bpjax.bench.report import csv_text

script = script_fixture("batch_study", defines="lr_scaling", absent="lrs_per_batch")


# ------------------------------------------------------------------ the grid


def test_lr_grid_is_centred_on_the_scaling_rule():
    sqrt = study.lr_grid(512, 0.3, 128, "sqrt", 5, 2.0)
    np.testing.assert_allclose(sqrt, [0.15, 0.3, 0.6, 1.2, 2.4], rtol=1e-12)
    linear = study.lr_grid(512, 0.3, 128, "linear", 3, 4.0)
    np.testing.assert_allclose(linear, [0.3, 1.2, 4.8], rtol=1e-12)
    assert study.lr_grid(32, 0.1, 128, "none", 1, 2.0) == (0.1,)
    even = study.lr_grid(32, 0.3, 128, "sqrt", 2, 2.0)  # centred in log: geometric mean
    assert math.isclose(math.sqrt(even[0] * even[1]), 0.15, rel_tol=1e-12)
    assert math.isclose(even[1] / even[0], 2.0, rel_tol=1e-12)
    assert study.trial_order(5) == [2, 3, 1, 4, 0]  # centre first, larger lr first at a tie
    assert study.trial_order(2) == [1, 0] and study.trial_order(1) == [0]


def test_evaluation_cadence_divides_the_epoch():
    assert study.eval_every(3584, 32) == 112  # 57344 / 16: exactly 32 evaluations
    assert study.eval_every(7, 32) == 1  # 57344 / 8192: every step
    assert study.eval_every(468, 32) == 13  # 60000 / 128: 36 evaluations, nearest to 32
    assert study.eval_every(937, 32) == 937  # prime: once per epoch, not 937 times
    for steps in (7, 28, 117, 234, 468, 896, 1875, 3750):
        assert steps % study.eval_every(steps, 32) == 0
    assert study.budget_epochs(3584, 60, 10000) == 3  # the step budget comes first
    assert study.budget_epochs(7, 60, 10000) == 60
    assert study.budget_epochs(20000, 60, 10000) == 1 and study.budget_epochs(7, 5, None) == 5


# ------------------------------------------------------------------ outcomes


def _trial(batch, lr, status, step=None, train_s=None, platform="cpu", b_simple=None):
    return {"platform": platform, "batch": batch, "lr": lr, "status": status,
            "target_step": step, "target_epoch": None if step is None else step / 10,
            "target_examples": None if step is None else step * batch,
            "target_train_s": train_s, "compile_s": 1.0, "steps_per_epoch": 10,
            "eval_every_steps": 1, "b_simple": b_simple, "b_simple_median": b_simple}  # fmt: skip


def test_steps_to_target_is_the_minimum_over_trials_infeasible_ones_included():
    trials = [
        _trial(64, 0.1, "reached", 500, 2.0),
        _trial(64, 0.2, "reached", 300, 3.0, b_simple=150.0),
        _trial(64, 0.4, "diverged"),  # infeasible: counts for nothing
        _trial(64, 0.05, "budget"),
        _trial(64, 0.8, "reached", 300, 2.5),  # the same step: less training time wins
        _trial(128, 0.1, "diverged"),
        _trial(128, 0.2, "budget"),
        _trial(64, 0.2, "reached", 100, 1.0, platform="gpu"),  # another platform apart
    ]
    best = study.best_trials(trials)
    assert best[("cpu", 64)]["lr"] == 0.8 and best[("cpu", 128)] is None
    assert best[("gpu", 64)]["target_step"] == 100
    rows = {(r["platform"], r["batch"]): r for r in study.batch_rows(trials)}
    row = rows[("cpu", 64)]
    assert (row["target_step"], row["lr"], row["reached"], row["diverged"], row["trials"]) == (
        300, 0.8, 3, 1, 5)  # fmt: skip
    assert row["lr_at_grid_edge"]  # 0.8 is the grid's largest
    assert rows[("cpu", 128)]["target_step"] is None and rows[("cpu", 128)]["diverged"] == 1


def test_first_hit_and_b_simple_of_a_run():
    history = [
        {"step": 10, "test_accuracy": 0.90, "test_loss": 0.5, "trace_sigma": 100.0,
         "grad_sq_norm": 2.0, "b_simple": 50.0},
        {"step": 20, "test_accuracy": 0.97, "test_loss": 0.2, "trace_sigma": 300.0,
         "grad_sq_norm": -1.0, "b_simple": float("nan")},  # a noisy interval: no own B_simple
        {"step": 30, "test_accuracy": 0.98, "test_loss": 0.1, "trace_sigma": 200.0,
         "grad_sq_norm": 2.0, "b_simple": 100.0},
    ]  # fmt: skip
    assert study.first_hit(history, 0.97)["step"] == 20
    assert study.first_hit(history, 0.99) is None
    assert study.first_hit(history, None, target_loss=0.15)["step"] == 30
    b = study.run_b_simple(history)
    assert math.isclose(b["ratio"], 200.0 / 1.0)  # mean tr(Σ) / mean |G|², not a mean of ratios
    assert b["median"] == 75.0
    assert study.run_b_simple([{"step": 1}]) == {"ratio": None, "median": None}


# ------------------------------------------------------------------ the fit


def test_the_fit_recovers_s_min_and_e_min_from_the_model():
    batches = [2.0**k for k in range(4, 14)]
    s_min, b_crit = 250.0, 400.0
    exact = study.fitted_steps({"s_min": s_min, "b_crit": b_crit}, batches)
    fit = study.fit_steps(batches, exact)
    assert math.isclose(fit["s_min"], s_min, rel_tol=1e-4)
    assert math.isclose(fit["b_crit"], b_crit, rel_tol=1e-4)
    assert math.isclose(fit["e_min"], s_min * b_crit, rel_tol=1e-4)
    assert fit["rms_log"] < 1e-6 and not fit["at_edge"]
    # On the curve: (S/S_min - 1)(E/E_min - 1) = 1 with E = B S.
    for b, s in zip(batches, exact, strict=True):
        assert math.isclose((s / s_min - 1) * (b * s / fit["e_min"] - 1), 1.0, rel_tol=1e-3)

    rng = np.random.default_rng(0)
    errors = []
    for _ in range(20):  # 10 % lognormal noise on every point
        noisy = exact * np.exp(rng.normal(0.0, 0.1, len(batches)))
        f = study.fit_steps(batches, noisy)
        errors.append((f["s_min"] / s_min - 1, f["e_min"] / (s_min * b_crit) - 1))
    median_error = np.median(np.abs(errors), axis=0)
    assert median_error[0] < 0.1 and median_error[1] < 0.15, median_error


def test_the_fit_says_when_there_is_no_knee():
    batches = [16.0, 64.0, 256.0, 1024.0]
    perfect = [1e5 / b for b in batches]  # S ∝ 1/B throughout: B_crit beyond the batches
    fit = study.fit_steps(batches, perfect)
    assert fit["at_edge"] and fit["b_crit"] > 1000 * max(batches) / 2
    assert study.fit_steps([16.0], [100.0]) is None
    assert study.fit_steps([16.0, 32.0], [100.0, None]) is None  # a batch that never hit


# ------------------------------------------------------------------ summaries


def test_summary_comparison_and_report():
    trials = [
        _trial(b, 0.1, "reached", s, s / 100, b_simple=bs)
        for b, s, bs in ((16, 1000, 80.0), (64, 300, 120.0), (256, 120, 100.0))
    ]
    trials.append(_trial(1024, 0.1, "diverged"))
    summary = study.summarize(trials, ["cpu"])
    assert summary["b_simple"]["cpu"] == 100.0  # median over the batch sizes that hit
    assert summary["fits"]["cpu"]["points"] == 3
    default = {"platform": "cpu", "status": "reached", "target_epoch": 12, "target_train_s": 30.0}
    c = study.compare_with_default(trials, default, 0.98)
    assert c["fastest"]["batch"] == 256 and math.isclose(c["time_ratio"], 25.0)
    assert math.isclose(c["epoch_ratio"], 1.0) and not c["floor_held"]  # 12 epochs > 5
    assert "floor_held" not in study.compare_with_default(trials, default, 0.97)
    missed = study.compare_with_default(trials, {**default, "status": "budget"}, 0.98)
    assert missed["fastest"] is None
    text = study.format_report(summary, {"cpu": c})
    assert "B_crit" in text and "floor MISSED" in text and "  1024" in text
    with_none = csv_text([{"a": 1, "b": None}, {"a": 2, "c": "x"}])
    assert with_none.splitlines() == ["a,b,c", "1,,", "2,,x"]


def test_settings_defaults_quick_and_names(script):
    s = script.StudySettings(platforms=("cpu",))
    # results land in runs/ (git-ignored) unless a command names the committed folder
    assert s.out_dir == "runs/batch_study" and s.runs_dir.startswith("runs/")
    assert s.batches == tuple(2**k for k in range(4, 14)) and s.lrs_per_batch == 5
    assert (s.target_accuracy, s.lr, s.train_examples) == (0.97, 0.3, 49152)
    assert (s.target_split, s.validation_examples) == ("validation", 10000)
    assert s.tag == "mnist-sgd-constant-t97-val10000" and s.prunable
    old = script.StudySettings(target_split="test", platforms=("cpu",))  # the README's tables
    assert (old.train_examples, old.tag) == (57344, "mnist-sgd-constant-t97")
    q = script.StudySettings(quick=True, optimizer="momentum", platforms=("cpu",))
    assert q.batches == (32, 128, 512, 2048) and q.target_accuracy == 0.95 and q.lr == 0.03
    assert q.name == "mnist-momentum-constant-t95-val10000-quick"
    cos = script.StudySettings(lr_schedule="warmup_cosine", warmup_epochs=1, max_epochs=5,
                               target_accuracy=0.98, platforms=("cpu",),
                               target_split="test")  # fmt: skip
    assert not cos.prunable and cos.tag == "mnist-sgd-warmup_cosine-t98-w1-e5"
    with pytest.raises(bpjax.ConfigError, match="--batches"):
        script.StudySettings(batches=(1, 64), platforms=("cpu",))
    assert script.finished({"status": "budget", "budget_epochs": 3}, 3)
    assert not script.finished({"status": "budget", "budget_epochs": 3}, 4)  # a bigger budget
    assert script.finished({"status": "diverged", "budget_epochs": 1}, 9)
    assert not script.finished(None, 1)


# ------------------------------------------------------------------ refusals and damage


def test_settings_refuse_a_batch_larger_than_the_training_examples(script):
    with pytest.raises(bpjax.ConfigError) as e:
        script.StudySettings(batches=(64, 512), train_examples=256, platforms=("cpu",))
    assert str(e.value) == ("--batches: 512 is larger than --train_examples=256: an epoch would"
                            " have no step")  # fmt: skip
    with pytest.raises(bpjax.ConfigError, match="is more than the 60000 training images"):
        script.StudySettings(train_examples=60001, platforms=("cpu",), target_split="test")
    with pytest.raises(bpjax.ConfigError, match="more than the 50000 training images left"):
        script.StudySettings(train_examples=50001, platforms=("cpu",))
    assert script.StudySettings(batches=(256,), train_examples=256, platforms=("cpu",))


def _complete_record(**changes):
    """A trial.json as run_trial writes it."""
    record = {"platform": "cpu", "batch": 64, "lr": 0.3, "status": "budget", "lr_index": 0,
              "lr_centre": 0.3, "pruned": False, "budget_epochs": 3, "steps_per_epoch": 16,
              "eval_every_steps": 4, "target_step": None, "target_epoch": None,
              "target_examples": None, "target_train_s": None, "target_elapsed_s": None,
              "compile_s": 1.5, "final_step": 48, "final_epoch": 3.0,
              "best_test_accuracy": 0.9, "b_simple": 120.0, "b_simple_median": 100.0,
              "wall_s": 4.0, "load_average": 1.2, "reason": "", "workdir": "runs/x"}  # fmt: skip
    return {**record, **changes}


def test_a_damaged_trial_record_is_no_finished_trial(script, tmp_path, capsys):
    """A torn, incomplete, mistyped or foreign trial.json: a warning, and the trial is not
    finished (it runs again); never a crash."""
    trial = tmp_path / "trial.json"
    good = _complete_record()
    trial.write_text(json.dumps(good))
    assert script.recorded(str(tmp_path)) == good
    assert script.finished(good, 3)
    text = json.dumps(good, indent=1)
    damaged = {
        "torn": text[: len(text) // 2],
        "empty": "",
        "not utf-8": "\udcff",
        "a list": "[1, 2]",
        "incomplete": json.dumps({k: v for k, v in good.items() if k != "budget_epochs"}),
        "a string number": json.dumps({**good, "budget_epochs": "3"}),
        "a bool": json.dumps({**good, "batch": True}),
        "unknown status": json.dumps({**good, "status": "running"}),
        "a hit without its step": json.dumps({**good, "status": "reached"}),
        "another batch": json.dumps({**good, "batch": 128}),
        "another lr": json.dumps({**good, "lr": 0.6}),
    }
    capsys.readouterr()
    for what, content in damaged.items():
        if what == "not utf-8":
            trial.write_bytes(b"\xff\xfe{")
        else:
            trial.write_text(content)
        expected = {"batch": 64, "lr": 0.3} if what.startswith("another") else {}
        assert script.recorded(str(tmp_path), **expected) is None, what
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"warning: {trial} is ") and "\n" not in err, (what, err)
        assert err.endswith(": running the trial again"), (what, err)
        assert not script.finished(None, 1)
    trial.write_text(json.dumps(good))
    lr = 0.1 * 3  # 0.30000000000000004: the same lr as far as a record is concerned
    assert script.recorded(str(tmp_path), platform="cpu", batch=64, lr=lr) == good
    assert script.recorded(str(tmp_path / "absent")) is None
    assert capsys.readouterr().err == ""  # no record yet is no warning


def _toy_dataset(n_train=96, n_test=32, d=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(10, d)).astype(np.float32) * 2
    y = rng.integers(0, 10, n_train + n_test).astype(np.int32)
    x = (centers[y] + rng.normal(size=(n_train + n_test, d))).astype(np.float32)
    return bpjax.Dataset("mnist", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10)


def test_a_torn_trial_record_reruns_that_trial_to_the_same_outcome(script, tmp_path, capsys,
                                                                     monkeypatch):  # fmt: skip
    """The trial resumes its finished workdir: the same outcome, a complete trial.json again."""
    small = script.trial_config  # the study's trials with a small hidden layer: a fast test
    monkeypatch.setattr(script, "trial_config",
                        lambda *a, **k: dataclasses.replace(small(*a, **k), hidden=(16,)))
    s = script.StudySettings(batches=(16,), lrs_per_batch=1, train_examples=64, max_epochs=1,
                             evals_per_epoch=2, target_accuracy=0.99, platforms=("cpu",),
                             validation_examples=16,
                             runs_dir=str(tmp_path / "runs"))  # fmt: skip
    grid, data = script.study_grid(s)[0], _toy_dataset()

    def run():
        (record,) = script.batch_trials(s, "cpu", grid, data, script.Progress(1))
        return record, capsys.readouterr()

    first, _ = run()
    trial = pathlib.Path(first["workdir"]) / "trial.json"
    text = trial.read_text()
    trial.write_text(text[: len(text) // 3])  # a crash mid-write
    again, out = run()
    assert "finished before" not in out.out and "running the trial again" in out.err
    same = ("status", "target_step", "final_step", "final_epoch", "best_test_accuracy")
    assert {k: again[k] for k in same} == {k: first[k] for k in same}
    assert json.loads(trial.read_text()) == again  # complete again
    _, out = run()
    assert "(finished before)" in out.out and out.err == ""


# ------------------------------------------------------------------ end to end


def _study(tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    return run_script("batch_study", "--batches=64,256", "--lrs_per_batch=2",
                      "--train_examples=1024", "--target_accuracy=0.6", "--max_epochs=3",
                      "--platforms=cpu", f"--out_dir={tmp_path / 'out'}",
                      f"--runs_dir={tmp_path / 'runs'}", timeout=300)  # fmt: skip


@pytest.mark.slow
def test_script_end_to_end_writes_files_and_skips_finished_trials(tmp_path):
    first = _study(tmp_path)
    lines = [line for line in first.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 4 and "ETA" in lines[0] and "finished before" not in first.stdout
    name = "mnist-sgd-constant-t60-val10000-n1024"  # targets on the validation hold-out
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {
        f"{name}{end}" for end in (".json", ".csv", "_steps.png", "_seconds.png", "_b_simple.png")
    }  # fmt: skip
    with open(out / f"{name}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["batch"]), float(r["lr"])) for r in rows) == [
        (64, pytest.approx(0.15)), (64, pytest.approx(0.3)), (256, pytest.approx(0.3)),
        (256, pytest.approx(0.6))]  # fmt: skip
    assert all(r["status"] in ("reached", "budget", "diverged") for r in rows)
    assert all(r["target_split"] == "validation" for r in rows)
    first = {r["batch"]: r for r in rows if r["pruned"] == "False"}  # the grid's centre
    pruned = [r for r in rows if r["pruned"] == "True"]  # cut to the epochs of its hit
    assert len(first) == 2 and len(pruned) == 2, rows
    for r in pruned:
        hit = first[r["batch"]]
        assert int(r["budget_epochs"]) == math.ceil(
            int(hit["target_step"]) / int(hit["steps_per_epoch"])) < 3  # fmt: skip
    record = json.loads((out / f"{name}.json").read_text())
    assert len(record["rows"]) == 4 and record["meta"]["device"]["platform"] == "cpu"
    assert [g["batch"] for g in record["grid"]] == [64, 256] and record["devices"]["cpu"]
    assert {r["batch"] for r in record["batches"]} == {64, 256}
    hit = [r for r in record["rows"] if r["status"] == "reached"]
    assert hit and all(r["target_step"] > 0 and r["b_simple"] for r in hit)

    trial = pathlib.Path(record["rows"][0]["workdir"]) / "trial.json"
    before = (trial.read_bytes(), trial.stat().st_mtime_ns)
    second = _study(tmp_path)
    assert second.stdout.count("(finished before)") == 4, second.stdout
    assert (trial.read_bytes(), trial.stat().st_mtime_ns) == before  # not run again
    again = json.loads((out / f"{name}.json").read_text())
    assert again["rows"] == record["rows"]
