"""Trains the documents' MLP on real data from the command line.

    python launch.py --method=manual --batch=128

trains 784-500-10 (ReLU, softmax cross-entropy, Glorot-uniform, SGD lr 0.1) on
MNIST with the second document's full-matrix backprop and prints one line per
epoch. Every flag is a field of ``bpjax.Config`` with the same name (defined by
``bpjax.cli``); JAX's own flags (``--jax_enable_x64``, ``--jax_platforms``,
``--jax_log_compiles``) work too. Only entry points define or read flags: the
logic lives in ``bpjax.train``, importable from a notebook.

A run is a record (``bpjax.rundir``). ``--workdir=DIR --resume`` continues the
run in DIR with the settings its ``config.json`` recorded (flags may change only
what does not alter the computation: ``--epochs``, checkpoint cadence, devices;
any other differing flag is refused); on a DIR with no checkpoint it starts the
run, so one command line starts and restarts a scheduled job. ``--config=PATH``
repeats a run: PATH's settings (a ``config.json`` or a run directory) are the
defaults, flags override, the run goes to a new workdir. SIGINT (Ctrl-C) and
SIGTERM stop the run after the epoch under way, checkpointed; the exit status
is 130 or 143 and the last line says how to resume. Errors are one line, exit 2.

Data parallel: ``--num_devices=0`` splits every batch over all devices
(``--parallel=sharding`` or ``shard_map``). Several processes: run the same
command in each with ``--num_processes=P --process_id=i
--coordinator_address=HOST:PORT --num_devices=0 --workdir=SHARED_DIR``; this
module calls ``jax.distributed.initialize`` before anything else touches JAX.
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import flags, logging

from bpjax import cli
from bpjax.config import Config
from bpjax.errors import ConfigError
from bpjax.interrupt import graceful_stop
from bpjax.parallel import Cluster, initialize_distributed
from bpjax.train import train

cli.define_flags(Config)
cli.define_flags(Cluster)
CONFIG = flags.DEFINE_string(
    "config", None,
    "Repeat a run: its config.json (or its directory) gives the settings; flags override.",
)  # fmt: skip


def resolve_config() -> Config:
    """The run's settings: flags over a recorded run's (``--resume`` or ``--config``)."""
    workdir = flags.FLAGS.workdir
    recorded = None
    if CONFIG.value:
        if flags.FLAGS.resume:
            raise ConfigError("--config starts a new run and --resume continues one: use one")
        recorded = Config.from_json(CONFIG.value).replace(workdir=None, resume=False)
    elif flags.FLAGS.resume and workdir and os.path.isfile(os.path.join(workdir, "config.json")):
        recorded = Config.from_json(os.path.join(workdir, "config.json"))
    return cli.from_flags(Config, defaults=recorded)


def main(argv: list[str]) -> None:
    del argv
    config = resolve_config()
    initialize_distributed(cli.from_flags(Cluster), config.num_processes)
    with graceful_stop() as stop:
        result = train(config, stop=stop)
    if result.interrupted:
        epoch = result.history[-1]["epoch"] if result.history else 0
        again = shlex.join([sys.argv[0], f"--workdir={result.workdir}", "--resume"])
        print(f"interrupted at epoch {epoch}; resume with: python {again}", file=sys.stderr)
        sys.exit(stop.exit_status)


if __name__ == "__main__":
    cli.run(main, verbosity=logging.FATAL)  # -v=0 (or -v=-1: warnings) shows Orbax's logs
