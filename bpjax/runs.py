"""Reading runs back: settings, metrics and parameters, without knowing Orbax.

    run = bpjax.load_run("runs/a")            # the latest checkpoint
    run = bpjax.load_run("runs/a", epoch=0)   # the initial parameters, from the seed
    run.config, run.metrics, run.params, run.epoch

    fig = bpjax.runs_figure(["runs/a", "runs/b"])   # learning curves, one line per run

``load_run`` only reads, and writes nothing (a run directory on a read-only disk,
or someone else's, stays as it was): a damaged checkpoint, or one whose arrays
fail their checksums, is skipped with a warning (the training loop, not a
reader, moves damaged ones aside). The latest checkpoint is the end of the run,
however it ended (``bpjax.rundir``): its parameters are those of the last
metrics record, part-way through an epoch too (``run.epoch`` is then a
fraction, e.g. 1.5, and ``load_run(workdir, epoch=2)`` reads it: a checkpoint
is numbered by the epoch under way). The initial parameters
need no checkpoint: they are drawn again from the run's seed exactly as
``train`` drew them. ``config`` is the recorded one with the changes its
resumes made (``--epochs`` extended, ...), i.e. the settings of the run's last part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax

from bpjax.checkpoint import checkpoint_manager, newest_intact, restore_step
from bpjax.config import Config, read_record
from bpjax.errors import CheckpointError, RunError, first_line
from bpjax.network import Net, Params
from bpjax.parallel import Placement
from bpjax.rundir import CONFIG, EVENTS, read_jsonl, read_metrics
from bpjax.training import checkpoint_meta, init_state

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclasses.dataclass(frozen=True)
class Run:
    """A run read back: its settings, per-epoch metrics, and the parameters of one epoch."""

    workdir: str
    config: Config
    sizes: tuple[int, ...]
    metrics: list[dict[str, Any]]
    events: list[dict[str, Any]]
    epoch: int | float  # where ``params`` are (0: the initial ones; 1.5: mid-epoch 2)
    params: Params  # NumPy arrays, in the run's dtype
    checkpoints: tuple[int, ...]  # the epochs with a checkpoint on disk

    @property
    def net(self) -> Net:
        """The network the params belong to (``bpjax.predict(run.net, run.params, x)``)."""
        return Net.mlp(self.sizes, self.config.activation, self.config.loss)


def _record(workdir: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``config.json`` as recorded and the run's events (none yet: ``[]``)."""
    path = os.path.join(workdir, CONFIG)
    if not os.path.isfile(path):
        raise RunError(f"no run at {workdir}: it has no {CONFIG}")
    events = os.path.join(workdir, EVENTS)
    return read_record(path), read_jsonl(events) if os.path.exists(events) else []


def _replay(record: dict[str, Any], events: list[dict[str, Any]]) -> Config:
    """The recorded settings with the changes the resumes recorded applied in order."""
    config = Config.from_json(record)
    for event in events:
        if event.get("event") == "resume":
            config = config.replace(**{k: v[1] for k, v in event.get("changed", {}).items()})
    return config


def run_config(workdir: str) -> Config:
    """The run's settings: ``config.json`` plus the changes its resumes recorded."""
    return _replay(*_record(workdir))


def load_run(workdir: str, epoch: int | None = None) -> Run:
    """The run in ``workdir`` with the parameters of ``epoch`` (default: the latest checkpoint).

    ``epoch=0`` gives the initial parameters. Raises RunError for a directory
    that holds no run, CheckpointError for an epoch without an intact checkpoint
    (the message lists the epochs there are) or a run without ``checkpoints/``.
    """
    record, events = _record(workdir)
    config = _replay(record, events)
    sizes = tuple(record["sizes"])
    checkpoints = os.path.join(workdir, "checkpoints")
    if epoch != 0 and not os.path.isdir(checkpoints):  # a reader creates nothing
        raise CheckpointError(f"no checkpoints in {workdir} (no {checkpoints}); epoch 0, the"
                              " initial parameters, needs none: load_run(workdir, epoch=0)")
    x64 = jax.enable_x64(True) if config.dtype == "float64" else contextlib.nullcontext()
    with x64:
        template = init_state(config, sizes, Placement(jax.devices("cpu")[0]))
        state, found, available = template, 0, ()
        if os.path.isdir(checkpoints):
            manager = checkpoint_manager(workdir, read_only=True)
            try:
                available = tuple(sorted(manager.all_steps()))
                if epoch != 0:
                    state, found = _restore(manager, template, checkpoint_meta(config, sizes),
                                            epoch, available)  # fmt: skip
            finally:
                manager.close()
        params = jax.device_get(state.params)
    return Run(workdir, config, sizes, read_metrics(workdir), events, found, params, available)


def _restore(manager: Any, template: Any, meta: dict[str, Any], epoch: int | None,
             available: tuple[int, ...]) -> tuple[Any, int | float]:  # fmt: skip
    if epoch is not None:
        if epoch not in available:
            have = ", ".join(map(str, available)) or "none"
            raise CheckpointError(
                f"{manager.directory} has no checkpoint of epoch {epoch} (it has: {have}; epoch 0,"
                " the initial parameters, is always there)"
            )
        return restore_step(manager, epoch, template, meta)
    def skip(e: int, err: Exception) -> None:  # a damaged checkpoint: read the one before
        warnings.warn(f"checkpoint {manager.directory}/{e} cannot be read ({type(err).__name__}:"
                      f" {first_line(err)}); using the one before it", stacklevel=5)

    found = newest_intact(manager, available, template, meta, on_damaged=skip)
    if found is not None:
        return found
    raise CheckpointError(f"{manager.directory} holds no intact checkpoint (epoch 0 does not"
                          " need one: load_run(workdir, epoch=0))")  # fmt: skip


def _labels(configs: Sequence[Config], workdirs: Sequence[str]) -> list[str]:
    """Each run named by the settings in which the runs differ (else by its directory)."""
    differ = sorted({k for c in configs for k in c.differences(configs[0], resumable=True)}
                    - {"workdir", "resume", "data_dir"})  # fmt: skip
    if not differ:
        return [os.path.basename(os.path.normpath(w)) for w in workdirs]
    fmt = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else f"{v}"  # noqa: E731
    return [", ".join(f"{k}={fmt(getattr(c, k))}" for k in differ) for c in configs]


def runs_figure(workdirs: Sequence[str]) -> Figure:
    """Test accuracy and loss of several runs, against epoch and against training time.

    Training time is the sum of the epochs' ``epoch_s`` (compilation and
    evaluation excluded). Runs without classes plot the loss only. A bare
    ``matplotlib.figure.Figure``: ``fig.savefig(path)`` or ``display(fig)``.
    """
    import numpy as np
    from matplotlib.figure import Figure

    configs = [run_config(w) for w in workdirs]
    labels = _labels(configs, workdirs)
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    for workdir, label in zip(workdirs, labels, strict=True):
        metrics = read_metrics(workdir)
        epochs = [m["epoch"] for m in metrics]
        seconds = np.cumsum([m["epoch_s"] for m in metrics])
        for row, key in enumerate(("test_accuracy", "test_loss")):
            values = [m[key] for m in metrics]
            if any(v is None for v in values):
                continue
            scale = 100 if key == "test_accuracy" else 1
            axes[row, 0].plot(epochs, np.multiply(values, scale), "o-", ms=3, label=label)
            axes[row, 1].plot(seconds, np.multiply(values, scale), "o-", ms=3, label=label)
    for row, name in enumerate(("test accuracy (%)", "test loss")):
        axes[row, 0].set(xlabel="epoch", ylabel=name)
        axes[row, 1].set(xlabel="training time (s, sum of epochs)", ylabel=name)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    return fig
