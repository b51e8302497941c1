"""Trains the documents' MLP on real data from the command line.

    python launch.py --method=manual --batch=128

trains 784-500-10 (ReLU, softmax cross-entropy, Glorot-uniform, SGD lr 0.1) on
MNIST with the second document's full-matrix backprop and prints one line per
epoch. Every flag is a field of ``bpjax.Config`` with the same name; JAX's own
flags (``--jax_enable_x64``, ``--jax_platforms``, ``--jax_log_compiles``) work
too. This is the only module that defines or reads flags: the logic lives in
``bpjax.train``, importable from a notebook.

Data parallel: ``--num_devices=0`` splits every batch over all devices
(``--parallel=sharding`` or ``shard_map``). Several processes: run the same
command in each with ``--num_processes=P --process_id=i
--coordinator_address=HOST:PORT --num_devices=0 --workdir=SHARED_DIR``; this
module calls ``jax.distributed.initialize`` before anything else touches JAX.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging

from bpjax.checkpoint import CheckpointError
from bpjax.config import DATASETS, DTYPES, OPTIMIZERS, PARALLEL, PLATFORMS, Config, ConfigError
from bpjax.data import DataError
from bpjax.methods import METHODS
from bpjax.parallel import initialize_distributed
from bpjax.train import TrainingError, train

_D = Config()
flags.DEFINE_string("method", _D.method, f"Gradient method: {', '.join(METHODS)}.")
flags.DEFINE_integer("batch", _D.batch, "Mini-batch size M.")
flags.DEFINE_integer("epochs", _D.epochs, "Passes over the training set.")
flags.DEFINE_float("lr", _D.lr, "Learning rate.")
flags.DEFINE_string("optimizer", _D.optimizer, f"One of {', '.join(OPTIMIZERS)}.")
flags.DEFINE_float("momentum", _D.momentum, "Momentum for --optimizer=momentum.")
flags.DEFINE_list("hidden", [str(h) for h in _D.hidden], "Comma list of hidden widths.")
flags.DEFINE_string(
    "activation", _D.activation, "Hidden activation: relu, sigmoid, tanh, identity."
)
flags.DEFINE_string("loss", _D.loss, "softmax_cross_entropy or squared_error.")
flags.DEFINE_string("dataset", _D.dataset, f"One of {', '.join(DATASETS)}.")
flags.DEFINE_string("data_dir", None, "Directory holding the four IDX files (plain or .gz).")
flags.DEFINE_string("workdir", None, "Run directory (default: a new one under runs/).")
flags.DEFINE_integer("seed", _D.seed, "Seed for init, shuffling and synthetic data.")
flags.DEFINE_string("dtype", _D.dtype, f"One of {', '.join(DTYPES)}.")
flags.DEFINE_string("platform", None, f"One of {', '.join(PLATFORMS)} (default: what JAX finds).")
flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its latest checkpoint.")
flags.DEFINE_integer("train_examples", None, "Use only the first N training examples.")
flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every, "Checkpoint every N epochs.")
flags.DEFINE_integer("keep_checkpoints", _D.keep_checkpoints, "Checkpoints kept on disk.")
flags.DEFINE_float("dp_clip", None, "DP-SGD: clip each example's gradient to this L2 norm.")
flags.DEFINE_float("dp_noise", _D.dp_noise, "DP-SGD: Gaussian noise multiplier (x dp_clip).")
flags.DEFINE_integer(
    "num_devices", _D.num_devices,
    "Split every batch over this many devices (0: all devices of all processes).",
)
flags.DEFINE_string("parallel", _D.parallel, f"Data-parallel form: {', '.join(PARALLEL)}.")
flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT of process 0, for --num_processes > 1 (default: detected on TPU pods, SLURM).",
)
flags.DEFINE_integer("num_processes", _D.num_processes, "Processes (hosts) training together.")
flags.DEFINE_integer("process_id", _D.process_id, "This process's index in [0, num_processes).")
FLAGS = flags.FLAGS


def config_from_flags() -> Config:
    try:
        hidden = tuple(int(h) for h in FLAGS.hidden)
    except ValueError:
        raise ConfigError(
            f"--hidden must be a comma list of positive widths like 500 or 256,128, "
            f"got {','.join(FLAGS.hidden)!r}"
        ) from None
    fields = {f: FLAGS[f].value for f in Config.__dataclass_fields__ if f != "hidden"}
    return Config(hidden=hidden, **fields)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}: flags take the form --name=value")
    if not FLAGS["verbosity"].present:
        # app.run turns on INFO and Orbax logs ~40 INFO lines per checkpoint; -v=0 shows them.
        logging.set_verbosity(logging.WARNING)
    try:
        config = config_from_flags()
        initialize_distributed(config.coordinator_address, config.num_processes, config.process_id)
        train(config)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main)
