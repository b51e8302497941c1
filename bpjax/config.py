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
import json
import math
from typing import Any

from bpjax.activations import ACTIVATIONS
from bpjax.data import DATASETS
from bpjax.errors import ConfigError
from bpjax.losses import LOSSES
from bpjax.methods import METHODS, RULE_METHODS
from bpjax.network import Net
from bpjax.rules import FEEDBACK_RULES, Rule, get_rule
from bpjax.userdata import check_data_settings, data_widths, train_rows, with_data_shape
from bpjax.validation import (  # noqa: F401 - importable from here: check_*, read_record, setting
    check_batch_divides,
    check_choice,
    check_choices,
    check_hidden,
    check_positive_float,
    check_positive_int,
    check_sizes,
    check_types,
    read_record,
    setting,
    source_name,
)

OPTIMIZERS = ("sgd", "momentum", "adam")
LR_SCALINGS = ("none", "linear", "sqrt")
LR_SCHEDULES = ("constant", "warmup_constant", "cosine", "warmup_cosine")
# bfloat16 is mixed precision: float32 parameters and optimizer state (the master
# copy), matrix products in bfloat16, loss, softmax and output error (7.1) in float32.
DTYPES = ("float32", "float64", "bfloat16")
# jax.default_matmul_precision: float32 products on GPUs (TF32) and TPUs (bfloat16
# passes) are reduced by default; "highest" makes them exact float32.
MATMUL_PRECISIONS = ("default", "high", "highest")
PLATFORMS = ("cpu", "gpu", "tpu")
PARALLEL = ("sharding", "shard_map")


SEED_LIMIT = 2**32  # jax.random.key takes a 32-bit seed without x64: 2**32 would be 0 again
# Keys of a run's config.json that are not settings: what the run derived or recorded.
DERIVED_KEYS = ("sizes", "provenance", "feedback_rule", "data")


def scaled_lr(lr: float, batch: int, reference_batch: int, scaling: str) -> float:
    """``lr``, given at ``reference_batch``, scaled to ``batch``: none, linear or sqrt."""
    ratio = batch / reference_batch
    return lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[scaling]


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run depends on.

    The defaults reproduce the first document's network and update (784-500-10,
    ReLU hidden layer, softmax cross-entropy, Glorot-uniform init, plain SGD with
    lr 0.1) at batch 128; ``epochs`` is chosen to pass 98% MNIST test accuracy.
    """

    method: str = setting("manual", "How the gradient is computed.", choices=METHODS)
    feedback: str = setting(
        "bp", "The matrix (7.2) sends the error down with: " + ", ".join(FEEDBACK_RULES)
        + " (bpjax.rules), or your own bpjax.Rule as package.module:name.",
    )
    feedback_scale: bool = setting(
        False, "Scale usf/brsf/frsf's B by sqrt(2/(fan_in+fan_out)) (BioTorch's scaling_factor)."
    )
    accept_rule_change: bool = setting(
        False, "Resume or repeat a run although its --feedback module's source changed.",
        resumable=True,
    )
    kp_decay: float = setting(
        1e-4, "Kolen-Pollack: weight decay λ of W and B (--feedback=kp), pulling B to W."
    )
    batch: int = setting(128, "Mini-batch size M.")
    epochs: int = setting(40, "Passes over the training set.", resumable=True)
    lr: float = setting(0.1, "Learning rate (at --lr_reference_batch when --lr_scaling is set).")
    lr_scaling: str = setting(
        "none", "Scale --lr with the batch: linear (batch/ref) or sqrt (sqrt(batch/ref)).",
        choices=LR_SCALINGS,
    )
    lr_reference_batch: int = setting(128, "The batch size --lr is given for (--lr_scaling).")
    lr_schedule: str = setting(
        "constant", "Learning-rate schedule over the run (optax); cosine decays to 0 at the"
        " last epoch.", choices=LR_SCHEDULES,
    )
    warmup_epochs: float = setting(
        0.0, "Linear warm-up from 0 over this many epochs (warmup_* schedules)."
    )
    optimizer: str = setting("sgd", "The update rule.", choices=OPTIMIZERS)
    momentum: float = setting(0.9, "Momentum for --optimizer=momentum.")
    hidden: tuple[int, ...] = setting((500,), "Hidden widths, e.g. 500 or 256,128.")
    activation: str = setting("relu", "Hidden activation σ.", choices=tuple(ACTIVATIONS))
    loss: str = setting("softmax_cross_entropy", "Loss on the output.", choices=tuple(LOSSES))
    dataset: str = setting("mnist", f"Training data: {', '.join(DATASETS)}, or your own:"
                           " npz:PATH, csv:TRAIN,TEST, idx:DIR (README: Your own data).")
    label_column: str | None = setting(None, "csv: the label column's header (default: last).")
    standardize: bool = setting(False, "Scale inputs by the training rows' mean and std.")
    validation_examples: int = setting(0, "Hold out N training examples (seeded) for val_*.")
    target_split: str = setting("test", "The split --target_* watch.",
                                choices=("test", "validation"), resumable=True)
    accept_data_change: bool = setting(False, "Resume or repeat a run although its --dataset"
                                       " file changed.", resumable=True)  # fmt: skip
    data_shape: tuple[int, int] | None = setting(None, "The data's (n_0, n_L): filled in and"
                                                 " recorded by a run; given, checked.")
    data_dir: str | None = setting(
        None, "Directory holding the four IDX files (plain or .gz); default: cache or fetch.",
        resumable=True,
    )
    workdir: str | None = setting(
        None, "Run directory (default: a new one under runs/).", resumable=True
    )
    seed: int = setting(0, "Seed of the initial parameters, the shuffles, synthetic data.")
    dtype: str = setting(
        "float32", "Compute dtype (bfloat16: mixed precision, float32 master parameters).",
        choices=DTYPES,
    )
    matmul_precision: str = setting(
        "default", "Matrix-product precision (jax.default_matmul_precision); highest: exact"
        " float32 on GPU/TPU.", choices=MATMUL_PRECISIONS,
    )
    platform: str | None = setting(
        None, "Device kind to train on (default: what JAX picks).", choices=PLATFORMS,
        resumable=True,
    )
    resume: bool = setting(
        False, "Continue the run in --workdir with its recorded settings (start it if new).",
        resumable=True,
    )
    train_examples: int | None = setting(None, "Use only the first N training examples.")
    checkpoint_every: int = setting(
        1, "Checkpoint every N epochs (and after the last).", resumable=True
    )
    keep_checkpoints: int = setting(2, "Checkpoints kept on disk.", resumable=True)
    eval_every_steps: int = setting(
        0, "Evaluate every N steps (a divisor of the steps per epoch; 0: after each epoch)."
        " Does not change the trajectory.", resumable=True,
    )
    target_accuracy: float | None = setting(
        None, "Stop once the test accuracy reaches this fraction, e.g. 0.98.", resumable=True
    )
    target_loss: float | None = setting(
        None, "Stop once the test loss falls to this value (regression).", resumable=True
    )
    noise_scale: bool = setting(
        False, "Log the gradient noise scale B_simple per evaluation (bpjax.noise_scale).",
        resumable=True,
    )
    divergence_factor: float = setting(
        100.0, "Stop when the train or test loss exceeds this many times the loss at the"
        " start (0: never).", resumable=True,
    )
    dp_clip: float | None = setting(None, "DP-SGD: clip each example's gradient to this norm.")
    dp_noise: float = setting(0.0, "DP-SGD: Gaussian noise multiplier σ (std σ·dp_clip).")
    # Data parallelism (``bpjax.parallel``): the batch is split over ``num_devices``
    # devices; ``parallel`` picks the form: sharding annotations or explicit shard_map.
    num_devices: int = setting(
        1, "Split every batch over this many devices (0: all devices of all processes).",
        resumable=True,
    )
    parallel: str = setting(
        "sharding", "Data-parallel form.", choices=PARALLEL, resumable=True
    )
    # Several processes (hosts) training one model. How each process joins
    # (coordinator address, process id) is the launcher's business, not a setting
    # of the run: see bpjax.parallel.Cluster.
    num_processes: int = setting(1, "Processes (hosts) training together.", resumable=True)

    def __post_init__(self) -> None:
        # First the types (JSON and notebooks can send any): lists become tuples, so the
        # config stays hashable; a bool is not a number. Then the values.
        check_types(self)
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            value = getattr(self, field.name)
            if choices and not (value is None and field.default is None):
                check_choice(field.name, value, choices)
        for name in ("batch", "checkpoint_every", "keep_checkpoints", "num_processes"):
            check_positive_int(name, getattr(self, name))
        check_data_settings(self)  # bpjax.userdata: --dataset, its file's settings, validation
        self._check_sizes()
        self._check_numbers()
        self._check_schedule()
        self._check_devices()
        self._check_together()
        if self.resume and not self.workdir:
            raise ConfigError("--resume needs --workdir: the directory of the run to continue")

    @property
    def param_dtype(self) -> str:
        """The dtype of parameters and optimizer state: float32 under bfloat16 (the master copy)."""
        return "float32" if self.dtype == "bfloat16" else self.dtype

    @property
    def peak_lr(self) -> float:
        """--lr scaled to this batch by --lr_scaling (the schedule's peak)."""
        return scaled_lr(self.lr, self.batch, self.lr_reference_batch, self.lr_scaling)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Layer widths ``(n_0, *hidden, n_L)`` for the configured dataset."""
        n_in, n_out = self.data_shape or data_widths(self.dataset)
        return (n_in, *self.hidden, n_out)

    def _steps_per_epoch(self) -> float:
        """Steps per epoch on the named dataset (inf for a file: ``train`` checks its own)."""
        return min(self.train_examples or math.inf, train_rows(self)) // self.batch

    @property
    def rule(self) -> Rule:
        """The feedback rule ``feedback`` names, scaled under ``feedback_scale``."""
        return get_rule(self.feedback, scale=self.feedback_scale)

    def net(self, n_in: int | None = None, n_out: int | None = None) -> Net:
        """The network for ``n_in`` input features and ``n_out`` outputs (default: the dataset's).

        ``Net.mlp((n_in, *hidden, n_out), activation, loss)``.
        """
        sizes = self.sizes if n_in is None or n_out is None else (n_in, *self.hidden, n_out)
        return Net.mlp(sizes, self.activation, self.loss)

    def _check_sizes(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"--epochs must be a non-negative integer, got {self.epochs!r}")
        check_hidden(self.hidden)
        available = train_rows(self)
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
                f" of {self.dataset}{' left' if self.validation_examples else ''}): lower --batch"
            )

    def _check_numbers(self) -> None:
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"--seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not math.isfinite(self.divergence_factor) or self.divergence_factor < 0:
            raise ConfigError(
                f"--divergence_factor must be a finite number >= 0 (0: never stop), got "
                f"{self.divergence_factor!r}"
            )
        check_positive_float("lr", self.lr)
        if not math.isfinite(self.kp_decay) or self.kp_decay < 0:
            raise ConfigError(f"--kp_decay must be a finite number >= 0, got {self.kp_decay!r}")
        if not math.isfinite(self.momentum) or not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum!r}")
        if self.dp_clip is not None:
            check_positive_float("dp_clip", self.dp_clip)
        if not math.isfinite(self.dp_noise) or self.dp_noise < 0:
            raise ConfigError(f"--dp_noise must be a finite number >= 0, got {self.dp_noise!r}")
        if self.dp_noise > 0 and self.dp_clip is None:
            raise ConfigError("--dp_noise needs --dp_clip: noise is calibrated to the clip norm")

    def _check_devices(self) -> None:
        if self.num_devices < 0:
            raise ConfigError(
                f"--num_devices must be a positive integer, or 0 for all devices, got "
                f"{self.num_devices!r}"
            )
        if self.num_devices:  # 0 (all devices) is checked once the devices are known
            check_batch_divides(self.batch, self.num_devices)
        if self.platform == "tpu" and self.dtype == "float64":
            raise ConfigError(
                "--dtype=float64 on --platform=tpu: TPUs have no native float64 (JAX would"
                " emulate it, slowly); use --dtype=float32 or bfloat16"
            )
        if self.parallel == "shard_map" and self.dp_clip is not None:
            raise ConfigError(
                "--parallel=shard_map does not do DP-SGD (its noise must be drawn once per"
                " batch, not per device): use --parallel=sharding with --dp_clip"
            )

    def _check_schedule(self) -> None:
        """The learning-rate schedule, evaluation cadence and stopping targets."""
        check_positive_int("lr_reference_batch", self.lr_reference_batch)
        if not math.isfinite(self.warmup_epochs) or not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(
                f"--warmup_epochs must be in [0, --epochs={self.epochs}], got"
                f" {self.warmup_epochs!r}"
            )
        if self.warmup_epochs and not self.lr_schedule.startswith("warmup"):
            raise ConfigError(
                f"--warmup_epochs={self.warmup_epochs} needs a warm-up schedule:"
                " --lr_schedule=warmup_constant or warmup_cosine"
            )
        steps = self._steps_per_epoch()  # optax's cosine needs a step left after the warm-up
        if self.lr_schedule == "warmup_cosine" and steps < math.inf and round(
                self.warmup_epochs * steps) >= max(
            self.epochs * steps, 1
        ):
            raise ConfigError(
                f"--warmup_epochs={self.warmup_epochs} leaves warmup_cosine no step of"
                f" --epochs={self.epochs} to decay over: lower --warmup_epochs or raise --epochs"
            )
        every = self.eval_every_steps
        if every < 0:
            raise ConfigError(
                f"--eval_every_steps must be 0 (each epoch) or a positive integer, got {every!r}"
            )
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError(
                f"--target_accuracy is a fraction in (0, 1], e.g. 0.98, got"
                f" {self.target_accuracy!r}"
            )
        if self.target_loss is not None:
            check_positive_float("target_loss", self.target_loss)

    def _check_together(self) -> None:
        """Settings that are valid alone but cannot work together."""
        self.rule  # noqa: B018 - a known name, or an import path that imports (one line if not)
        if self.feedback != "bp" and self.method not in RULE_METHODS:
            raise ConfigError(
                f"--method={self.method} computes the true gradient with jax.grad; "
                f"--feedback={self.feedback} needs a hand-written backward: "
                f"--method={', '.join(RULE_METHODS)}"
            )

        if self.noise_scale and (self.dp_clip is not None or self.parallel == "shard_map"):
            raise ConfigError(
                "--noise_scale measures the plain gradient's noise: not with --dp_clip or"
                " --parallel=shard_map"
            )
        if self.noise_scale and self.batch < 2:
            raise ConfigError(
                "--noise_scale needs --batch >= 2: B_simple compares the examples' own"
                " gradients with their mean, which at --batch=1 are the same"
            )
        if self.data_dir is not None and self.dataset == "regression":
            raise ConfigError(
                "--data_dir holds the IDX files of an image dataset; --dataset=regression is"
                " generated from --seed and reads none: drop --data_dir"
            )
        if self.target_accuracy is not None and self.dataset == "regression":
            raise ConfigError(
                "--target_accuracy needs classes; the regression task has none: use --target_loss"
            )
        if self.dataset == "regression" and self.loss == "softmax_cross_entropy":
            raise ConfigError(
                "--dataset=regression has real-valued targets, which softmax cross-entropy"
                " cannot fit: use --loss=squared_error"
            )
        if self.num_processes > 1:
            if self.num_devices % self.num_processes:
                raise ConfigError(
                    f"--num_devices={self.num_devices} does not split over --num_processes="
                    f"{self.num_processes}: every process gives the same number of devices (or"
                    " use --num_devices=0 for all of them)"
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

    def to_json(self) -> str:
        """The settings as JSON (``from_json`` reads it back to an equal config)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, source: str | dict[str, Any], **changes: Any) -> Config:
        """A config from JSON text, a parsed dict, or a run's ``config.json`` (file or workdir).

        The keys a run records beside its settings (``DERIVED_KEYS``: sizes,
        provenance) are ignored; any other unknown key is an error, so a misspelt
        setting cannot be silently dropped. Every value is checked for its type
        (a JSON list becomes a tuple). ``workdir`` and ``resume`` are read as
        recorded; ``changes`` replace recorded values before any check
        (``launch.py --config`` clears both: a repeat is a new run).
        """
        record = with_data_shape(read_record(source) if isinstance(source, str) else dict(source))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - fields - set(DERIVED_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown settings {', '.join(unknown)} in {source_name(source)}: not fields"
                " of bpjax.Config (written by another version of bpjax?)"
            )
        try:
            return cls(**{k: v for k, v in record.items() if k in fields} | changes)
        except ConfigError as e:
            raise ConfigError(f"{e} (in {source_name(source)})") from None

    def differences(self, other: Config, *, resumable: bool = False) -> dict[str, tuple]:
        """``{field: (self's value, other's value)}`` where they differ.

        With ``resumable=False`` only the fields a resume may not change count, and
        ``epochs`` does under a cosine schedule (it decays over the run's epochs, so
        more epochs change every step's learning rate).
        """
        fixed = lambda f: not f.metadata.get("resumable") or (  # noqa: E731
            f.name == "epochs" and "cosine" in self.lr_schedule
        )
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if (resumable or fixed(f)) and getattr(self, f.name) != getattr(other, f.name)
            and not (f.name == "data_shape" and other.data_shape is None)  # not given: filled in
        }
