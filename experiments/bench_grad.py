r"""jit(manual_grad) against jit(jax.grad), paired in one process.

    python experiments/bench_grad.py

times, on ``bpjax.Config``'s network (784-500-10) at batch 1, 128, 512, 2048
and 8192, the gradient alone (``bpjax.methods.grad_fn(net, "manual")`` against
``"autodiff"``) and the full training step (``bpjax.bench.steps.sgd_step``:
gradient + SGD update, state donated), the two methods interleaved so machine
noise hits both alike; compile time apart, median of the repeats. It prints one
table and writes ``experiments/results/bench_grad.json``. About 1.5 minutes on
a quiet 2-core CPU. The floor it checks: manual is never slower (ratio
autodiff/manual >= 1.00 at every batch).

    --dump_hlo=/tmp/hlo   writes both methods' optimised HLO per batch size
                          (``jax.jit(f).lower(...).compile().as_text()``).

This is a benchmark, not a test: nothing here fails on a slow number.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from bpjax import cli
from bpjax.bench.report import write_json
from bpjax.bench.steps import random_batch, sgd_state, sgd_step, step_flops
from bpjax.bench.timing import compare_fns, machine_line
from bpjax.config import Config, check_positive_int, check_sizes, setting
from bpjax.methods import grad_fn
from bpjax.network import Net, init_params
from bpjax.step import compiler_options

NET = Config()  # the network, activation, loss and lr of a training run
METHODS = ("manual", "autodiff")


@dataclasses.dataclass(frozen=True)
class GradBench:
    sizes: tuple[int, ...] = setting(NET.sizes, "Layer widths n_0,...,n_L.")
    batches: tuple[int, ...] = setting((1, 128, 512, 2048, 8192), "Batch sizes.")
    repeats: int = setting(20, "Timed rounds per batch (at least).")
    min_time_s: float = setting(2.0, "Timed seconds per batch and pair (at least).")
    out: str = setting("experiments/results/bench_grad.json", "JSON output ('' = none).")
    dump_hlo: str = setting("", "Directory for the optimised HLO of both methods ('' = none).")

    def __post_init__(self) -> None:
        check_sizes(self.sizes)
        for batch in self.batches:
            check_positive_int("batches", batch)
        check_positive_int("repeats", self.repeats)


cli.define_flags(GradBench)


def _dump_hlo(directory: str, batch: int, fns: dict[str, tuple[Any, tuple]]) -> None:
    os.makedirs(directory, exist_ok=True)
    for m, (f, args) in fns.items():
        with open(os.path.join(directory, f"{m}_grad_{batch}.hlo"), "w") as fh:
            fh.write(f.lower(*args).compile().as_text())


def bench(s: GradBench) -> list[dict[str, Any]]:
    """Rows ``{batch, what, method: Timing dict, ratio}`` for gradient and step."""
    net = Net.mlp(s.sizes, NET.activation, NET.loss)
    params = init_params(jax.random.key(0), net)
    rows = []
    for batch in s.batches:
        x, y = jax.device_put(random_batch(s.sizes, batch, np.random.default_rng(batch)))
        # Both methods compiled as the training loop compiles its step at this batch.
        options = compiler_options(jax.devices()[0].platform, batch)
        grads = {m: (jax.jit(grad_fn(net, m), compiler_options=options), (params, x, y))
                 for m in METHODS}  # fmt: skip
        steps = {m: (sgd_step(net, m, lr=NET.lr, compiler_options=options)[0],
                     (sgd_state(jax.tree.map(lambda a: a.copy(), params)), x, y))
                 for m in METHODS}  # fmt: skip
        for what, fns, carry in (("grad", grads, False), ("step", steps, True)):
            t = compare_fns(fns, repeats=s.repeats, warmup=3, carry=carry, min_time_s=s.min_time_s)
            rows.append({
                "batch": batch, "what": what,
                **{m: t[m].as_dict() for m in METHODS},
                "ratio": t["autodiff"].median_s / t["manual"].median_s,
                "cpu_ratio": t["autodiff"].cpu_median_s / t["manual"].cpu_median_s,
                "manual_gflops": step_flops(s.sizes, batch) / t["manual"].median_s / 1e9,
            })  # fmt: skip
            print(_line(rows[-1]), flush=True)
        if s.dump_hlo:  # after the timing: compiling first would make its compile_s a cache hit
            _dump_hlo(s.dump_hlo, batch, grads)
    return rows


HEADER = (f"{'batch':>5} {'what':4} {'manual ms':>10} {'autodiff ms':>11} {'ratio':>6} "
          f"{'cpu ratio':>9} {'spread m/a':>11} {'repeats':>7} {'GFLOP/s':>8} "
          f"{'compile m/a s':>14}")  # fmt: skip


def _line(r: dict[str, Any]) -> str:
    m, a = r["manual"], r["autodiff"]
    return (f"{r['batch']:5d} {r['what']:4} {m['median_s'] * 1e3:10.3f} "
            f"{a['median_s'] * 1e3:11.3f} "
            f"{r['ratio']:6.3f} {r['cpu_ratio']:9.3f} {m['spread']:5.2f}/{a['spread']:<5.2f} "
            f"{m['repeats']:7d} {r['manual_gflops']:8.1f} "
            f"{m['compile_s']:6.2f}/{a['compile_s']:<6.2f}")  # fmt: skip


def main(argv: Sequence[str]) -> None:
    del argv
    settings = cli.from_flags(GradBench)
    print(machine_line(settings.sizes))
    print("ratio = autodiff median / manual median (>= 1.00: manual not slower)")
    print(HEADER)
    rows = bench(settings)
    worst = min(r["ratio"] for r in rows)
    print(f"floor manual >= 1.00x autodiff at every batch: {'met' if worst >= 1.0 else 'MISSED'} "
          f"(worst ratio {worst:.3f})")  # fmt: skip
    if settings.out:
        write_json(settings.out, settings, rows)
        print(f"wrote {settings.out}")


if __name__ == "__main__":
    cli.run(main)
