"""Trains the documents' MLP on real data from the command line.

    python launch.py --method=manual --batch=128

trains 784-500-10 (ReLU, softmax cross-entropy, Glorot-uniform, SGD lr 0.1) on
MNIST with the second document's full-matrix backprop and prints one line per
epoch. Every flag is a field of ``bpjax.Config`` with the same name (defined by
``bpjax.cli``); JAX's own flags (``--jax_enable_x64``, ``--jax_platforms``,
``--jax_log_compiles``) work too. Only entry points define or read flags: the
logic lives in ``bpjax.train`` (module ``bpjax.training``), importable from a notebook.

A run is a record (``bpjax.rundir``). ``--workdir=DIR --resume`` continues the
run in DIR with the settings its ``config.json`` recorded (flags may change only
what does not alter the computation: ``--epochs``, checkpoint cadence, devices;
any other differing flag is refused); on a DIR with no checkpoint it starts the
run, so one command line starts and restarts a scheduled job. ``--config=PATH``
repeats a run: PATH's settings (a ``config.json`` or a run directory) are the
defaults, flags override, the run goes to a new workdir. SIGINT (Ctrl-C) and
SIGTERM stop the run after the epoch under way, checkpointed; the exit status
is 130 or 143 and the last line says how to resume. A signal before training
starts (while JAX loads) exits at once, 130 or 143, with one line and nothing
written. Errors are one line, exit 2.

Data parallel: ``--num_devices=0`` splits every batch over all devices
(``--parallel=sharding`` or ``shard_map``). Several processes: run the same
command in each with ``--num_processes=P --process_id=i
--coordinator_address=HOST:PORT --num_devices=0 --workdir=SHARED_DIR``; this
module calls ``jax.distributed.initialize`` before anything else touches JAX.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys


def exit_on_signal(signum: int, frame: object) -> None:
    """SIGINT or SIGTERM outside the training loop: leave at once, with one line.

    Installed before the imports below (JAX, Orbax: seconds), where Python's own
    KeyboardInterrupt can land in a garbage-collection callback of JAX's, be
    printed as "Exception ignored" and lost, and the run go on. Nothing is
    written before ``train`` runs, and while it runs ``bpjax.interrupt`` holds
    the signals (a stop at the next epoch's end, checkpointed).
    """
    del frame
    for stream in (sys.stdout, sys.stderr):  # what was printed is kept (os._exit drops it)
        with contextlib.suppress(Exception):
            stream.flush()
    name = signal.Signals(signum).name
    with contextlib.suppress(OSError):  # stderr closed: the exit status still says it
        os.write(2, f"bpjax: {name} received outside the training loop: exiting\n".encode())
    os._exit(128 + signum)


for _signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signum, exit_on_signal)

from absl import flags, logging  # noqa: E402 - after the handlers: a signal can come now

from bpjax import cli, rundata  # noqa: E402
from bpjax.config import Config, read_record  # noqa: E402
from bpjax.errors import ConfigError  # noqa: E402
from bpjax.interrupt import graceful_stop  # noqa: E402
from bpjax.parallel import Cluster, initialize_distributed  # noqa: E402
from bpjax.rules import check_recorded_rule  # noqa: E402
from bpjax.training import train  # noqa: E402

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
        recorded = Config.from_json(CONFIG.value, workdir=None, resume=False, data_shape=None)
    elif flags.FLAGS.resume and workdir and os.path.isfile(os.path.join(workdir, "config.json")):
        recorded = Config.from_json(os.path.join(workdir, "config.json"))
    config = cli.from_flags(Config, defaults=recorded)
    if CONFIG.value:  # a repeat runs the recorded rule's source, or says how to accept a change
        check_recorded_rule(read_record(CONFIG.value).get("feedback_rule"), config.feedback,
                            accept=config.accept_rule_change)  # fmt: skip
    return config


def main(argv: list[str]) -> None:
    del argv
    config = resolve_config()
    dataset = None
    if CONFIG.value:  # a repeat trains on the recorded data, or says how to accept a change
        config, dataset = rundata.resolve(config, None)
        record = read_record(CONFIG.value)
        if record.get("dataset") == config.dataset:
            rundata.check_record(record.get("data"), rundata.record(dataset, config),
                                 config.dataset, accept=config.accept_data_change)  # fmt: skip
    initialize_distributed(cli.from_flags(Cluster), config.num_processes)
    with graceful_stop() as stop:
        result = train(config, dataset=dataset, stop=stop)
    if result.interrupted:
        epoch = result.history[-1]["epoch"] if result.history else 0
        again = shlex.join([sys.argv[0], f"--workdir={result.workdir}", "--resume"])
        print(f"interrupted at epoch {epoch}; resume with: python {again}", file=sys.stderr)
        sys.exit(stop.exit_status)


if __name__ == "__main__":
    cli.run(main, verbosity=logging.FATAL)  # -v=0 (or -v=-1: warnings) shows Orbax's logs
