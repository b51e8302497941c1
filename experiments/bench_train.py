"""Epoch time and time-to-98% of the training loop, against a straightforward jit loop.

    python experiments/bench_train.py            # about 2-3 minutes on a 2-core CPU

Side by side, interleaved, in one process, MNIST 784-500-10, batch 128, SGD lr 0.1:

* ``python_loop``: the straightforward version: a jitted ``train_step`` called
  from a Python loop, each batch sliced on the host and copied to the device;
* ``scan_epoch``: ``bpjax.train``'s epoch: data resident on the device, the
  whole epoch one jitted ``lax.scan`` (reshuffle included);
* ``gemm_only``: just the matrix products of an epoch (``bpjax.sweep.gemm_only_fn``,
  the batch sweep's roofline), the floor for any formulation.

Then it runs ``bpjax.train`` with the default config (``--method=manual
--batch=128``, data cached) and reports the wall time at which test accuracy
first reaches 98%. Results go to ``experiments/results/bench_train.json``.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from bpjax import Config, init_params, load_dataset, train
from bpjax.files import write_atomic
from bpjax.sweep import gemm_only_args, gemm_only_fn
from bpjax.timing import compare_fns, device_info
from bpjax.train import TrainState, make_grad, make_optimizer, run_epoch, train_step

flags.DEFINE_integer("batch", 128, "Batch size.")
flags.DEFINE_integer("repeats", 5, "Timed epochs per variant.")
flags.DEFINE_integer("epochs_to_98", 40, "Epoch budget for the time-to-98% run.")
flags.DEFINE_string("out", "experiments/results/bench_train.json", "JSON output.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint at INFO
    config = Config(batch=FLAGS.batch)
    data = load_dataset("mnist", progress=False)
    x = jnp.asarray(data.x_train)
    y = jax.nn.one_hot(jnp.asarray(data.y_train), 10, dtype=jnp.float32)
    x_host, y_host = np.asarray(x), np.asarray(y)
    optimizer = make_optimizer(config)
    params = init_params(jax.random.key(0), (784, 500, 10))
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    step = functools.partial(
        train_step, grad=make_grad(config), optimizer=optimizer, loss=config.loss
    )
    batch = config.batch
    steps = x.shape[0] // batch

    jit_step = jax.jit(step, donate_argnums=0)

    def python_loop(state, key):
        order = np.random.default_rng(int(key)).permutation(x_host.shape[0])
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            state, _ = jit_step(state, x_host[idx], y_host[idx], None)
        return (state,)  # compare_fns(carry=True) feeds out[0] back in

    scan_epoch = jax.jit(
        functools.partial(run_epoch, step_fn=step, batch=batch), donate_argnums=0
    )

    # The sweep's GEMM-only roofline (the step's products, same shapes and orientation as
    # manual), scanned over the epoch's batches of the real images. Each step's products
    # become the carry, so they are written to memory as a step writes its gradients
    # (summing them instead lets XLA fuse the reductions into the products: a looser floor).
    products = gemm_only_fn(len(params))
    Ws, W_Ts, _, As, dZs = gemm_only_args(
        (784, 500, 10), batch, "float32", np.random.default_rng(0), jax.devices()[0]
    )

    def gemm_epoch(last, x, Ws, W_Ts, As, dZs):
        def body(_, i):
            xb = jax.lax.dynamic_slice_in_dim(x, i * batch, batch)
            return products(Ws, W_Ts, xb, As, dZs), None

        return jax.lax.scan(body, last, jnp.arange(steps))[0]

    no_products = jax.tree.map(
        jnp.zeros_like, jax.eval_shape(products, Ws, W_Ts, x[:batch], As, dZs)
    )

    key = jax.random.key(1)
    timings = compare_fns(
        {
            "python_loop": (python_loop, (jax.tree.map(jnp.copy, state), 0)),
            "scan_epoch": (scan_epoch, (jax.tree.map(jnp.copy, state), x, y, key)),
            "gemm_only": (jax.jit(gemm_epoch), (no_products, x, Ws, W_Ts, As, dZs)),
        },
        repeats=FLAGS.repeats,
        warmup=1,
        carry=True,
    )
    base = timings["python_loop"].median_s
    print(f"epoch at batch {batch} ({steps} steps), median of {FLAGS.repeats}, "
          f"{device_info()['processor']}:")
    for name, t in timings.items():
        print(f"  {name:12s} {t.median_s:7.3f} s  (p10 {t.p10_s:.3f}, p90 {t.p90_s:.3f}, "
              f"compile {t.compile_s:.2f} s)  speed-up vs python_loop {base / t.median_s:.2f}x")

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        result = train(
            Config(epochs=FLAGS.epochs_to_98, workdir=workdir), log=lambda line: None
        )
        total = time.perf_counter() - t0
    hit = next((m for m in result.history if m["test_accuracy"] >= 0.98), None)
    final = result.history[-1]
    if hit:
        print(f"98% test accuracy first at epoch {hit['epoch']}, {hit['wall_time']:.1f} s into "
              f"the run (data cached, compile included); after {FLAGS.epochs_to_98} epochs "
              f"{100 * final['test_accuracy']:.2f}% in {total:.1f} s")
    else:
        print(f"98% not reached in {FLAGS.epochs_to_98} epochs "
              f"(final {100 * final['test_accuracy']:.2f}%)")
    out = {
        "device": device_info(),
        "batch": batch,
        "epoch": {k: v.as_dict() for k, v in timings.items()},
        "first_98": hit,
        "history": result.history,
    }
    write_atomic(FLAGS.out, json.dumps(out, indent=1))

if __name__ == "__main__":
    app.run(main)
