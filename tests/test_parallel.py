"""Data parallelism: 8 simulated devices and 2 real processes end where 1 device ends.

The 8-device runs happen in tests/parallel_worker.py (its own process: the
device count is fixed when JAX starts); this process computes the one-device
references and compares, in float64, to about 1e-10. The two-process run is
launch.py twice on localhost, its collectives over gloo.
"""

import json
import os
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from test_train import TOY

from bpjax import parallel
from bpjax.checkpoint import checkpoint_manager, restore_latest
from bpjax.config import Config, ConfigError
from bpjax.methods import METHODS, grad_fn
from bpjax.network import Net, predict
from bpjax.parallel import Placement
from bpjax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL, ATOL = 1e-10, 1e-12

# Shared with parallel_worker.py: the 8-device runs and their one-device twins.
SMALL = dict(hidden=(8,), batch=16, epochs=2, dataset="mnist", dtype="float64",
             optimizer="momentum")
RUNS = {
    "manual-sharding": dict(method="manual", num_devices=8),
    "manual-shard_map": dict(method="manual", num_devices=0, parallel="shard_map"),
    "autodiff-sharding": dict(method="autodiff", num_devices=8),
    "autodiff-shard_map": dict(method="autodiff", num_devices=0, parallel="shard_map"),
    "dp_sgd-sharding": dict(method="manual", num_devices=8, dp_clip=1.0, dp_noise=0.5),
}


NET = Net.mlp((12, 8, 3))  # relu, softmax cross-entropy: the network of batch_inputs


def batch_inputs():
    """One float64 batch of 32 samples for a 12-8-3 network (NumPy: no JAX call)."""
    rng = np.random.default_rng(0)
    params = [
        {"W": rng.normal(size=(8, 12)) / 3, "b": rng.normal(size=(8,))},
        {"W": rng.normal(size=(3, 8)) / 3, "b": rng.normal(size=(3,))},
    ]
    x = rng.normal(size=(32, 12))
    y = np.eye(3)[rng.integers(0, 3, 32)]
    return params, x, y


def load_like(path, like):
    """The leaves saved by parallel_worker.save_leaves, in the tree structure of ``like``."""
    with np.load(path) as f:
        leaves = [f[f"arr_{i}"] for i in range(len(f.files))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    """Runs the worker once: 8 simulated CPU devices, all forms and methods."""
    out = tmp_path_factory.mktemp("eight")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "parallel_worker.py"), str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["devices"] == 8
    return out, summary


@pytest.mark.slow
def test_shard_map_grads_equal_one_device_grads(eight):
    out, _ = eight
    with jax.enable_x64(True):
        params, x, y = load_like(out / "inputs.npz", batch_inputs())
        for method in METHODS:
            expected, _ = jax.jit(grad_fn(NET, method))(params, x, y)
            sharded = load_like(out / f"grads-{method}.npz", expected)
            chex.assert_trees_all_close(sharded, expected, rtol=RTOL, atol=ATOL)
            outputs = np.load(out / f"outputs-{method}.npz")["arr_0"]
            np.testing.assert_allclose(outputs, predict(NET, params, x), rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_eight_devices_train_to_the_one_device_params(eight, tmp_path, name):
    out, summary = eight
    one_device = {**RUNS[name], "num_devices": 1, "parallel": "sharding"}
    reference = train(Config(workdir=str(tmp_path / "one"), **{**SMALL, **one_device}),
                      dataset=TOY, log=lambda line: None)
    params = load_like(out / f"train-{name}.npz", reference.params)
    chex.assert_trees_all_close(params, reference.params, rtol=RTOL, atol=ATOL)
    run = summary["runs"][name]
    assert run["traces"] == 1
    for got, want in zip(run["history"], reference.history, strict=True):
        np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=RTOL)
        np.testing.assert_allclose(got["test_loss"], want["test_loss"], rtol=RTOL)
        assert got["step"] == want["step"]
    # A real trajectory was compared (the loss fell) and the check can fail: a 1% error
    # planted in one leaf is caught.
    assert run["history"][-1]["train_loss"] < 0.5 * run["history"][0]["train_loss"]
    planted = jax.tree.map(np.copy, params)
    planted[1]["b"][0] *= 1.01
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(planted, reference.params, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["manual", "autodiff"])
def test_the_two_forms_agree(eight, method):
    out, _ = eight
    like = batch_inputs()[0]
    annotated = load_like(out / f"train-{method}-sharding.npz", like)
    explicit = load_like(out / f"train-{method}-shard_map.npz", like)
    chex.assert_trees_all_close(explicit, annotated, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_a_one_device_checkpoint_resumes_on_eight_devices(eight):
    out, _ = eight
    like = batch_inputs()[0]
    resumed = load_like(out / "train-manual-resumed.npz", like)
    uninterrupted = load_like(out / "train-manual-sharding.npz", like)
    chex.assert_trees_all_close(resumed, uninterrupted, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_the_sum_over_samples_becomes_an_all_reduce(eight):
    # sharding: XLA inserted it; shard_map: the psum of section 6. Neither form gathers
    # the dataset or the batch: each device reads only its own rows.
    _, summary = eight
    for form, ops in summary["collectives"].items():
        assert ops["all-reduce"] >= 1, (form, ops)
        assert ops["all-gather"] == ops["all-to-all"] == 0, (form, ops)


@pytest.mark.slow
def test_export_data_parallel_forms_for_gpu_and_tpu(eight):
    # jax.export of both 8-device epochs (sharding annotations, shard_map + psum).
    _, summary = eight
    for form, ops in summary["collectives"].items():
        assert ops["exported_for"] == ["cuda", "tpu"] and ops["exported_devices"] == 8, form


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_to_the_one_process_params(tmp_path):
    flags = dict(dataset="regression", loss="squared_error", activation="tanh", hidden=(16,),
                 batch=32, epochs=2, train_examples=512, lr=0.05, dtype="float64",
                 optimizer="momentum")
    workdir = tmp_path / "two"
    args = [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
            for k, v in flags.items()]
    args += ["--num_devices=0", "--num_processes=2", f"--workdir={workdir}",
             f"--coordinator_address=127.0.0.1:{free_port()}"]
    # Two CPU devices in each process: a 4-device mesh across 2 processes.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [
        subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *args,
                          f"--process_id={i}"], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    (stdout0, _), (stdout1, _) = outs
    assert "4 x cpu (cpu), data parallel by sharding over 2 processes" in stdout0
    assert sum(line.startswith("epoch ") for line in stdout0.splitlines()) == 2
    # Only process 0 logs (gloo's C++ prints its connection lines in every process).
    assert [line for line in stdout1.splitlines() if not line.startswith("[Gloo]")] == []

    reference = train(Config(workdir=str(tmp_path / "one"), **flags), log=lambda line: None)
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    # Only process 0 writes checkpoint bytes (the state is replicated; see bpjax.checkpoint).
    state_dir = workdir / "checkpoints" / "2" / "state"
    written = {p.relative_to(state_dir).parts[0] for p in state_dir.rglob("d/*") if p.is_file()}
    assert written and not any("process_1" in part for part in written), written
    np.testing.assert_allclose(metrics[-1]["train_loss"], reference.history[-1]["train_loss"],
                               rtol=RTOL)
    with jax.enable_x64(True):
        one = checkpoint_manager(reference.workdir)
        like = one.restore(one.latest_step())["state"]  # the layout a 1-process restore needs
        one.close()
        two = checkpoint_manager(str(workdir))
        state, epoch = restore_latest(two, like, {})
        two.close()
    assert epoch == 2
    chex.assert_trees_all_close(state["params"], reference.params, rtol=RTOL, atol=ATOL)
    assert state["params"][0]["W"].dtype == np.float64


def launch(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--num_devices=8", "--batch=100"], None,
         "--batch=100 does not divide over --num_devices=8: use a batch that is a multiple of 8"),
        (["--num_devices=0", "--batch=100"],
         {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
         "--batch=100 does not divide over the 8 devices of --num_devices=0"),
    ],
)
def test_batch_that_does_not_divide_over_the_devices_is_one_line_error(args, env, message):
    result = launch(*args, env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert result.stdout == ""  # refused before loading data or compiling


def test_more_devices_than_jax_sees_is_refused():
    config = Config(num_devices=8, batch=16)
    with pytest.raises(ConfigError, match=r"--num_devices=8 but JAX sees 1 cpu device: .*"
                                          r"xla_force_host_platform_device_count=8"):
        Placement.for_config(config)


def test_one_device_builds_no_mesh():
    assert Placement.for_config(Config()).mesh is None
    # All devices = the one there is: still the single-device program.
    assert Placement.for_config(Config(num_devices=0)).mesh is None


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(parallel="pmap"), "--parallel='pmap' is not one of: sharding, shard_map"),
        (dict(num_devices=-1), "--num_devices must be a positive integer, or 0 for all"),
        (dict(num_processes=0), "--num_processes must be a positive integer"),
        (dict(num_processes=2, workdir="w"),
         "--num_devices=1 does not split over --num_processes=2"),
        (dict(num_processes=2, num_devices=0), "--num_processes=2 needs --workdir"),
        (dict(parallel="shard_map", dp_clip=1.0), "--parallel=shard_map does not do DP-SGD"),
    ],
)
def test_parallel_config_errors(fields, message):
    with pytest.raises(ConfigError) as e:
        Config(**fields)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "cluster, processes, message",
    [
        (dict(process_id=2, coordinator_address="127.0.0.1:1234"), 2,
         "--process_id must be in [0, --num_processes=2)"),
        (dict(coordinator_address="127.0.0.1:1234"), 1, "--coordinator_address needs"),
        (dict(process_id=1), 2, "--process_id needs --coordinator_address"),
    ],
)
def test_cluster_argument_errors(cluster, processes, message):
    # How a process joins is the launcher's business, not a recorded setting of the run.
    with pytest.raises(ConfigError) as e:
        parallel.Cluster(**cluster).check(processes)
    assert message in str(e.value) and "\n" not in str(e.value)
    parallel.Cluster(process_id=1, coordinator_address="h:1").check(2)  # a valid one passes


def test_the_processes_must_be_connected():
    with pytest.raises(ConfigError, match="--num_processes=2 but JAX runs 1 process: call"):
        parallel.check_processes(2)


def test_joining_too_late_is_a_one_line_error():
    jax.devices()  # the backend is up: too late for jax.distributed.initialize
    with pytest.raises(ConfigError, match=r"process 0 could not join the 2-process run at "
                                          r"127.0.0.1:9: jax.distributed.initialize\(\) must"):
        parallel.initialize_distributed(parallel.Cluster("127.0.0.1:9", 0), 2)
    assert not jax.distributed.is_initialized()
