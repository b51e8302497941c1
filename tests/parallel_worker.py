"""The 8-device half of tests/test_parallel.py, run in its own process.

    python tests/parallel_worker.py OUTDIR

JAX fixes its device count when the backend starts, and the pytest process has
already started it with one CPU device; this process asks for 8 simulated CPU
devices before any JAX call. It computes, in float64, and saves under OUTDIR
(``.npz`` of tree leaves in ``jax.tree.leaves`` order, plus ``summary.json``):

* ``inputs``: one batch (params, x, y); ``grads-<method>`` / ``outputs-<method>``:
  the shard_map form of each gradient method on that batch over 8 devices;
* ``train-<method>-<form>``: the final params of a short run on the toy dataset of
  tests/test_train.py, data parallel over 8 devices, for manual / autodiff and
  both forms (plus DP-SGD in the sharding form, and ``manual-resumed``: one
  epoch on one device, resumed from its checkpoint on 8);
* in ``summary.json``: each run's metrics and compile count, and the collectives
  in each form's compiled epoch.

The test process compares all of it with one device. No assertions here.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

import functools  # noqa: E402

import numpy as np  # noqa: E402
from jax import export  # noqa: E402
from test_parallel import NET, RUNS, SMALL, TOY, batch_inputs  # noqa: E402

from bpjax import parallel  # noqa: E402
from bpjax.config import Config  # noqa: E402
from bpjax.methods import METHODS  # noqa: E402
from bpjax.network import init_params  # noqa: E402
from bpjax.training import TrainState, initial_opt_state, make_train_step, run_epoch, train  # noqa: E402


def save_leaves(path: str, tree) -> None:
    np.savez(path, *[np.asarray(leaf) for leaf in jax.tree.leaves(tree)])


def grads_on_one_batch(out: str, mesh) -> None:
    params, x, y = batch_inputs()
    save_leaves(os.path.join(out, "inputs.npz"), (params, x, y))
    for method in METHODS:
        grads, outputs = jax.jit(parallel.sharded_grad_fn(NET, method, mesh))(params, x, y)
        assert outputs.sharding.spec == parallel.row_sharded(mesh).spec
        save_leaves(os.path.join(out, f"grads-{method}.npz"), grads)
        save_leaves(os.path.join(out, f"outputs-{method}.npz"), outputs)


def collectives(mesh) -> dict[str, dict[str, int]]:
    """The collectives in each form's compiled epoch (what XLA inserted, or psum became)."""
    x = TOY.x_train.astype(np.float64)
    y = np.eye(3)[TOY.y_train]
    params = init_params(jax.random.key(0), (12, 8, 3), np.float64)
    found = {}
    for form in ("sharding", "shard_map"):
        config = Config(**SMALL, num_devices=8, parallel=form)
        state = TrainState(params, initial_opt_state(config, params), np.zeros((), np.int32))
        state, x, y = parallel.replicate((state, x, y), mesh)
        step_fn = make_train_step(config, mesh, net=config.net(12, 3))
        place = parallel.Placement(mesh.devices.flat[0], mesh, form)
        epoch = functools.partial(run_epoch, step_fn=step_fn, batch=config.batch, place=place)
        hlo = jax.jit(epoch).lower(state, x, y, jax.random.key(1)).compile().as_text()
        found[form] = {
            op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo))
            for op in ("all-reduce", "all-gather", "all-to-all", "reduce-scatter")
        }
        # The same 8-device program lowered for GPUs and TPUs (tests/test_export.py's twin).
        exp = export.export(jax.jit(epoch), platforms=("cuda", "tpu"))(
            state, x, y, jax.random.key(1)
        )
        found[form]["exported_for"] = list(exp.platforms)
        found[form]["exported_devices"] = exp.nr_devices
    return found


def main(out: str) -> None:
    with jax.enable_x64(True):
        mesh = parallel.make_data_mesh(jax.devices())
        grads_on_one_batch(out, mesh)
        summary = {"devices": jax.device_count(), "collectives": collectives(mesh), "runs": {}}
    for name, overrides in RUNS.items():
        config = Config(workdir=tempfile.mkdtemp(dir=out), **{**SMALL, **overrides})
        result = train(config, dataset=TOY, log=lambda line: None)
        save_leaves(os.path.join(out, f"train-{name}.npz"), result.params)
        summary["runs"][name] = {"history": result.history, "traces": result.traces}
    # A one-device checkpoint resumed on 8 devices: Orbax restores into the replicated layout.
    workdir = tempfile.mkdtemp(dir=out)
    config = Config(workdir=workdir, **{**SMALL, **RUNS["manual-sharding"], "epochs": 1})
    train(config.replace(num_devices=1), dataset=TOY, log=lambda line: None)
    resumed = train(config.replace(epochs=SMALL["epochs"], resume=True), dataset=TOY,
                    log=lambda line: None)
    save_leaves(os.path.join(out, "train-manual-resumed.npz"), resumed.params)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main(sys.argv[1])
