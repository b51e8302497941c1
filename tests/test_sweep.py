"""The batch sweep (``bpjax.sweep``) and its NumPy baseline; no timing assertions.

One tiny sweep (sizes (16, 8, 4), batches (1, 4), two repeats, CPU) is run
once for the module and then inspected: it writes JSON, CSV and PNG, every row
has every field, each (method, batch) compiled exactly once. The NumPy
baseline, which follows the first document's code, is checked against
``bpjax.manual_grad`` in float64: it is timed beside the JAX methods, so it
must compute the same gradient.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax
from bpjax.methods import METHODS
from bpjax.sweep import (
    ROW_FIELDS,
    SweepConfig,
    floor_report,
    format_table,
    numpy_grads,
    run_sweep,
    step_flops,
    sweep_metadata,
    torch_available,
    write_results,
)

TINY = SweepConfig(
    sizes=(16, 8, 4),
    batches=(1, 4),
    repeats=2,
    warmup=1,
    min_time_s=0.0,
    platforms=("cpu",),
    matmul_max_n=512,
    include_torch=False,
    max_batch_per_method={"per_sample": 1},
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("sweep"))
    config = dataclasses.replace(TINY, out_dir=out_dir)
    rows = run_sweep(config, log=None)
    paths = write_results(rows, sweep_metadata(config), out_dir)
    return config, rows, paths


def test_sweep_rows_cover_every_configuration(sweep):
    config, rows, _ = sweep
    got = {(r["method"], r["batch"]) for r in rows}
    assert got == {(m, b) for m in (*METHODS, "numpy") for b in config.batches}
    for r in rows:
        assert set(r) == set(ROW_FIELDS), r["method"]
        assert r["platform"] == "cpu" and r["sizes"] == "16-8-4" and r["dtype"] == "float32"


def test_sweep_ok_rows_have_measurements(sweep):
    config, rows, _ = sweep
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(rows) - 1  # per_sample at batch 4 is over its max batch
    for r in ok:
        assert r["median_s"] > 0 and r["p10_s"] <= r["median_s"] <= r["p90_s"]
        assert r["repeats"] >= config.repeats
        assert r["samples_per_s"] == pytest.approx(r["batch"] / r["median_s"])
        assert r["flops_per_step"] == step_flops(config.sizes, r["batch"])
        assert r["roofline_s"] > 0 and r["frac_of_roofline"] > 0
        assert r["matmul_peak_gflops"] > 0 and r["frac_of_matmul_peak"] > 0
        assert r["ratio_to_autodiff"] > 0
    assert all(r["ratio_to_autodiff"] == 1.0 for r in ok if r["method"] == "autodiff")
    assert all(r["paired_ratio_to_autodiff"] == 1.0 for r in ok if r["method"] == "autodiff")
    assert all(r["paired_ratio_to_autodiff"] > 0 for r in ok if r["method"] in METHODS)


def test_sweep_records_skipped_rows_with_reason(sweep):
    _, rows, _ = sweep
    (skipped,) = [r for r in rows if r["status"] == "skipped"]
    assert (skipped["method"], skipped["batch"]) == ("per_sample", 4)
    assert "max_batch_per_method" in skipped["reason"] and skipped["median_s"] is None


def test_sweep_compiles_each_method_and_batch_once(sweep):
    _, rows, _ = sweep
    for r in rows:
        if r["status"] == "ok" and r["method"] in METHODS:
            assert (r["n_compiles"], r["n_traces"]) == (1, 1), (r["method"], r["batch"])


def test_sweep_writes_json_csv_png(sweep):
    config, rows, paths = sweep
    with open(paths["json"]) as f:
        payload = json.load(f)
    assert len(payload["rows"]) == len(rows)
    device = payload["meta"]["devices"]["cpu"]
    for key in ("device_kind", "jax_version", "jaxlib_version", "XLA_FLAGS", "cpu_count", "date"):
        assert key in device
    assert payload["meta"]["config"]["sizes"] == list(config.sizes)
    with open(paths["csv"]) as f:
        lines = [ln for ln in f if not ln.startswith("#")]
    table = list(csv.DictReader(lines))
    assert len(table) == len(rows) and tuple(table[0]) == ROW_FIELDS
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(config.out_dir) if n.endswith(".tmp")]
    assert "manual" in format_table(rows)
    assert any("autodiff" in line for line in floor_report(rows))


def test_numpy_baseline_gradient_equals_manual_grad_float64():
    rng = np.random.default_rng(0)
    sizes, m = (7, 6, 5, 4), 9  # three layers: the e_l recursion runs twice
    with jax.enable_x64(True):
        params = bpjax.init_params(jax.random.PRNGKey(1), sizes, jnp.float64)
        x = rng.standard_normal((m, sizes[0]))
        y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], m)]
        expected = bpjax.manual_grad(params, jnp.asarray(x), jnp.asarray(y))
        cols = [(np.asarray(p["W"]), np.asarray(p["b"])[:, None]) for p in params]
        got, probs = numpy_grads(cols, x.T.copy(), y.T.copy())
    assert probs.shape == (sizes[-1], m)

    def check(grads):
        for l, ((dw, db), e) in enumerate(zip(grads, expected, strict=True)):
            np.testing.assert_allclose(dw, e["W"], rtol=1e-10, atol=1e-12, err_msg=f"W{l}")
            np.testing.assert_allclose(db[:, 0], e["b"], rtol=1e-10, atol=1e-12, err_msg=f"b{l}")

    check(got)
    # Negative control: a 1% error planted in one leaf fails the same check.
    planted = [(dw, db) for dw, db in got]
    planted[1] = (got[1][0], got[1][1] * 1.01)
    with pytest.raises(AssertionError, match="b1"):
        check(planted)


def test_torch_peer_step_matches_manual_sgd_step():
    # torch is in the dev extra: a missing torch fails here instead of skipping.
    assert torch_available(), "torch is missing: pip install -e '.[dev]' installs torch==2.13.0"
    from bpjax.sweep import make_torch_step

    rng = np.random.default_rng(2)
    sizes, m, lr = (5, 4, 3), 6, 0.1
    params = [{k: np.asarray(v, np.float32) for k, v in p.items()}
              for p in bpjax.init_params(jax.random.PRNGKey(3), sizes)]  # fmt: skip
    x = rng.standard_normal((m, sizes[0])).astype(np.float32)
    y = np.eye(sizes[-1], dtype=np.float32)[rng.integers(0, sizes[-1], m)]
    step = make_torch_step(params, x, y, lr)
    step()
    g = bpjax.manual_grad([{k: jnp.asarray(v) for k, v in p.items()} for p in params], x, y)
    for l, (W, b) in enumerate(step.params):
        np.testing.assert_allclose(W.detach().numpy(), params[l]["W"] - lr * np.asarray(g[l]["W"]),
                                   rtol=1e-5, atol=1e-6, err_msg=f"W{l}")  # fmt: skip
        np.testing.assert_allclose(b.detach().numpy(), params[l]["b"] - lr * np.asarray(g[l]["b"]),
                                   rtol=1e-5, atol=1e-6, err_msg=f"b{l}")  # fmt: skip


def test_config_validates():
    with pytest.raises(ValueError, match="unknown methods"):
        SweepConfig(methods=("manual", "nope"))
    with pytest.raises(ValueError, match="platforms"):
        SweepConfig(platforms=("quantum",))
    with pytest.raises(ValueError, match="batches must not repeat"):
        SweepConfig(batches=(4, 4))
    with pytest.raises(ValueError, match="isolate"):
        SweepConfig(isolate="sometimes")
    hash(TINY)  # frozen and hashable, dicts turned into tuples
    assert TINY.max_batch("per_sample") == 1 and TINY.max_batch("manual") is None


@pytest.mark.slow
def test_isolated_configuration_runs_in_its_own_process(tmp_path):
    config = dataclasses.replace(TINY, batches=(2,), methods=("manual",), include_numpy=False,
                                 isolate="always", out_dir=str(tmp_path))  # fmt: skip
    (row,) = run_sweep(config, log=None)
    assert row["status"] == "ok", row["reason"]
    assert (row["n_compiles"], row["n_traces"]) == (1, 1)
    assert row["peak_memory_bytes"] is None  # the CPU client reports no allocator peak


@pytest.mark.slow
def test_script_sweeps_device_counts_data_parallel(tmp_path):
    """experiments/batch_sweep.py end to end on 2 simulated CPU devices."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    args = ["--device_counts=1,2", "--methods=manual,autodiff", "--batches=3,8",
            "--sizes=16,8,4", "--numpy=false", "--torch=false", "--repeats=2",
            "--min_time_s=0", "--platforms=cpu", f"--out_dir={tmp_path}"]  # fmt: skip
    script = os.path.join(root, "experiments", "batch_sweep.py")
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                            env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "manual on 2 devices, samples/s vs 1 device" in result.stdout
    with open(tmp_path / "batch_sweep.json") as f:
        rows = json.load(f)["rows"]
    got = {(r["method"], r["batch"], r["num_devices"]): r for r in rows}
    assert set(got) == {(m, b, d) for m in ("manual", "autodiff") for b in (3, 8) for d in (1, 2)}
    for m in ("manual", "autodiff"):
        assert got[(m, 3, 2)]["status"] == "skipped"  # 3 rows do not split over 2 devices
        assert "divide" in got[(m, 3, 2)]["reason"]
        for key in ((m, 3, 1), (m, 8, 1), (m, 8, 2)):
            assert got[key]["status"] == "ok", got[key]["reason"]
            assert (got[key]["n_compiles"], got[key]["n_traces"]) == (1, 1)


def test_too_many_devices_is_a_clear_error():
    config = dataclasses.replace(TINY, device_counts=(1, 4096))
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=4096"):
        run_sweep(config, log=None)
