"""Epoch time and time-to-98% of the training loop, against a straightforward jit loop.

    python experiments/bench_train.py            # about 2-3 minutes on a 2-core CPU

Side by side, interleaved, in one process, on MNIST with ``bpjax.Config``'s
network and update (784-500-10, SGD lr 0.1) at batch 128:

* ``python_loop``: the straightforward version: a jitted ``train_step`` called
  from a Python loop, each batch sliced on the host and copied to the device;
* ``scan_epoch``: ``bpjax.train``'s epoch: data resident on the device, the
  whole epoch one jitted ``lax.scan`` (reshuffle included);
* ``gemm_only``: just the matrix products of an epoch (``bpjax.bench.steps``'s
  GEMM-only roofline, the batch sweep's), the floor for any formulation.

It prints the epoch's time over its matrix products' (the floor a formulation
cannot beat; the loop's overhead is the rest: the shuffled rows' gather, the
update, the metrics). Then it runs ``bpjax.train`` with the default config
(``--method=manual --batch=128``, data cached) to 98% test accuracy
(``target_accuracy=0.98``) and reports the epoch, the training seconds
(compilation and evaluation excluded) and the wall time at which it got there.
Results go to ``experiments/results/bench_train.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bpjax import Config, Dataset, cli, init_params, load_dataset, train
from bpjax.bench.report import write_json
from bpjax.bench.steps import gemm_only_args, gemm_only_fn
from bpjax.bench.timing import compare_fns, device_info
from bpjax.config import check_positive_int, setting
from bpjax.training import (
    TrainState,
    compiler_options,
    initial_opt_state,
    make_train_step,
    run_epoch,
)


@dataclasses.dataclass(frozen=True)
class TrainBench:
    batch: int = setting(Config().batch, "Batch size.")
    repeats: int = setting(5, "Timed epochs per variant.")
    epochs_to_98: int = setting(Config().epochs, "Epoch budget for the time-to-98% run.")
    out: str = setting("experiments/results/bench_train.json", "JSON output.")

    def __post_init__(self) -> None:
        for name in ("batch", "repeats", "epochs_to_98"):
            check_positive_int(name, getattr(self, name))


cli.define_flags(TrainBench)


def epoch_variants(config: Config, data: Dataset) -> dict[str, tuple[Callable, tuple]]:
    """The three ways through one epoch, each with its arguments (the state first, carried)."""
    sizes, batch = config.sizes, config.batch
    x = jnp.asarray(data.x_train)
    y = jax.nn.one_hot(jnp.asarray(data.y_train), sizes[-1], dtype=jnp.float32)
    x_host, y_host = np.asarray(x), np.asarray(y)
    steps = x.shape[0] // batch
    params = init_params(jax.random.key(0), sizes)
    state = TrainState(params, initial_opt_state(config, params), jnp.zeros((), jnp.int32))
    step = make_train_step(config)
    # Every variant is compiled as bpjax.train compiles its epoch (step.compiler_options).
    jit = functools.partial(jax.jit, compiler_options=compiler_options(
        jax.devices()[0].platform, batch))  # fmt: skip
    jit_step = jit(step, donate_argnums=0)

    def python_loop(state: TrainState, seed: int) -> TrainState:
        order = np.random.default_rng(seed).permutation(x_host.shape[0])
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            state, _ = jit_step(state, x_host[idx], y_host[idx], None)
        return state

    scan_epoch = jit(functools.partial(run_epoch, step_fn=step, batch=batch), donate_argnums=0)
    # The step's products (same shapes and orientation as manual) scanned over the epoch's
    # batches of the real images. Each step's products become the carry, so they are written
    # to memory as a step writes its gradients (summing them instead lets XLA fuse the
    # reductions into the products: a looser floor).
    products = gemm_only_fn(len(sizes) - 1)
    Ws, W_Ts, _, As, dZs = gemm_only_args(sizes, batch, "float32", np.random.default_rng(0),
                                          jax.devices()[0])  # fmt: skip

    def gemm_epoch(last, x, Ws, W_Ts, As, dZs):
        def body(_, i):
            return products(Ws, W_Ts, jax.lax.dynamic_slice_in_dim(x, i * batch, batch), As,
                            dZs), None  # fmt: skip

        return jax.lax.scan(body, last, jnp.arange(steps))[0]

    empty = jax.tree.map(jnp.zeros_like, jax.eval_shape(products, Ws, W_Ts, x[:batch], As, dZs))
    return {
        "python_loop": (python_loop, (jax.tree.map(jnp.copy, state), 0)),
        "scan_epoch": (scan_epoch, (jax.tree.map(jnp.copy, state), x, y, jax.random.key(1))),
        "gemm_only": (jit(gemm_epoch), (empty, x, Ws, W_Ts, As, dZs)),
    }


def time_to_98(epochs: int) -> tuple[dict[str, Any] | None, list[dict[str, Any]], float]:
    """The default run to 98% test accuracy: where it got there (or None), history, seconds."""
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        result = train(Config(epochs=epochs, target_accuracy=0.98, workdir=workdir), log=None)
        total = time.perf_counter() - t0
    return result.target, result.history, total


def main(argv: Sequence[str]) -> None:
    del argv
    settings = cli.from_flags(TrainBench)
    config = Config(batch=settings.batch)
    data = load_dataset(config.dataset, progress=False)
    timings = compare_fns(epoch_variants(config, data), repeats=settings.repeats, warmup=1,
                          carry=True)  # fmt: skip
    base = timings["python_loop"].median_s
    steps = data.x_train.shape[0] // config.batch
    print(f"epoch at batch {config.batch} ({steps} steps), median of {settings.repeats}, "
          f"{device_info()['processor']}:")
    for name, t in timings.items():
        print(f"  {name:12s} {t.median_s:7.3f} s  (p10 {t.p10_s:.3f}, p90 {t.p90_s:.3f}, "
              f"compile {t.compile_s:.2f} s)  speed-up vs python_loop {base / t.median_s:.2f}x")
    over = timings["scan_epoch"].median_s / timings["gemm_only"].median_s
    print(f"  the epoch takes {over:.3f}x its matrix products (gemm_only)")
    hit, history, total = time_to_98(settings.epochs_to_98)
    if hit:
        print(f"98% test accuracy first at epoch {hit['epoch']}: {hit['train_s']:.1f} s of "
              f"training, {hit['elapsed_s']:.1f} s into the run (data cached, compilation "
              f"included); whole run {total:.1f} s")
    else:
        final = 100 * history[-1]["test_accuracy"]
        print(f"98% not reached in {settings.epochs_to_98} epochs (final {final:.2f}%)")
    rows = [{"variant": name, **t.as_dict(), "speedup_vs_python_loop": base / t.median_s}
            for name, t in timings.items()]  # fmt: skip
    write_json(settings.out, settings, rows, epoch_over_gemm=over, first_98=hit, history=history)
    print(f"wrote {settings.out}")


if __name__ == "__main__":
    cli.run(main, verbosity=logging.WARNING)  # Orbax logs every checkpoint at INFO
