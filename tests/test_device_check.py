"""The accelerator check runs end to end on this CPU with tiny settings (``--smoke``).

GPU minutes are scarce: the exact command run on a lent GPU must be known to work
before. Every stage runs here in its own process, as it will there, and writes its
files; a stage that fails makes the script exit non-zero. A stage it does not know is
refused up front, in one line.
"""

from __future__ import annotations

import json

import pytest
from script_loader import one_error_line, run_script


@pytest.mark.slow
def test_device_check_smoke_runs_every_stage_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    done = run_script("device_check", "--platform=cpu", "--smoke", f"--out_dir={out}",
                      timeout=900, check=False)  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert done.returncode == 0, json.dumps(stages, indent=1)
    expected = {"env", "tests", "train", "bench_grad", "sweep_f32", "sweep_bf16", "study"}
    assert set(stages) == expected and all(s["status"] == "ok" for s in stages.values())
    env = json.loads((out / "env.json").read_text())
    assert env["platform"] == "cpu" and env["jax_version"]
    for path in ("bench_grad.json", "sweep_f32/batch_sweep.csv", "sweep_bf16/batch_sweep.json",
                 "train_run/metrics.jsonl", "tests.log"):  # fmt: skip
        assert (out / path).exists(), path
    bf16 = json.loads((out / "sweep_bf16" / "batch_sweep.json").read_text())
    assert {r["dtype"] for r in bf16["rows"]} == {"bfloat16"}
    assert done.stdout.strip().splitlines()[-1] == f"results in {out}"


def test_an_unknown_stage_is_one_line_before_any_work(tmp_path):
    out = tmp_path / "check"
    done = run_script("device_check", "--platform=cpu", "--stages=envx", f"--out_dir={out}",
                      timeout=120, check=False)  # fmt: skip
    line = one_error_line(done)
    assert line.startswith("error: --stages='envx': 'envx' is not one of: env, tests,"), line
    assert done.stdout == "" and not out.exists()  # no stage ran, no folder was made


@pytest.mark.parametrize("refused", ["no stage", "out_dir a file"])
def test_no_stage_or_an_out_dir_that_is_a_file_is_one_line_before_any_work(tmp_path, refused):
    """``--stages=`` would run nothing and report success; a file as --out_dir would crash
    in makedirs. Both are refused in one line, before any stage runs."""
    a_file = tmp_path / "a_file"
    a_file.write_text("a regular file")
    out = a_file if refused == "out_dir a file" else tmp_path / "check"
    stages = "--stages=env" if refused == "out_dir a file" else "--stages="
    done = run_script("device_check", "--platform=cpu", stages, f"--out_dir={out}",
                      timeout=120, check=False)  # fmt: skip
    line = one_error_line(done)
    expected = (f"error: --out_dir={a_file}: {a_file} is a file, not a directory: choose a folder"
                if refused == "out_dir a file" else
                "error: --stages='': empty is not one of: env, tests, train, bench_grad, "
                "sweep_f32, sweep_bf16, study")  # fmt: skip
    assert line == expected
    assert done.stdout == "" and a_file.read_text() == "a regular file"
    assert not (tmp_path / "check").exists()
