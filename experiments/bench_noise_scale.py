r"""The cost of the gradient noise scale's statistics inside a training step.

    python experiments/bench_noise_scale.py
    python experiments/bench_noise_scale.py --methods=manual --batches=128 --min_time_s=5

times, on ``bpjax.Config``'s network (784-500-10 ReLU, float32), the jitted SGD step
of the training loop (``train_step`` with ``optax.sgd`` over a ``TrainState``, state
donated, as ``bpjax.bench.steps.sgd_step`` builds it) against the same step whose
gradient comes from ``bpjax.noise_stats_grad_fn`` (gradient plus ``NoiseStats``,
returned with the step's metrics), the two interleaved (``compare_fns``) per
method and batch size; compile time apart, median of the rounds. ``overhead`` is
stats median / plain median - 1. ``"manual"`` reads the statistics off section 7's
own factors; ``"autodiff"`` adds ``privacy.per_sample_errors`` (the generic route).
About a minute on a 2-core CPU; prints one table (``--out`` also writes JSON).

This is a benchmark, not a test: nothing here fails on a slow number.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from bpjax import cli
from bpjax.bench.report import write_json
from bpjax.bench.steps import random_batch, sgd_state
from bpjax.bench.timing import compare_fns, machine_line
from bpjax.config import Config, check_positive_int, check_sizes, setting
from bpjax.errors import ConfigError
from bpjax.methods import METHODS
from bpjax.network import Net, init_params
from bpjax.training import make_train_step, run_epoch

NET = Config()  # the network, activation, loss and lr of a training run


@dataclasses.dataclass(frozen=True)
class NoiseScaleBench:
    sizes: tuple[int, ...] = setting(NET.sizes, "Layer widths n_0,...,n_L.")
    batches: tuple[int, ...] = setting((128, 1024), "Batch sizes (at least 2).")
    methods: tuple[str, ...] = setting(("manual", "autodiff"), "Gradient methods.")
    repeats: int = setting(20, "Timed rounds per batch and method (at least).")
    min_time_s: float = setting(3.0, "Timed seconds per batch, method and step/epoch (at least).")
    epoch_examples: int = setting(8192, "Examples in the timed epoch (run_epoch's lax.scan).")
    out: str = setting("", "JSON output path ('' = none).")

    def __post_init__(self) -> None:
        check_sizes(self.sizes)
        for batch in self.batches:
            if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
                raise ConfigError(f"--batches must be integers >= 2 (M - 1 > 0), got {batch!r}")
        check_positive_int("repeats", self.repeats)
        if unknown := set(self.methods) - set(METHODS):
            raise ConfigError(f"--methods: unknown {sorted(unknown)}, choose from {METHODS}")


cli.define_flags(NoiseScaleBench)


def sgd_steps(method: str, *, sizes: tuple[int, ...], activation: str, loss: str,
              lr: float) -> dict[str, Callable]:  # fmt: skip
    """``{"plain", "stats"}``: the training loop's SGD step, ``(state, x, y, key)``.

    ``make_train_step`` of a run without and with ``noise_scale``: ``plain`` takes its
    gradient from ``grad_fn(method)``, ``stats`` from ``noise_stats_grad_fn(method)``,
    its ``NoiseStats`` in the metrics. (Compiled without ``step.compiler_options``.)
    """
    config = Config(method=method, activation=activation, loss=loss, lr=lr)
    net = Net.mlp(sizes, activation, loss)
    return {name: make_train_step(config.replace(noise_scale=stats), net=net)
            for name, stats in (("plain", False), ("stats", True))}  # fmt: skip


def _data(n: int, sizes: tuple[int, ...], seed: int) -> tuple[Any, Any]:
    x, y = random_batch(sizes, n, np.random.default_rng(seed))
    return jax.device_put((x, y))


def bench(s: NoiseScaleBench) -> list[dict[str, Any]]:
    """Rows ``{batch, method, what, plain: Timing dict, stats: Timing dict, overhead}``."""
    net = dict(activation=NET.activation, loss=NET.loss, lr=NET.lr)
    params = init_params(jax.random.key(0), s.sizes)
    fresh = lambda: sgd_state(jax.tree.map(lambda a: a.copy(), params))  # noqa: E731
    x_epoch, y_epoch = _data(s.epoch_examples, s.sizes, 0)
    rows = []
    for batch in s.batches:
        x, y = _data(batch, s.sizes, batch)
        for method in s.methods:
            steps = sgd_steps(method, sizes=s.sizes, **net)
            epochs = {k: functools.partial(run_epoch, step_fn=f, batch=batch)
                      for k, f in steps.items()}  # fmt: skip
            cases = {
                "step": {k: (jax.jit(f, donate_argnums=0), (fresh(), x, y, None))
                         for k, f in steps.items()},
                "epoch": {k: (jax.jit(f, donate_argnums=0),
                              (fresh(), x_epoch, y_epoch, jax.random.key(1)))
                          for k, f in epochs.items()},
            }  # fmt: skip
            for what, fns in cases.items():
                t = compare_fns(fns, repeats=s.repeats, warmup=3, carry=True,
                                min_time_s=s.min_time_s)  # fmt: skip
                rows.append({
                    "batch": batch, "method": method, "what": what,
                    **{k: v.as_dict() for k, v in t.items()},
                    "overhead": t["stats"].median_s / t["plain"].median_s - 1,
                    "cpu_overhead": t["stats"].cpu_median_s / t["plain"].cpu_median_s - 1,
                })  # fmt: skip
                print(_line(rows[-1]), flush=True)
    return rows


HEADER = (f"{'batch':>5} {'method':9} {'what':5} {'plain ms':>9} {'stats ms':>9} {'overhead':>9} "
          f"{'cpu overhead':>12} {'spread p/s':>11} {'repeats':>7}")  # fmt: skip


def _line(r: dict[str, Any]) -> str:
    p, st = r["plain"], r["stats"]
    return (f"{r['batch']:5d} {r['method']:9} {r['what']:5} {p['median_s'] * 1e3:9.3f} "
            f"{st['median_s'] * 1e3:9.3f} {r['overhead']:+9.1%} {r['cpu_overhead']:+12.1%} "
            f"{p['spread']:5.2f}/{st['spread']:<5.2f} {p['repeats']:7d}")  # fmt: skip


def main(argv: Sequence[str]) -> None:
    del argv
    settings = cli.from_flags(NoiseScaleBench)
    print(machine_line(settings.sizes))
    print("overhead = step with noise stats / plain step - 1 (medians, interleaved)")
    print(HEADER)
    rows = bench(settings)
    if settings.out:
        write_json(settings.out, settings, rows)
        print(f"wrote {settings.out}")


if __name__ == "__main__":
    cli.run(main)
