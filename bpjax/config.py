"""One frozen configuration for a training run; flag names equal field names.

Frozen, so it is hashable (a valid ``jax.jit`` static argument) and a notebook
cell cannot change a config a jitted closure already captured. Every field is
validated in ``__post_init__``, so a notebook user gets the same one-line
errors as the command line. Each field carries its help text and, where the
values are a fixed list, its choices (``setting(...)``): ``bpjax.cli`` turns
those into absl flags, so ``--help`` lists them.

The lists of allowed values live where the values are defined (``METHODS`` in
``methods``, ``DATASETS`` in ``data``, ...); this module holds only the ones
that are settings and nothing else (optimizers, dtypes, platforms).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from bpjax.activations import ACTIVATIONS
from bpjax.data import DATASETS, dataset_shape
from bpjax.errors import ConfigError
from bpjax.losses import LOSSES
from bpjax.methods import METHODS
from bpjax.parallel import check_batch_divides

OPTIMIZERS = ("sgd", "momentum", "adam")
DTYPES = ("float32", "float64")
PLATFORMS = ("cpu", "gpu", "tpu")
PARALLEL = ("sharding", "shard_map")


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its flag help and allowed values (read by ``bpjax.cli``)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run depends on.

    The defaults reproduce the first document's network and update (784-500-10,
    ReLU hidden layer, softmax cross-entropy, Glorot-uniform init, plain SGD with
    lr 0.1) at batch 128; ``epochs`` is chosen to pass 98% MNIST test accuracy.
    """

    method: str = setting("manual", "How the gradient is computed.", choices=METHODS)
    batch: int = setting(128, "Mini-batch size M.")
    epochs: int = setting(40, "Passes over the training set.")
    lr: float = setting(0.1, "Learning rate.")
    optimizer: str = setting("sgd", "The update rule.", choices=OPTIMIZERS)
    momentum: float = setting(0.9, "Momentum for --optimizer=momentum.")
    hidden: tuple[int, ...] = setting((500,), "Hidden widths, e.g. 500 or 256,128.")
    activation: str = setting("relu", "Hidden activation σ.", choices=tuple(ACTIVATIONS))
    loss: str = setting("softmax_cross_entropy", "Loss on the output.", choices=tuple(LOSSES))
    dataset: str = setting("mnist", "Training data.", choices=DATASETS)
    data_dir: str | None = setting(
        None, "Directory holding the four IDX files (plain or .gz); default: cache or fetch."
    )
    workdir: str | None = setting(None, "Run directory (default: a new one under runs/).")
    seed: int = setting(0, "Seed of the initial parameters, the shuffles, synthetic data.")
    dtype: str = setting("float32", "Parameter and data dtype.", choices=DTYPES)
    platform: str | None = setting(
        None, "Device kind to train on (default: what JAX picks).", choices=PLATFORMS
    )
    resume: bool = setting(False, "Continue the run in --workdir from its latest checkpoint.")
    train_examples: int | None = setting(None, "Use only the first N training examples.")
    checkpoint_every: int = setting(1, "Checkpoint every N epochs (and after the last).")
    keep_checkpoints: int = setting(2, "Checkpoints kept on disk.")
    dp_clip: float | None = setting(None, "DP-SGD: clip each example's gradient to this norm.")
    dp_noise: float = setting(0.0, "DP-SGD: Gaussian noise multiplier σ (std σ·dp_clip).")
    # Data parallelism (``bpjax.parallel``): the batch is split over ``num_devices``
    # devices; ``parallel`` picks the form: sharding annotations or explicit shard_map.
    num_devices: int = setting(
        1, "Split every batch over this many devices (0: all devices of all processes)."
    )
    parallel: str = setting("sharding", "Data-parallel form.", choices=PARALLEL)
    # Several processes (hosts) training one model; launch.py passes these to
    # jax.distributed.initialize. Without coordinator_address, JAX detects the
    # cluster (TPU pod slice, SLURM, Open MPI).
    coordinator_address: str | None = setting(
        None, "HOST:PORT of process 0 for --num_processes > 1 (default: detected)."
    )
    num_processes: int = setting(1, "Processes (hosts) training together.")
    process_id: int = setting(0, "This process's index in [0, num_processes).")

    def __post_init__(self) -> None:
        # Lists from a notebook become tuples, so the config stays hashable.
        object.__setattr__(self, "hidden", tuple(self.hidden))
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            value = getattr(self, field.name)
            if choices and not (value is None and field.default is None):
                check_choice(field.name, value, choices)
        for name in ("batch", "checkpoint_every", "keep_checkpoints", "num_processes"):
            check_positive_int(name, getattr(self, name))
        self._check_sizes()
        self._check_numbers()
        self._check_devices()
        self._check_processes()
        if self.resume and not self.workdir:
            raise ConfigError("--resume needs --workdir: the directory of the run to continue")

    @property
    def sizes(self) -> tuple[int, ...]:
        """Layer widths ``(n_0, *hidden, n_L)`` for the configured dataset."""
        shape = dataset_shape(self.dataset)
        return (shape.n_in, *self.hidden, shape.n_out)

    def _check_sizes(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"--epochs must be a non-negative integer, got {self.epochs!r}")
        check_hidden(self.hidden)
        available = dataset_shape(self.dataset).n_train
        if self.train_examples is not None:
            check_positive_int("train_examples", self.train_examples)
            if self.train_examples < self.batch:
                raise ConfigError(
                    f"--batch={self.batch} is larger than --train_examples={self.train_examples}:"
                    " lower --batch or use more examples"
                )
            available = min(self.train_examples, available)
        if self.batch > available:
            raise ConfigError(
                f"--batch={self.batch} is larger than the training set ({available} examples"
                f" of {self.dataset}): lower --batch"
            )

    def _check_numbers(self) -> None:
        check_positive_float("lr", self.lr)
        if not math.isfinite(self.momentum) or not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum!r}")
        if self.dp_clip is not None:
            check_positive_float("dp_clip", self.dp_clip)
        if not math.isfinite(self.dp_noise) or self.dp_noise < 0:
            raise ConfigError(f"--dp_noise must be a finite number >= 0, got {self.dp_noise!r}")
        if self.dp_noise > 0 and self.dp_clip is None:
            raise ConfigError("--dp_noise needs --dp_clip: noise is calibrated to the clip norm")

    def _check_devices(self) -> None:
        if isinstance(self.num_devices, bool) or not isinstance(self.num_devices, int) or (
            self.num_devices < 0
        ):
            raise ConfigError(
                f"--num_devices must be a positive integer, or 0 for all devices, got "
                f"{self.num_devices!r}"
            )
        if self.num_devices:  # 0 (all devices) is checked once the devices are known
            check_batch_divides(self.batch, self.num_devices)
        if self.parallel == "shard_map" and self.dp_clip is not None:
            raise ConfigError(
                "--parallel=shard_map does not do DP-SGD (its noise must be drawn once per"
                " batch, not per device): use --parallel=sharding with --dp_clip"
            )

    def _check_processes(self) -> None:
        if isinstance(self.process_id, bool) or not isinstance(self.process_id, int) or not (
            0 <= self.process_id < self.num_processes
        ):
            raise ConfigError(
                f"--process_id must be in [0, --num_processes={self.num_processes}), got "
                f"{self.process_id!r}"
            )
        if self.num_processes == 1:
            if self.coordinator_address is not None:
                raise ConfigError(
                    "--coordinator_address needs --num_processes > 1: the number of processes"
                    " that train together"
                )
            return
        if self.coordinator_address is None and self.process_id:
            raise ConfigError(
                "--process_id needs --coordinator_address (without it, JAX takes the process"
                " ids from the cluster environment)"
            )
        if self.num_devices % self.num_processes:
            raise ConfigError(
                f"--num_devices={self.num_devices} does not split over --num_processes="
                f"{self.num_processes}: every process gives the same number of devices (or use"
                " --num_devices=0 for all of them)"
            )
        if not self.workdir:
            raise ConfigError(
                f"--num_processes={self.num_processes} needs --workdir: one directory all"
                " processes can reach (a shared filesystem across hosts)"
            )

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------- shared validators
# Used by Config and by the benchmarks' settings, so a value means and is checked
# the same everywhere.


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{name}={value!r} is not one of: {', '.join(choices)}")


def check_choices(name: str, values: tuple[str, ...], choices: tuple[str, ...]) -> None:
    """Every one of ``values`` (a list flag) is in ``choices``, and there is at least one."""
    bad = [v for v in values if v not in choices]
    if bad or not values:
        raise ConfigError(
            f"--{name}={','.join(map(str, values))!r}: {', '.join(map(repr, bad)) or 'empty'}"
            f" is not one of: {', '.join(choices)}"
        )


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--{name} must be a positive integer, got {value!r}")


def check_positive_float(name: str, value: object) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--{name} must be a finite number > 0, got {value!r}")


def check_hidden(hidden: tuple[int, ...], name: str = "hidden") -> None:
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise ConfigError(
            f"--{name} must be a comma list of positive widths like 500 or 256,128, "
            f"got {hidden!r}"
        )


def check_sizes(sizes: tuple[int, ...]) -> None:
    """Layer widths ``(n_0, ..., n_L)``: at least two, all positive."""
    if len(sizes) < 2:
        raise ConfigError(f"--sizes must be at least two widths n_0,...,n_L, got {sizes!r}")
    check_hidden(sizes, name="sizes")
