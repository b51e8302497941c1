"""The settings of a batch-size sweep (``SweepConfig``), apart from the sweep itself.

``bpjax.bench.sweep`` runs a sweep, ``bench.measure`` measures one configuration of it
and ``bench.report`` writes it up; all three read these settings, so they live here,
below all three (no module imports one that imports it back).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Iterable, Mapping
from typing import Any

import jax

from bpjax.activations import ACTIVATIONS
from bpjax.bench.peers import PEERS
from bpjax.config import (
    DTYPES,
    MATMUL_PRECISIONS,
    PLATFORMS,
    Config,
    ConfigError,
    check_choice,
    check_choices,
    check_positive_float,
    check_positive_int,
    check_sizes,
    setting,
)
from bpjax.losses import LOSSES
from bpjax.methods import METHODS

_BASE = Config()  # the network and the update of a training run: the sweep's defaults
DEFAULT_BATCHES = tuple(2**k for k in range(14))  # 1, 2, 4, ..., 8192
ISOLATE = ("auto", "always", "never")


def _parse_max_batch(items: Iterable[str]) -> tuple[tuple[str, int], ...]:
    """``["per_sample=1024", ...]`` (the command line) -> ``(("per_sample", 1024), ...)``."""
    pairs = []
    for item in items:
        method, _, batch = item.partition("=")
        if not batch.strip().isdigit():
            raise ConfigError(
                f"--max_batch_per_method takes method=batch pairs (per_sample=1024), got {item!r}"
            )
        pairs.append((method.strip(), int(batch)))
    return tuple(pairs)


def _format_max_batch(pairs: Iterable[tuple[str, int]]) -> list[str]:
    return [f"{method}={batch}" for method, batch in pairs]


def _ints(name: str, values: Iterable[Any]) -> tuple[int, ...]:
    try:
        return tuple(operator.index(v) for v in values)
    except TypeError:
        raise ConfigError(f"--{name} must be a list of integers, got {values!r}") from None


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What to sweep. Frozen (hashable); ``bpjax.cli.define_flags`` makes each field a flag."""

    sizes: tuple[int, ...] = setting(_BASE.sizes, "Layer widths n_0,...,n_L.")
    batches: tuple[int, ...] = setting(DEFAULT_BATCHES, "Batch sizes M, each timed per method.")
    methods: tuple[str, ...] = setting(METHODS, "JAX gradient methods to time.", choices=METHODS)
    platforms: tuple[str, ...] | None = setting(
        None, "JAX platforms to run on (default: every one JAX finds).", choices=PLATFORMS
    )
    repeats: int = setting(10, "Timed (interleaved) rounds per batch size, at least.")
    warmup: int = setting(2, "Untimed rounds first.")
    min_time_s: float = setting(
        1.0, "More rounds until this many seconds were timed per batch size (stable medians)."
    )
    dtype: str = setting(
        _BASE.dtype, "Compute dtype, as a training run's (bfloat16: mixed precision, float32"
        " params; float64 needs --jax_enable_x64).", choices=DTYPES,
    )
    matmul_precision: str = setting(
        _BASE.matmul_precision, "Matrix-product precision every timed function is compiled"
        " with (jax.default_matmul_precision).", choices=MATMUL_PRECISIONS,
    )
    seed: int = setting(_BASE.seed, "Seed of the params and the data.")
    lr: float = setting(_BASE.lr, "SGD learning rate of the step.")
    activation: str = setting(_BASE.activation, "Hidden activation σ.", choices=tuple(ACTIVATIONS))
    loss: str = setting(_BASE.loss, "Loss on the output.", choices=tuple(LOSSES))
    device_counts: tuple[int, ...] = setting(
        (1,), "Device counts D to run the JAX methods on, data parallel when D > 1 (e.g. 1,2,4,8;"
        " on a CPU host with XLA_FLAGS=--xla_force_host_platform_device_count=8)."
    )
    peers: tuple[str, ...] = setting(
        PEERS, "Host peers timed on CPU at D = 1 with relu + softmax cross-entropy (torch when"
        " importable); empty for none.", choices=PEERS
    )
    max_batch_per_method: tuple[tuple[str, int], ...] = dataclasses.field(
        default=(("per_sample", 1024),),
        metadata={"help": "method=largest_batch pairs (a dict in Python); larger batches are"
                  " recorded as skipped.", "parse": _parse_max_batch, "format": _format_max_batch},
    )  # fmt: skip
    isolate: str = setting(
        "auto", "One process per configuration: auto = where the backend reports peak memory.",
        choices=ISOLATE,
    )
    matmul_max_n: int = setting(8192, "Largest square matmul tried for the peak reference.")
    out_dir: str = setting("experiments/results", "Where write_results puts JSON, CSV and PNG.")

    def __post_init__(self) -> None:
        # Lists and dicts from a notebook become tuples, so the config stays hashable.
        for name in ("sizes", "batches", "device_counts"):
            object.__setattr__(self, name, _ints(name, getattr(self, name)))
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "peers", tuple(self.peers))
        if self.platforms is not None:
            object.__setattr__(self, "platforms", tuple(self.platforms))
        mb = self.max_batch_per_method
        items = mb.items() if isinstance(mb, Mapping) else mb
        object.__setattr__(self, "max_batch_per_method",
                           tuple(sorted((str(k), int(v)) for k, v in items)))  # fmt: skip
        self._check_axes()
        self._check_settings()

    def _check_axes(self) -> None:
        check_sizes(self.sizes)
        for name in ("batches", "device_counts"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"--{name} must name at least one value")
            for v in values:
                check_positive_int(name, v)
            if len(set(values)) != len(values):
                raise ConfigError(f"--{name} must not repeat, got {values}")
        check_choices("methods", self.methods, METHODS)
        if self.peers:
            check_choices("peers", self.peers, PEERS)
        if self.platforms is not None:
            check_choices("platforms", self.platforms, PLATFORMS)
        if self.max_batch_per_method:
            limited = tuple(m for m, _ in self.max_batch_per_method)
            check_choices("max_batch_per_method", limited, METHODS + PEERS)

    def _check_settings(self) -> None:
        for name in ("dtype", "matmul_precision", "activation", "loss", "isolate"):
            choices = self.__dataclass_fields__[name].metadata["choices"]
            check_choice(name, getattr(self, name), choices)
        check_positive_int("repeats", self.repeats)
        check_positive_int("matmul_max_n", self.matmul_max_n)
        check_positive_float("lr", self.lr)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"--warmup must be an integer >= 0, got {self.warmup!r}")
        if not math.isfinite(self.min_time_s) or self.min_time_s < 0:
            raise ConfigError(f"--min_time_s must be a finite number >= 0, got {self.min_time_s!r}")
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ConfigError("--dtype=float64 needs jax_enable_x64 (--jax_enable_x64)")

    param_dtype = Config.param_dtype  # a training run's: float32 under bfloat16 (master copy)

    def max_batch(self, method: str) -> int | None:
        """The largest batch ``method`` is timed at, or None for no limit."""
        return dict(self.max_batch_per_method).get(method)


# ---------------------------------------------------------------------------
# The sweep.
