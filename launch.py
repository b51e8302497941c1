"""Trains the documents' MLP on real data from the command line.

    python launch.py --method=manual --batch=128

trains 784-500-10 (ReLU, softmax cross-entropy, Glorot-uniform, SGD lr 0.1) on
MNIST with the second document's full-matrix backprop and prints one line per
epoch. Every flag is a field of ``bpjax.Config`` with the same name (defined by
``bpjax.cli``); JAX's own flags (``--jax_enable_x64``, ``--jax_platforms``,
``--jax_log_compiles``) work too. Only entry points define or read flags: the
logic lives in ``bpjax.train``, importable from a notebook.

Data parallel: ``--num_devices=0`` splits every batch over all devices
(``--parallel=sharding`` or ``shard_map``). Several processes: run the same
command in each with ``--num_processes=P --process_id=i
--coordinator_address=HOST:PORT --num_devices=0 --workdir=SHARED_DIR``; this
module calls ``jax.distributed.initialize`` before anything else touches JAX.
"""

from __future__ import annotations

from absl import flags, logging

from bpjax import cli
from bpjax.config import Config
from bpjax.parallel import initialize_distributed
from bpjax.train import train

cli.define_flags(Config)


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        # app.run turns on INFO and Orbax logs ~40 INFO lines per checkpoint; -v=0 shows them.
        logging.set_verbosity(logging.WARNING)
    config = cli.from_flags(Config)
    initialize_distributed(config.coordinator_address, config.num_processes, config.process_id)
    train(config)


if __name__ == "__main__":
    cli.run(main)
