"""The batch sweep (``bpjax.bench``) and its NumPy baseline; no timing assertions.

One tiny sweep (sizes (16, 8, 4), batches (1, 4), two repeats, CPU) is run
once for the module and then inspected: it writes JSON, CSV and PNG, every row
has every field, each (method, batch) compiled exactly once. The NumPy
baseline, which follows the first document's code, is checked against
``bpjax.manual_grad`` in float64: it is timed beside the JAX methods, so it
must compute the same gradient. A bfloat16 sweep is the training loop's mixed
precision (float32 params and update, bfloat16 products), and the sweep's
``matmul_precision`` reaches every compilation, isolated workers included.

Precision. The tests that compare float32 steps tightly (with ``manual_grad``,
with torch) use the ``highest_matmul_precision`` fixture of ``conftest.py``:
float32 products are TF32 on GPUs by default.
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
import pandas as pd
import pytest
from absl import flags

import bpjax
import bpjax.config
from bpjax import cli
from bpjax.bench import measure
from bpjax.bench import sweep as sweep_module
from bpjax.bench.peers import make_torch_step, numpy_grads, torch_available
from bpjax.bench.report import (
    ROW_FIELDS,
    Measurement,
    Row,
    derive,
    format_table,
    sweep_metadata,
    write_results,
)
from bpjax.bench.steps import sgd_state, sgd_step, step_flops
from bpjax.bench.sweep import SweepConfig, run_sweep
from bpjax.bench.timing import timing_from_times
from bpjax.config import Config, ConfigError
from bpjax.methods import METHODS

TINY = SweepConfig(
    sizes=(16, 8, 4),
    batches=(1, 4),
    repeats=2,
    warmup=1,
    min_time_s=0.0,
    platforms=("cpu",),
    matmul_max_n=512,
    peers=("numpy",),
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
    got = {(r.method, r.batch) for r in rows}
    assert got == {(m, b) for m in (*METHODS, "numpy") for b in config.batches}
    for r in rows:
        assert isinstance(r, Row) and tuple(f.name for f in dataclasses.fields(r)) == ROW_FIELDS
        assert r.platform == "cpu" and r.sizes == "16-8-4" and r.dtype == "float32"
        assert r.matmul_precision == "default"
    with pytest.raises(dataclasses.FrozenInstanceError):
        rows[0].median_s = 0.0  # a row is written once


def test_sweep_ok_rows_have_measurements(sweep):
    config, rows, _ = sweep
    ok = [r for r in rows if r.status == "ok"]
    assert len(ok) == len(rows) - 1  # per_sample at batch 4 is over its max batch
    for r in ok:
        assert r.median_s > 0 and r.p10_s <= r.median_s <= r.p90_s
        assert r.repeats >= config.repeats
        assert r.samples_per_s == pytest.approx(r.batch / r.median_s)
        assert r.flops_per_step == step_flops(config.sizes, r.batch)
        assert r.roofline_s > 0 and r.frac_of_roofline > 0
        assert r.matmul_peak_gflops > 0 and r.frac_of_matmul_peak > 0
        assert r.ratio_to_autodiff > 0
    assert all(r.ratio_to_autodiff == 1.0 for r in ok if r.method == "autodiff")
    assert all(r.paired_ratio_to_autodiff == 1.0 for r in ok if r.method == "autodiff")
    assert all(r.paired_ratio_to_autodiff > 0 for r in ok if r.method in METHODS)


def test_sweep_records_skipped_rows_with_reason(sweep):
    _, rows, _ = sweep
    (skipped,) = [r for r in rows if r.status == "skipped"]
    assert (skipped.method, skipped.batch) == ("per_sample", 4)
    assert "max_batch_per_method" in skipped.reason and skipped.median_s is None


def test_sweep_compiles_each_method_and_batch_once(sweep):
    _, rows, _ = sweep
    for r in rows:
        if r.status == "ok" and r.method in METHODS:
            assert (r.n_compiles, r.n_traces) == (1, 1), (r.method, r.batch)


def test_sweep_writes_json_csv_png(sweep):
    config, rows, paths = sweep
    with open(paths["json"]) as f:
        payload = json.load(f)
    assert len(payload["rows"]) == len(rows)
    device = payload["meta"]["devices"]["cpu"]
    for key in ("device_kind", "jax_version", "jaxlib_version", "XLA_FLAGS", "cpu_count", "date"):
        assert key in device
    assert payload["meta"]["config"]["sizes"] == list(config.sizes)
    assert payload["meta"]["matmul_precision"] == "default"  # in effect; and the global:
    assert "jax_default_matmul_precision" in device
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(config.out_dir) if n.endswith(".tmp")]
    assert "manual" in format_table(rows)


def test_sweep_csv_is_plain_header_and_rows(sweep):
    _, rows, paths = sweep
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and tuple(table[0]) == ROW_FIELDS
    assert [(t["method"], int(t["batch"])) for t in table] == [(r.method, r.batch) for r in rows]
    frame = pd.read_csv(paths["csv"])  # no options: no comment lines, no metadata
    assert tuple(frame.columns) == ROW_FIELDS and len(frame) == len(rows)
    ok = frame[frame["status"] == "ok"]
    np.testing.assert_allclose(ok["median_s"], [r.median_s for r in rows if r.status == "ok"])
    assert frame["median_s"].isna().sum() == 1  # the skipped row has no time, not a string


def test_derive_adds_columns_from_measurements_alone():
    t = timing_from_times([2e-3, 4e-3, 6e-3], compile_s=0.0, cpu_times_s=[1e-3])  # no NaN
    common = dict(platform="cpu", device_kind="cpu", batch=8, num_devices=1, roofline_s=1e-3)
    measured = [
        Measurement(method="manual", status="ok", timing=t, **common),
        Measurement(method="autodiff", status="ok", timing=timing_from_times([8e-3]), **common),
        Measurement(method="per_sample", status="error", reason="boom", **common),
    ]
    manual, auto, failed = derive(measured, sizes=(4, 3, 2), dtype="float32",
                                  matmul_peak_gflops=2.0)  # fmt: skip
    flops = step_flops((4, 3, 2), 8)
    assert (manual.median_s, manual.samples_per_s, manual.ratio_to_autodiff) == (4e-3, 2000, 2.0)
    assert manual.gflops == pytest.approx(flops / 4e-3 / 1e9)
    assert manual.frac_of_matmul_peak == pytest.approx(manual.gflops / 2.0)
    assert (manual.frac_of_roofline, auto.ratio_to_autodiff) == (0.25, 1.0)
    assert failed.median_s is None and failed.samples_per_s is None and failed.reason == "boom"
    assert failed.roofline_samples_per_s == 8 / 1e-3 and failed.flops_per_step == flops
    assert Measurement.from_dict(json.loads(json.dumps(measured[0].to_dict()))) == measured[0]


@pytest.mark.usefixtures("highest_matmul_precision")
def test_sgd_step_is_the_training_step_with_sgd():
    """One step of the sweep equals W -= lr * manual_grad, with the training loop's metrics."""
    sizes, lr = (5, 4, 3), 0.1
    params = bpjax.init_params(jax.random.key(3), sizes)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((6, sizes[0])), jnp.float32)
    y = jax.nn.one_hot(jnp.asarray(rng.integers(0, sizes[-1], 6)), sizes[-1])
    net = bpjax.Net.mlp(sizes)
    expected = jax.tree.map(lambda p, g: p - lr * g, params, bpjax.manual_grad(net, params, x, y))
    step, traces = sgd_step(net, "manual", lr=lr)
    state, metrics = step(sgd_state(jax.tree.map(jnp.copy, params)), x, y)
    state, _ = step(state, x, y)
    assert traces == [1] and int(state.step) == 2 and set(metrics) == {"loss_sum", "correct"}
    once, _ = step(sgd_state(jax.tree.map(jnp.copy, params)), x, y)
    for got, want in zip(jax.tree.leaves(once.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_sgd_step_in_bfloat16_is_the_mixed_precision_step():
    """float32 params in and out; the update is W -= lr * grad_fn(compute_dtype="bfloat16")."""
    sizes, lr = (5, 4, 3), 0.1
    config = dataclasses.replace(TINY, sizes=sizes, dtype="bfloat16", lr=lr)
    params = jax.tree.map(jnp.asarray, measure.host_params(config))
    x, y = measure._data(config, 6)
    assert {p.dtype for p in jax.tree.leaves(params)} == {np.dtype("float32")}  # master copy
    assert (x.dtype, y.dtype) == (jnp.bfloat16, np.float32)
    net = bpjax.Net.mlp(sizes)
    grads, _ = jax.jit(bpjax.grad_fn(net, "manual", compute_dtype="bfloat16"))(params, x, y)
    step, _ = sgd_step(net, "manual", lr=lr, compute_dtype="bfloat16")
    state, metrics = step(sgd_state(jax.tree.map(jnp.copy, params)), x, y)
    assert metrics["loss_sum"].dtype == jnp.float32
    for got, p, g in zip(*map(jax.tree.leaves, (state.params, params, grads)), strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, p - lr * g, rtol=1e-6, atol=1e-7)


def test_bfloat16_sweep_rows_and_metadata(tmp_path):
    config = dataclasses.replace(TINY, batches=(4,), methods=("manual", "autodiff"),
                                 dtype="bfloat16", matmul_precision="highest",
                                 out_dir=str(tmp_path))  # fmt: skip
    rows = run_sweep(config, log=None)
    assert {r.method for r in rows} == {"manual", "autodiff"}  # no host peer in bfloat16
    for r in rows:
        assert r.status == "ok", r.reason
        assert (r.dtype, r.matmul_precision) == ("bfloat16", "highest")
        assert r.roofline_s > 0 and r.matmul_peak_gflops > 0  # both in bfloat16
    meta = sweep_metadata(config)
    assert meta["matmul_precision"] == "highest" and meta["config"]["dtype"] == "bfloat16"
    assert config.param_dtype == "float32" and TINY.param_dtype == "float32"


def test_numpy_baseline_gradient_equals_manual_grad_float64():
    rng = np.random.default_rng(0)
    sizes, m = (7, 6, 5, 4), 9  # three layers: the e_l recursion runs twice
    with jax.enable_x64(True):
        params = bpjax.init_params(jax.random.key(1), sizes, jnp.float64)
        x = rng.standard_normal((m, sizes[0]))
        y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], m)]
        expected = bpjax.manual_grad(bpjax.Net.mlp(sizes), params, jnp.asarray(x), jnp.asarray(y))
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


@pytest.mark.usefixtures("highest_matmul_precision")
def test_torch_peer_step_matches_manual_sgd_step():
    # torch is in the dev extra: a missing torch fails here instead of skipping.
    assert torch_available(), "torch is missing: pip install -e '.[dev]' installs torch==2.13.0"
    rng = np.random.default_rng(2)
    sizes, m, lr = (5, 4, 3), 6, 0.1
    params = [{k: np.asarray(v, np.float32) for k, v in p.items()}
              for p in bpjax.init_params(jax.random.key(3), sizes)]  # fmt: skip
    x = rng.standard_normal((m, sizes[0])).astype(np.float32)
    y = np.eye(sizes[-1], dtype=np.float32)[rng.integers(0, sizes[-1], m)]
    step = make_torch_step(params, x, y, lr)
    step()
    g = bpjax.manual_grad(bpjax.Net.mlp(sizes),
                          [{k: jnp.asarray(v) for k, v in p.items()} for p in params], x, y)
    for l, (W, b) in enumerate(step.params):
        np.testing.assert_allclose(W.detach().numpy(), params[l]["W"] - lr * np.asarray(g[l]["W"]),
                                   rtol=1e-5, atol=1e-6, err_msg=f"W{l}")  # fmt: skip
        np.testing.assert_allclose(b.detach().numpy(), params[l]["b"] - lr * np.asarray(g[l]["b"]),
                                   rtol=1e-5, atol=1e-6, err_msg=f"b{l}")  # fmt: skip


def test_config_validates():
    with pytest.raises(ConfigError, match="'nope' is not one of"):
        SweepConfig(methods=("manual", "nope"))
    with pytest.raises(ConfigError, match="platforms"):
        SweepConfig(platforms=("quantum",))
    with pytest.raises(ConfigError, match="batches must not repeat"):
        SweepConfig(batches=(4, 4))
    with pytest.raises(ConfigError, match="isolate"):
        SweepConfig(isolate="sometimes")
    with pytest.raises(ConfigError, match="peers"):
        SweepConfig(peers=("julia",))
    with pytest.raises(ConfigError, match="sizes"):
        SweepConfig(sizes=(16,))
    with pytest.raises(ConfigError, match="max_batch_per_method"):
        SweepConfig(max_batch_per_method={"nope": 4})
    with pytest.raises(ConfigError, match="matmul_precision"):
        SweepConfig(matmul_precision="fastest")
    hash(TINY)  # frozen and hashable, dicts turned into tuples
    assert TINY.max_batch("per_sample") == 1 and TINY.max_batch("manual") is None
    assert SweepConfig(peers=()).peers == ()  # no peers at all is a valid sweep
    base = Config()  # the network and update of a training run are the sweep's defaults
    default = SweepConfig()
    assert (default.sizes, default.lr, default.activation, default.loss, default.seed) == (
        base.sizes, base.lr, base.activation, base.loss, base.seed)  # fmt: skip


def test_every_field_is_a_flag_of_the_same_name():
    values = flags.FlagValues()
    cli.define_flags(SweepConfig, flag_values=values)
    assert set(values) >= {f.name for f in dataclasses.fields(SweepConfig)}
    values(["prog", "--peers=", "--max_batch_per_method=per_sample=8,manual_vmap=64",
            "--sizes=16,8,4", "--dtype=bfloat16", "--lr=0.5"])  # fmt: skip
    config = cli.from_flags(SweepConfig, flag_values=values)
    assert config.peers == () and config.sizes == (16, 8, 4) and config.dtype == "bfloat16"
    assert config.max_batch_per_method == (("manual_vmap", 64), ("per_sample", 8))
    assert config.lr == 0.5 and config.platforms is None
    assert values["max_batch_per_method"].default == ["per_sample=1024"]
    bad = flags.FlagValues()
    cli.define_flags(SweepConfig, flag_values=bad)
    bad(["prog", "--max_batch_per_method=per_sample"])
    with pytest.raises(ConfigError, match="method=batch pairs"):
        cli.from_flags(SweepConfig, flag_values=bad)


@pytest.mark.slow
def test_isolated_configuration_runs_in_its_own_process(tmp_path):
    config = dataclasses.replace(TINY, batches=(2,), methods=("manual",), peers=(),
                                 isolate="always", out_dir=str(tmp_path))  # fmt: skip
    (row,) = run_sweep(config, log=None)
    assert row.status == "ok", row.reason
    assert (row.n_compiles, row.n_traces) == (1, 1)
    assert row.peak_memory_bytes is None  # the CPU client reports no allocator peak


@pytest.mark.slow
def test_isolated_worker_runs_with_the_parents_jax_settings(monkeypatch):
    """float64 and "highest" precision set in the parent hold in the worker too."""
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
        config = dataclasses.replace(TINY, dtype="float64", peers=(), isolate="always")
        settings = sweep_module.jax_settings()
        assert settings == {"jax_enable_x64": True, "jax_default_matmul_precision": "highest"}
        measured = sweep_module._run_isolated(config, "cpu", 2, "manual")
        assert measured.status == "ok", measured.reason  # not "needs jax_enable_x64"
        # Negative control: a worker that drops the settings is caught, not mislabelled.
        dropping = ("import json, sys; from bpjax.bench import sweep; "
                    "sweep._work({**json.loads(sys.stdin.read()), 'jax': {}})")  # fmt: skip
        monkeypatch.setattr(sweep_module, "_WORKER", dropping)
        with pytest.raises(RuntimeError, match="worker ran with JAX settings"):
            sweep_module._run_isolated(dataclasses.replace(config, dtype="float32"), "cpu", 2,
                                       "manual")  # fmt: skip


@pytest.mark.slow
def test_isolated_worker_compiles_under_the_sweeps_matmul_precision(monkeypatch):
    """The config travels whole: the worker's row says it compiled under "high"."""
    config = dataclasses.replace(TINY, dtype="bfloat16", matmul_precision="high", peers=(),
                                 isolate="always")  # fmt: skip
    measured = sweep_module._run_isolated(config, "cpu", 2, "manual")
    assert measured.status == "ok", measured.reason
    assert measured.matmul_precision == "high"
    # Negative control: a worker that loses the field is caught, not mislabelled.
    dropping = ("import json, sys; from bpjax.bench import sweep; job = json.loads("
                "sys.stdin.read()); job['config'].pop('matmul_precision'); sweep._work(job)")
    monkeypatch.setattr(sweep_module, "_WORKER", dropping)
    with pytest.raises(RuntimeError, match="compiled under matmul precision 'default'"):
        sweep_module._run_isolated(config, "cpu", 2, "manual")


@pytest.mark.slow
def test_script_sweeps_device_counts_data_parallel(tmp_path):
    """experiments/batch_sweep.py end to end on 2 simulated CPU devices."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    args = ["--device_counts=1,2", "--methods=manual,autodiff", "--batches=3,8",
            "--sizes=16,8,4", "--peers=", "--repeats=2",
            "--min_time_s=0", "--platforms=cpu", f"--out_dir={tmp_path}"]  # fmt: skip
    script = os.path.join(root, "experiments", "batch_sweep.py")
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                            env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "manual on 2 devices, samples/s vs 1 device" in result.stdout
    assert "manual >= 1.00x autodiff, every batch" in result.stdout  # the floor report
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
    with pytest.raises(ConfigError, match="xla_force_host_platform_device_count=4096"):
        run_sweep(config, log=None)
