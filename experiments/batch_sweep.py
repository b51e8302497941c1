r"""Batch-size sweep of one training step, every method on every platform (issue 4).

    python experiments/batch_sweep.py

runs batches 1, 2, 4, ..., 8192 of the 784-500-10 network for manual, autodiff,
manual_vmap, autodiff_vmap, per_sample (up to batch 1024), the first
document's NumPy code and PyTorch autograd (when installed), on every platform
JAX finds; prints a table and writes ``batch_sweep.{json,csv,png}`` to
``experiments/results/``. About 4 minutes on a quiet 2-core CPU (most of it
compiling 70 executables and the big batches); on a shared machine longer.

Scaling over devices (data parallel, ``bpjax.parallel``), here 8 simulated CPU
devices (they share the host's cores: this shows the all-reduce's cost, not a
speed-up; on a multi-GPU host or a TPU VM drop XLA_FLAGS):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/batch_sweep.py \
        --device_counts=1,2,4,8 --methods=manual,autodiff --batches=256,1024,4096 \
        --numpy=false --torch=false --out_dir=experiments/results/scaling

A quick look:

    python experiments/batch_sweep.py --batches=1,64,4096 \
        --methods=manual,autodiff --torch=false --out_dir=/tmp/sweep

The logic is ``bpjax.sweep`` (``SweepConfig``, ``run_sweep``, ``write_results``);
this file only turns flags into a config. JAX's own flags work too
(``--jax_platforms=cpu``, ``--jax_log_compiles``).
"""

from __future__ import annotations

import jax
from absl import app, flags

from bpjax.methods import METHODS
from bpjax.sweep import (
    DEFAULT_BATCHES,
    SweepConfig,
    floor_report,
    format_table,
    run_sweep,
    sweep_metadata,
    write_results,
)

_DEFAULT = SweepConfig()
PLATFORMS = flags.DEFINE_list("platforms", None, "cpu,gpu,tpu; default: all JAX finds")
METHODS_ = flags.DEFINE_list("methods", list(METHODS), "JAX gradient methods to time")
BATCHES = flags.DEFINE_list("batches", [str(b) for b in DEFAULT_BATCHES], "batch sizes")
SIZES = flags.DEFINE_list("sizes", [str(s) for s in _DEFAULT.sizes], "layer widths n_0,...,n_L")
REPEATS = flags.DEFINE_integer("repeats", _DEFAULT.repeats, "timed rounds per batch (at least)")
MIN_TIME_S = flags.DEFINE_float("min_time_s", _DEFAULT.min_time_s, "timed seconds per batch")
DTYPE = flags.DEFINE_enum("dtype", _DEFAULT.dtype, ["float32", "float64", "bfloat16"], "dtype")
SEED = flags.DEFINE_integer("seed", _DEFAULT.seed, "PRNG seed")
NUMPY = flags.DEFINE_bool("numpy", _DEFAULT.include_numpy, "time the first document's NumPy code")
TORCH = flags.DEFINE_bool("torch", _DEFAULT.include_torch, "time PyTorch autograd (if installed)")
MAX_BATCH = flags.DEFINE_list(
    "max_batch_per_method",
    [f"{m}={b}" for m, b in _DEFAULT.max_batch_per_method],
    "method=largest_batch pairs; larger batches are recorded as skipped",
)
DEVICE_COUNTS = flags.DEFINE_list(
    "device_counts", ["1"],
    "device counts D to run the JAX methods on, data parallel when D > 1 (e.g. 1,2,4,8; on a "
    "CPU host with XLA_FLAGS=--xla_force_host_platform_device_count=8)",
)
ISOLATE = flags.DEFINE_enum("isolate", _DEFAULT.isolate, ["auto", "always", "never"],
                            "one process per configuration (true peak memory)")
OUT_DIR = flags.DEFINE_string("out_dir", "experiments/results", "where JSON, CSV and PNG go")


def main(argv):
    del argv
    config = SweepConfig(
        sizes=tuple(int(s) for s in SIZES.value),
        batches=tuple(int(b) for b in BATCHES.value),
        methods=tuple(METHODS_.value),
        platforms=tuple(PLATFORMS.value) if PLATFORMS.value else None,
        repeats=REPEATS.value,
        min_time_s=MIN_TIME_S.value,
        dtype=DTYPE.value,
        seed=SEED.value,
        include_numpy=NUMPY.value,
        include_torch=TORCH.value,
        max_batch_per_method=tuple(
            (kv.split("=")[0], int(kv.split("=")[1])) for kv in MAX_BATCH.value
        ),
        device_counts=tuple(int(d) for d in DEVICE_COUNTS.value),
        isolate=ISOLATE.value,
        out_dir=OUT_DIR.value,
    )
    rows = run_sweep(config)
    print(format_table(rows))
    print("\n".join(floor_report(rows)))
    paths = write_results(rows, sweep_metadata(config), config.out_dir)
    print("wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main)
