"""experiments/feedback_rules.py: its pure summaries, its plan of runs, and the script end to end.

The unit tests load the script as a module with its absl flags defined on a private
``FlagValues`` (so nothing lands on the global ``FLAGS`` a later test might define);
the end-to-end test runs it as a user does, in a subprocess on a slice of real MNIST.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import statistics
import subprocess

import pytest
from script_loader import run_script, script_fixture

import bpjax

study = script_fixture("feedback_rules", defines="protocol", absent="protocol")


# ------------------------------------------------------------------ pure summaries


def test_spread_is_mean_sample_std_min_max(study):
    s = study.spread([97.0, 98.0, 99.5])
    assert s["n"] == 3 and s["min"] == 97.0 and s["max"] == 99.5
    assert math.isclose(s["mean"], 98.166666666666, rel_tol=1e-12)
    assert math.isclose(s["std"], statistics.stdev([97.0, 98.0, 99.5]), rel_tol=1e-12)  # ddof=1
    assert study.spread([98.0]) == {"n": 1, "mean": 98.0, "std": None, "min": 98.0, "max": 98.0}
    assert study.spread([])["mean"] is None


def _run(rule, seed, accs, angles=None, status="trained"):
    history = []
    for epoch, acc in enumerate(accs, 1):
        m = {"epoch": epoch, "test_accuracy": acc, "elapsed_s": 2.0 * epoch}
        if angles is not None:
            m.update(alignment_deg=[angles[epoch - 1]], delta_deg=[angles[epoch - 1] + 1])
        history.append(m)
    return {"rule": rule, "seed": seed, "lr": 0.1, "status": status, "wall_s": 1.0,
            "reason": "", "history": history}  # fmt: skip


def test_summarize_and_floors(study):
    runs = [
        _run("bp", 0, [0.97, 0.980]), _run("bp", 1, [0.97, 0.982]),
        _run("fa", 0, [0.95, 0.968], [60.0, 50.0]), _run("fa", 1, [0.95, 0.969], [62.0, 54.0]),
        _run("kp", 0, [0.96, 0.979], [40.0, 20.0]),
        _run("kp", 1, [0.5], [80.0], status="stopped"),  # cut short: not a final number
    ]  # fmt: skip
    rows = {r["rule"]: r for r in study.summarize(runs, epochs=2)}
    assert rows["bp"]["seeds"] == 2 and "alignment_deg_l1_mean" not in rows["bp"]
    assert math.isclose(rows["bp"]["test_accuracy_mean"], 98.1, rel_tol=1e-9)
    assert math.isclose(rows["fa"]["alignment_deg_l1_mean"], 52.0)
    assert math.isclose(rows["fa"]["delta_deg_l1_mean"], 53.0)
    assert rows["kp"]["seeds"] == 1 and rows["kp"]["runs_stopped"] == 1
    assert rows["kp"]["test_accuracy_std"] is None and rows["kp"]["run_s_mean"] == 4.0
    curves = study.curves(runs, "alignment_deg")
    assert set(curves) == {"fa", "kp"} and curves["kp"].shape == (2, 2)
    assert math.isnan(curves["kp"][1, 1])  # the stopped run, padded

    s = study.StudySettings(rules=("bp", "fa", "kp"))
    checked = study.floors(list(rows.values()), s)
    assert checked["applies"] and "dfa_at_least_97" not in checked  # dfa did not run
    assert not checked["fa_at_least_97"]["held"]  # 96.85%
    kp = checked["kp_within_0.3_of_bp"]
    assert math.isclose(kp["bp_minus_kp"], 0.2, abs_tol=1e-9) and kp["held"]
    assert study.floors(list(rows.values()), study.StudySettings(quick=True)) == {"applies": False}
    lines = study.floor_lines(checked)
    assert any("MISSED" in line for line in lines), lines


def test_the_plan_of_runs(study):
    default = study.study_configs(study.StudySettings(runs_dir="r"))
    assert [(c.feedback, c.seed) for c in default[:4]] == [("bp", 0), ("bp", 1), ("bp", 2),
                                                           ("fa", 0)]  # fmt: skip
    assert len(default) == 15 and len({c.workdir for c in default}) == 15
    assert all(c.lr == 0.1 and c.epochs == 20 and c.activation == "relu" and c.resume
               and c.hidden == (500,) and c.batch == 128 and c.optimizer == "sgd"
               for c in default)  # fmt: skip
    assert default[0].workdir == os.path.join("r", "default-mnist", "bp-seed0")

    akrout = study.study_configs(study.StudySettings(protocol="akrout", seeds=(7,)))
    assert {c.feedback: c.lr for c in akrout} == {"bp": 0.2, "fa": 0.2, "kp": 0.3}
    assert all(c.activation == "sigmoid" and c.loss == "sigmoid_cross_entropy"
               and c.epochs == 400 and c.kp_decay == 0 and c.seed == 7 for c in akrout)  # fmt: skip

    quick = study.StudySettings(quick=True, dataset="fashion_mnist")
    assert (quick.epochs, quick.train_examples, quick.seeds) == (5, 6000, (0,))
    assert quick.tag == "default-fashion_mnist-n6000"
    with pytest.raises(bpjax.ConfigError, match="--rules"):
        study.StudySettings(rules=("bp", "magic"))


# ------------------------------------------------------------------ end to end


def _script(tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    return run_script("feedback_rules", "--rules=bp,fa", "--seeds=3", "--epochs=2",
                      "--train_examples=2000", f"--out={tmp_path / 'out'}",
                      f"--runs_dir={tmp_path / 'runs'}", timeout=300)  # fmt: skip


@pytest.mark.slow
def test_script_end_to_end_writes_records_and_skips_finished_runs(tmp_path):
    first = _script(tmp_path)
    assert first.stdout.count(": trained ") == 2, first.stdout
    out = tmp_path / "out"
    tag = "default-mnist-n2000"
    names = {f"{tag}.json", f"{tag}.csv", f"{tag}_summary.csv", f"{tag}_accuracy.png",
             f"{tag}_alignment.png"}  # fmt: skip
    assert {p.name for p in out.iterdir()} == names
    assert all((out / n).stat().st_size > 0 for n in names)

    with open(out / f"{tag}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["rule"], r["seed"], r["epoch"]) for r in rows] == [
        ("bp", "3", "1"), ("bp", "3", "2"), ("fa", "3", "1"), ("fa", "3", "2")]  # fmt: skip
    assert rows[0]["alignment_deg_l1"] == "" and 0 < float(rows[3]["alignment_deg_l1"]) < 180
    with open(out / f"{tag}_summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [r["rule"] for r in summary] == ["bp", "fa"]
    assert 50 < float(summary[1]["test_accuracy_mean"]) <= 100

    record = json.loads((out / f"{tag}.json").read_text())
    assert {(r["rule"], r["seed"]) for r in record["runs"]} == {("bp", 3), ("fa", 3)}
    assert [r["rule"] for r in record["rows"]] == ["bp", "fa"]
    assert record["meta"]["config"]["rules"] == ["bp", "fa"] and record["meta"]["device"]
    assert all(len(r["history"]) == 2 for r in record["runs"])
    run = bpjax.load_run(record["runs"][1]["workdir"])  # each run is an ordinary record
    assert run.config.feedback == "fa" and run.epoch == 2 and len(run.metrics) == 2

    metrics = pathlib.Path(record["runs"][0]["workdir"]) / "metrics.jsonl"
    before = (metrics.read_bytes(), metrics.stat().st_mtime_ns)
    second = _script(tmp_path)
    assert second.stdout.count(": finished before ") == 2 and ": trained " not in second.stdout
    assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == before  # not run again
    again = json.loads((out / f"{tag}.json").read_text())
    assert [r["history"] for r in again["runs"]] == [r["history"] for r in record["runs"]]
