"""One frozen configuration for a training run; flag names equal field names.

Frozen, so it is hashable (a valid ``jax.jit`` static argument) and a notebook
cell cannot change a config a jitted closure already captured. Every field is
validated in ``__post_init__``, so a notebook user gets the same one-line
errors as the command line.
"""

from __future__ import annotations

import dataclasses
import math

from bpjax.activations import ACTIVATIONS
from bpjax.losses import LOSSES
from bpjax.methods import METHODS

OPTIMIZERS = ("sgd", "momentum", "adam")
DATASETS = ("mnist", "fashion_mnist", "regression")
DTYPES = ("float32", "float64")
PLATFORMS = ("cpu", "gpu", "tpu")
PARALLEL = ("sharding", "shard_map")
TRAIN_SIZES = {"mnist": 60000, "fashion_mnist": 60000, "regression": 10000}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run depends on.

    The defaults reproduce the first document's network and update (784-500-10,
    ReLU hidden layer, softmax cross-entropy, Glorot-uniform init, plain SGD with
    lr 0.1) at batch 128; ``epochs`` is chosen to pass 98% MNIST test accuracy.
    """

    method: str = "manual"
    batch: int = 128
    epochs: int = 40
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    hidden: tuple[int, ...] = (500,)
    activation: str = "relu"
    loss: str = "softmax_cross_entropy"
    dataset: str = "mnist"
    data_dir: str | None = None
    workdir: str | None = None
    seed: int = 0
    dtype: str = "float32"
    platform: str | None = None
    resume: bool = False
    train_examples: int | None = None
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    dp_clip: float | None = None
    dp_noise: float = 0.0
    # Data parallelism (``bpjax.parallel``): the batch is split over ``num_devices``
    # devices (0: all the devices JAX sees, in all processes); ``parallel`` picks
    # the form: sharding annotations or the explicit shard_map program.
    num_devices: int = 1
    parallel: str = "sharding"
    # Several processes (hosts) training one model; launch.py passes these to
    # jax.distributed.initialize. Without coordinator_address, JAX detects the
    # cluster (TPU pod slice, SLURM, Open MPI).
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self) -> None:
        # Lists from a notebook become tuples, so the config stays hashable.
        object.__setattr__(self, "hidden", tuple(self.hidden))
        _choice("method", self.method, METHODS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("activation", self.activation, tuple(ACTIVATIONS))
        _choice("loss", self.loss, tuple(LOSSES))
        _choice("dataset", self.dataset, DATASETS)
        _choice("dtype", self.dtype, DTYPES)
        if self.platform is not None:
            _choice("platform", self.platform, PLATFORMS)
        _positive_int("batch", self.batch)
        _positive_int("checkpoint_every", self.checkpoint_every)
        _positive_int("keep_checkpoints", self.keep_checkpoints)
        if isinstance(self.num_devices, bool) or not isinstance(self.num_devices, int) or (
            self.num_devices < 0
        ):
            raise ConfigError(
                f"--num_devices must be a positive integer, or 0 for all devices, got "
                f"{self.num_devices!r}"
            )
        _choice("parallel", self.parallel, PARALLEL)
        _positive_int("num_processes", self.num_processes)
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"--epochs must be a non-negative integer, got {self.epochs!r}")
        if self.train_examples is not None:
            _positive_int("train_examples", self.train_examples)
            if self.train_examples < self.batch:
                raise ConfigError(
                    f"--batch={self.batch} is larger than --train_examples={self.train_examples}:"
                    " lower --batch or use more examples"
                )
        available = min(self.train_examples or TRAIN_SIZES[self.dataset], TRAIN_SIZES[self.dataset])
        if self.batch > available:
            raise ConfigError(
                f"--batch={self.batch} is larger than the training set ({available} examples"
                f" of {self.dataset}): lower --batch"
            )
        if any(not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ConfigError(
                f"--hidden must be a comma list of positive widths like 500 or 256,128, "
                f"got {self.hidden!r}"
            )
        _positive_float("lr", self.lr)
        if not math.isfinite(self.momentum) or not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum!r}")
        if self.dp_clip is not None:
            _positive_float("dp_clip", self.dp_clip)
        if not math.isfinite(self.dp_noise) or self.dp_noise < 0:
            raise ConfigError(f"--dp_noise must be a finite number >= 0, got {self.dp_noise!r}")
        if self.dp_noise > 0 and self.dp_clip is None:
            raise ConfigError("--dp_noise needs --dp_clip: noise is calibrated to the clip norm")
        if self.num_devices:  # 0 (all devices) is checked once the devices are known
            check_batch_divides(self.batch, self.num_devices)
        self._check_processes()
        if self.parallel == "shard_map" and self.dp_clip is not None:
            raise ConfigError(
                "--parallel=shard_map does not do DP-SGD (its noise must be drawn once per"
                " batch, not per device): use --parallel=sharding with --dp_clip"
            )
        if self.resume and not self.workdir:
            raise ConfigError("--resume needs --workdir: the directory of the run to continue")

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

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_batch_divides(batch: int, num_devices: int, over: str | None = None) -> None:
    """Every device gets batch / num_devices rows: the batch must divide.

    ``over`` names the devices in the error (default ``--num_devices=N``).
    """
    if batch % num_devices:
        raise ConfigError(
            f"--batch={batch} does not divide over {over or f'--num_devices={num_devices}'}:"
            f" use a batch that is a multiple of {num_devices}"
        )


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{name}={value!r} is not one of: {', '.join(choices)}")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--{name} must be a positive integer, got {value!r}")


def _positive_float(name: str, value: object) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--{name} must be a finite number > 0, got {value!r}")
