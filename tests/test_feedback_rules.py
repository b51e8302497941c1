"""experiments/feedback_rules.py: its summaries, its plan of runs and names, and studies end to end.

The script is loaded as a module with its absl flags defined on a private ``FlagValues``
(so nothing lands on the global ``FLAGS`` a later test might define); each command line
is parsed into a fresh ``FlagValues`` holding the study's flags and ``Config``'s. The
studies run in this process (``run_study``) on a slice of real MNIST with tiny networks,
from a temporary working directory; one subprocess checks the refusal a user sees.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import statistics

import pandas as pd
import pytest
from absl import flags
from script_loader import REPO, one_error_line, run_script, script_fixture

import bpjax
from bpjax import cli

study = script_fixture("feedback_rules", defines="protocol", absent="protocol")
COMMITTED = REPO / "experiments" / "results" / "feedback_rules"


def parse(study, *args: str):
    """``StudySettings`` from a command line, as ``main`` builds it."""
    fv = flags.FlagValues()
    cli.define_flags(study.StudyFlags, flag_values=fv)
    cli.define_flags(bpjax.Config, flag_values=fv)
    fv(["feedback_rules.py", *args])
    return study.settings_from_flags(fv)


# ------------------------------------------------------------------ pure summaries


def test_spread_is_mean_sample_std_min_max(study):
    s = study.spread([97.0, 98.0, 99.5])
    assert s["n"] == 3 and s["min"] == 97.0 and s["max"] == 99.5
    assert math.isclose(s["mean"], 98.166666666666, rel_tol=1e-12)
    assert math.isclose(s["std"], statistics.stdev([97.0, 98.0, 99.5]), rel_tol=1e-12)  # ddof=1
    assert study.spread([98.0]) == {"n": 1, "mean": 98.0, "std": None, "min": 98.0, "max": 98.0}
    assert study.spread([])["mean"] is None


def _run(rule, seed, accs, angles=None, status="trained", reason="", loss=0.1):
    history = []
    for epoch, acc in enumerate(accs, 1):
        m = {"epoch": epoch, "test_accuracy": acc, "test_loss": loss, "elapsed_s": 2.0 * epoch}
        if angles is not None:
            m.update(alignment_deg=[angles[epoch - 1]], delta_deg=[angles[epoch - 1] + 1])
        history.append(m)
    return {"rule": rule, "seed": seed, "lr": 0.1, "status": status, "wall_s": 1.0,
            "reason": reason, "history": history}  # fmt: skip


def test_summarize_and_floors(study):
    runs = [
        _run("bp", 0, [0.97, 0.980]), _run("bp", 1, [0.97, 0.982]),
        _run("fa", 0, [0.95, 0.968], [60.0, 50.0]), _run("fa", 1, [0.95, 0.969], [62.0, 54.0]),
        _run("kp", 0, [0.96, 0.979], [40.0, 20.0]),
        _run("kp", 1, [0.5], [80.0], status="stopped",
             reason="out of memory: an allocation did not fit"),  # cut short: no final number
    ]  # fmt: skip
    rows = {r["rule"]: r for r in study.summarize(runs, epochs=2, chance=0.1)}
    assert rows["bp"]["seeds"] == 2 and "alignment_deg_l1_mean" not in rows["bp"]
    assert rows["bp"]["outcome"] == "ok" and rows["bp"]["collapsed"] == 0
    assert math.isclose(rows["bp"]["test_accuracy_mean"], 98.1, rel_tol=1e-9)
    assert math.isclose(rows["fa"]["alignment_deg_l1_mean"], 52.0)
    assert math.isclose(rows["fa"]["delta_deg_l1_mean"], 53.0)
    assert rows["kp"]["seeds"] == 1 and rows["kp"]["stopped"] == 1 and rows["kp"]["runs"] == 2
    assert rows["kp"]["outcome"] == "stopped 1/2"
    assert rows["kp"]["test_accuracy_std"] is None and rows["kp"]["run_s_mean"] == 4.0
    curves = study.curves(runs, "alignment_deg")
    assert set(curves) == {"fa", "kp"} and curves["kp"][1].shape == (2, 2)
    assert list(curves["kp"][0]) == [1.0, 2.0] and math.isnan(curves["kp"][1][1, 1])  # padded

    s = study.StudySettings(rules=("bp", "fa", "kp"))
    checked = study.floors(list(rows.values()), s)
    assert checked["applies"] and "dfa_at_least_97" not in checked  # dfa did not run
    assert not checked["fa_at_least_97"]["held"]  # 96.85%
    kp = checked["kp_within_0.3_of_bp"]
    assert math.isclose(kp["bp_minus_kp"], 0.2, abs_tol=1e-9) and kp["held"]
    for other in (study.StudySettings(quick=True),
                  study.StudySettings(overrides={"hidden": (256,) * 5})):  # fmt: skip
        assert study.floors(list(rows.values()), other) == {"applies": False}
    lines = study.floor_lines(checked)
    assert any("MISSED" in line for line in lines), lines


def test_collapsed_and_diverged_runs_are_named_not_averaged(study):
    runs = [
        _run("fa", 0, [0.5, 0.0980]), _run("fa", 1, [0.3, 0.1135]),  # chance on 10 classes
        _run("dfa", 0, [0.9, 0.95]), _run("dfa", 1, [0.9, 0.101]),  # one seed of two collapsed
        _run("sign", 0, [0.6], status="stopped", reason="the loss became nan at epoch 2"),
        _run("kp", 0, [0.9, 0.11], loss=float("inf")),  # finished with a non-finite test loss
        _run("bp", 0, [0.9, 0.20]),  # poor, but above chance + 10% of the way: it learned
    ]  # fmt: skip
    rows = {r["rule"]: r for r in study.summarize(runs, epochs=2, chance=0.1)}
    assert rows["fa"]["outcome"] == "collapsed" and rows["fa"]["collapsed"] == 2
    assert rows["fa"]["seeds"] == 0 and rows["fa"]["test_accuracy_mean"] is None
    assert rows["dfa"]["outcome"] == "collapsed 1/2" and rows["dfa"]["seeds"] == 1
    assert math.isclose(rows["dfa"]["test_accuracy_mean"], 95.0)  # the collapsed seed left out
    assert rows["sign"]["outcome"] == "diverged" and rows["kp"]["outcome"] == "diverged"
    assert rows["bp"]["outcome"] == "ok"

    settings = study.StudySettings(rules=("fa", "dfa", "sign", "kp", "bp"))
    table = {line.split("|")[1].strip(): line.split("|")[4].strip()
             for line in study.markdown(list(rows.values()), settings).splitlines()
             if line.startswith("| ") and not line.startswith("| rule")}  # fmt: skip
    assert table == {"fa": "collapsed", "dfa": "95.00 (collapsed 1/2)", "sign": "diverged",
                     "kp": "diverged", "bp": "20.00"}  # fmt: skip
    assert "sign is the unscaled form" in study.markdown(list(rows.values()), settings)
    printed = study.report(list(rows.values()), runs, settings)
    assert " collapsed " in printed.splitlines()[2], printed  # the fa row says so


# ------------------------------------------------------------------ the plan, the names


def test_the_plan_of_runs(study):
    default = study.study_configs(study.StudySettings(runs_dir="r"))
    rules = study.known_rules()
    assert {"bp", "fa", "dfa", "sign", "kp"} <= set(rules)
    first = [(c.feedback, c.seed) for c in default[:4]]
    assert first == [(rules[0], 0), (rules[0], 1), (rules[0], 2), (rules[1], 0)]
    assert len(default) == 3 * len(rules) == len({c.workdir for c in default})
    assert all(c.lr == 0.1 and c.epochs == 20 and c.activation == "relu" and c.resume
               and c.hidden == (500,) and c.batch == 128 and c.optimizer == "sgd"
               for c in default)  # fmt: skip
    assert default[0].workdir == os.path.join("r", "default-mnist", f"{rules[0]}-seed0")

    akrout = study.study_configs(study.StudySettings(protocol="akrout", seeds=(7,)))
    assert {c.feedback: c.lr for c in akrout} == {"bp": 0.2, "fa": 0.2, "kp": 0.3}
    assert all(c.activation == "sigmoid" and c.loss == "sigmoid_cross_entropy"
               and c.epochs == 400 and c.kp_decay == 0 and c.seed == 7 for c in akrout)  # fmt: skip
    one_lr = study.StudySettings(protocol="akrout", overrides={"lr": 0.2})
    assert {c.lr for c in study.study_configs(one_lr)} == {0.2}  # --lr sets every rule's
    assert one_lr.tag == "akrout-mnist-lr0.2"  # though it equals bp's and fa's protocol lr

    quick = study.StudySettings(quick=True, overrides={"dataset": "fashion_mnist"})
    assert (quick.base.epochs, quick.base.train_examples, quick.seeds) == (5, 6000, (0,))
    assert quick.tag == "default-fashion_mnist-n6000-e5"  # apart from the full study's files
    assert quick.run_tag == "default-fashion_mnist-n6000"
    with pytest.raises(bpjax.ConfigError, match="--rules"):
        study.StudySettings(rules=("bp", "magic"))
    for owned in ("feedback", "seed", "workdir", "resume"):
        with pytest.raises(bpjax.ConfigError, match=f"--{owned} is not for this study"):
            study.StudySettings(overrides={owned: "fa" if owned == "feedback" else 1})
    with pytest.raises(bpjax.ConfigError, match="needs classes"):
        study.StudySettings(overrides={"dataset": "regression", "loss": "squared_error"})


def test_the_names_say_what_differs_from_the_protocol(study):
    deep = study.StudySettings(overrides={"hidden": [256] * 5, "activation": "tanh"})
    assert deep.tag == deep.run_tag == "default-mnist-h256x5-tanh"
    assert all(c.hidden == (256,) * 5 and c.activation == "tanh"
               for c in study.study_configs(deep))  # fmt: skip
    same = study.StudySettings(overrides={"hidden": (500,), "epochs": 20, "optimizer": "sgd"})
    assert same.tag == "default-mnist"  # given, but the protocol's own values
    # More epochs extend the same runs (a resume may add epochs) into files of their own...
    longer = study.StudySettings(overrides={"epochs": 30})
    assert (longer.run_tag, longer.tag) == ("default-mnist", "default-mnist-e30")
    # ...except under a cosine schedule, where the epochs change every step's lr.
    cosine = study.StudySettings(overrides={"epochs": 30, "lr_schedule": "cosine"})
    assert cosine.run_tag == cosine.tag == "default-mnist-e30-lr_schedule_cosine"
    mixed = study.StudySettings(overrides={"hidden": (256, 128), "optimizer": "adam",
                                           "lr": 1e-3, "noise_scale": True})  # fmt: skip
    assert mixed.tag == "default-mnist-h256_128-adam-lr0.001-noise_scale"
    assert mixed.run_tag == "default-mnist-h256_128-adam-lr0.001"


def test_command_line_config_flags_override_the_protocol(study):
    s = parse(study, "--hidden=64,64", "--activation=tanh", "--optimizer=momentum",
              "--momentum=0.5", "--rules=bp,fa", "--seeds=4", "--protocol=akrout")  # fmt: skip
    assert dict(s.overrides) == {"hidden": (64, 64), "activation": "tanh",
                                 "optimizer": "momentum", "momentum": 0.5}  # fmt: skip
    assert s.tag == "akrout-mnist-h64x2-tanh-momentum-m0.5-rules_bp+fa-seeds4"
    assert s.run_tag == "akrout-mnist-h64x2-tanh-momentum-m0.5"
    (bp, fa) = study.study_configs(s)
    assert (bp.loss, bp.epochs, bp.lr, fa.lr, fa.seed) == ("sigmoid_cross_entropy", 400, 0.2,
                                                           0.2, 4)  # fmt: skip
    assert parse(study).base.epochs == 20  # the protocol's, not Config's 40
    scaled = parse(study, "--feedback_scale", "--rules=bp,usf,frsf", "--seeds=0")
    assert [c.feedback_scale for c in study.study_configs(scaled)] == [False, True, True]
    assert scaled.run_tag == "default-mnist-feedback_scale"  # bp as it is, usf and frsf scaled
    with pytest.raises(bpjax.ConfigError, match="none of --rules=bp,fa has a scaled form"):
        parse(study, "--feedback_scale", "--rules=bp,fa")
    with pytest.raises(bpjax.ConfigError, match="--feedback is not for this study"):
        parse(study, "--feedback=fa")


def test_a_refused_setting_is_one_line(tmp_path):
    result = run_script("feedback_rules", "--seed=3", f"--out={tmp_path}",
                        f"--runs_dir={tmp_path}", check=False)  # fmt: skip
    assert "--seed is not for this study" in one_error_line(result)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ studies end to end

TINY = ("--seeds=0", "--epochs=1", "--train_examples=1024", "--batch=32", "--dtype=float64")


@pytest.fixture(scope="module")
def studied(study, tmp_path_factory):
    """Two tiny studies with default output, run from an empty working directory, then the
    first again; with the committed results' names and times before and after."""
    cwd = tmp_path_factory.mktemp("cwd")
    committed = lambda: {p.name: p.stat().st_mtime_ns for p in COMMITTED.iterdir()}  # noqa: E731
    before, here = committed(), os.getcwd()
    logs = {}
    deep = parse(study, "--rules=bp,fa", "--hidden=16,16", "--activation=tanh",
                 "--optimizer=adam", "--lr=0.01", *TINY)  # fmt: skip
    # One sigmoid unit: every test image gets the same class, for any weights tiny steps reach.
    flat = parse(study, "--rules=bp", "--hidden=1", "--activation=sigmoid", "--lr=1e-9", *TINY)
    try:
        os.chdir(cwd)
        for name, s in (("deep", deep), ("flat", flat), ("again", deep)):
            logs[name] = []
            study.run_study(s, log=logs[name].append)
    finally:
        os.chdir(here)
    return {"cwd": cwd, "deep": deep, "flat": flat, "logs": logs,
            "committed": (before, committed())}  # fmt: skip


def test_a_study_takes_config_flags_into_every_run(studied):
    out = studied["cwd"] / "runs" / "feedback_rules"
    tag = studied["deep"].tag
    assert tag == "default-mnist-h16x2-tanh-adam-lr0.01-b32-float64-n1024-e1-rules_bp+fa-seeds0"
    record = json.loads((out / f"{tag}.json").read_text())
    assert {(r["rule"], r["seed"]) for r in record["runs"]} == {("bp", 0), ("fa", 0)}
    for r in record["runs"]:
        workdir = pathlib.Path(r["workdir"])
        assert workdir.parent == pathlib.Path("runs/feedback_rules") / studied["deep"].run_tag
        config = json.loads((studied["cwd"] / workdir / "config.json").read_text())
        assert (config["hidden"], config["activation"], config["optimizer"], config["lr"],
                config["dtype"], config["feedback"]) == ([16, 16], "tanh", "adam", 0.01,
                                                         "float64", r["rule"])  # fmt: skip
        run = bpjax.load_run(str(studied["cwd"] / workdir))  # each run is an ordinary record
        assert run.config.hidden == (16, 16) and run.epoch == 1
    assert record["base_config"]["hidden"] == [16, 16]
    with open(out / f"{tag}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["rule"], r["epoch"]) for r in rows] == [("bp", "1"), ("fa", "1")]
    assert rows[0]["alignment_deg_l1"] == "" and 0 < float(rows[1]["alignment_deg_l2"]) < 180
    summary = pd.read_csv(out / f"{tag}_summary.csv")  # plain: no options needed
    assert list(summary["rule"]) == ["bp", "fa"] and list(summary["seeds"]) == [1, 1]
    assert summary["test_accuracy_mean"].between(10, 100).all()
    assert "| fa |" in (out / f"{tag}_summary.md").read_text()
    assert all((out / f"{tag}{end}").stat().st_size > 0
               for end in ("_accuracy.png", "_alignment.png"))  # fmt: skip


def test_default_output_is_under_runs_not_the_committed_results(studied):
    cwd, before_after = studied["cwd"], studied["committed"]
    assert {p.name for p in cwd.iterdir()} == {"runs"}  # nothing else in the working directory
    assert before_after[0] == before_after[1]  # experiments/results/feedback_rules untouched
    names = {p.name for p in (cwd / "runs" / "feedback_rules").iterdir()}
    for s in (studied["deep"], studied["flat"]):
        assert {f"{s.tag}.json", f"{s.tag}_summary.csv", s.run_tag} <= names


def test_a_collapsed_study_says_so(studied):
    out = studied["cwd"] / "runs" / "feedback_rules"
    tag = studied["flat"].tag
    summary = pd.read_csv(out / f"{tag}_summary.csv")
    assert list(summary["outcome"]) == ["collapsed"] and list(summary["collapsed"]) == [1]
    assert summary["test_accuracy_mean"].isna().all()  # no number that looks like a result
    assert "| bp | 1e-09 | 0/1 | collapsed |" in (out / f"{tag}_summary.md").read_text()
    record = json.loads((out / f"{tag}.json").read_text())
    assert [r["outcome"] for r in record["runs"]] == ["collapsed"]
    assert all(r["history"][-1]["test_accuracy"] < 0.19 for r in record["runs"])
    lines = studied["logs"]["flat"]
    assert sum(line.rstrip().endswith("collapsed") for line in lines) == 1, lines


def test_a_second_study_skips_finished_runs(studied):
    first, again = studied["logs"]["deep"], studied["logs"]["again"]
    assert sum(": trained " in line for line in first) == 2, first
    assert sum(": finished before " in line for line in again) == 2, again
    assert not any(": trained " in line for line in again)
