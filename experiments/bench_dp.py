r"""Benchmark: DP-SGD by ghost clipping vs per-example gradients (jax.vmap(jax.grad)).

For ``bpjax.Config``'s network (784-500-10 ReLU MLP) in float32 and batch sizes
64 ... 4096, times

  (a) ``norms``:   ``privacy.per_example_grad_norms``, eq. (N) of ``bpjax/privacy.py``;
  (b) ``clipped``: ``privacy.clipped_grad``, the clipped sum by ghost clipping, eq. (C);
  (n) ``dp``:      ``privacy.private_grad_fn(net, "manual", ...)``, (b) plus Gaussian noise and ÷M;
  (c) ``vmap``:    ``privacy.private_grad_fn(net, "autodiff", ...)`` with no noise:
                   ``jax.vmap(jax.grad(ℓ))`` per-example gradients, then norm, clip, sum, ÷M;
  (d) ``manual``:  an ordinary (unclipped) ``manual_grad`` step,

each compiled apart, then timed interleaved per batch (``bpjax.bench.timing``),
median of the rounds. Memory is XLA's compiled ``temp_size_in_bytes`` (the
scratch beyond arguments and outputs, where (c)'s per-example gradients live;
CPU backends have no ``memory_stats``). Above ``--vmap_max_batch`` (c) is
compiled for its memory only: at 4096 it would need about 12 GB and half a
minute per call here.

Run (about 2-3 minutes on 2 CPU cores; writes experiments/results/bench_dp.json)::

    python experiments/bench_dp.py
    python experiments/bench_dp.py --batches=64,1024 --repeats=3
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from bpjax import cli, privacy
from bpjax.bench.report import write_json
from bpjax.bench.steps import random_batch
from bpjax.bench.timing import compare_fns, compile_fn, machine_line
from bpjax.config import Config, check_positive_float, check_positive_int, check_sizes, setting
from bpjax.formulas import manual_grad_and_output
from bpjax.network import Net, init_params

NET = Config()  # the network's activation and loss
ROUTES = ("norms", "clipped", "dp", "vmap", "manual")


@dataclasses.dataclass(frozen=True)
class DPBench:
    sizes: tuple[int, ...] = setting(NET.sizes, "Layer widths n_0,...,n_L.")
    batches: tuple[int, ...] = setting((64, 128, 256, 512, 1024, 2048, 4096), "Batch sizes.")
    clip: float = setting(1.0, "Per-example L2 clipping norm C.")
    noise_multiplier: float = setting(1.0, "Noise multiplier σ of route (n).")
    repeats: int = setting(5, "Timed rounds per batch size (every route once per round), at least.")
    min_time_s: float = setting(5.0, "More rounds until this many seconds were timed per batch.")
    max_time_s: float = setting(30.0, "No more rounds beyond --repeats past this many seconds.")
    vmap_max_batch: int = setting(
        2048, "Above this batch (c) is compiled for its memory analysis but not run (it holds"
        " batch x #params floats: 1.6 GB at 1024, and about 5 s per call on 2 cores)."
    )
    out: str = setting("experiments/results/bench_dp.json", "JSON output path.")

    def __post_init__(self) -> None:
        check_sizes(self.sizes)
        for name, value in [*(("batches", b) for b in self.batches), ("repeats", self.repeats)]:
            check_positive_int(name, value)
        check_positive_float("clip", self.clip)


cli.define_flags(DPBench)


def route_fns(s: DPBench) -> dict[str, Callable]:
    """The jitted functions (params, x, y, key) -> output of every route."""
    net = Net.mlp(s.sizes, NET.activation, NET.loss)
    return {
        "norms": jax.jit(lambda p, x, y, k: privacy.per_example_grad_norms(net, p, x, y)),
        "clipped": jax.jit(lambda p, x, y, k: privacy.clipped_grad(net, p, x, y, clip=s.clip)),
        "dp": jax.jit(privacy.private_grad_fn(net, "manual", clip=s.clip,
                                              noise_multiplier=s.noise_multiplier)),
        "vmap": jax.jit(privacy.private_grad_fn(net, "autodiff", clip=s.clip,
                                                noise_multiplier=0.0)),
        "manual": jax.jit(lambda p, x, y, k: manual_grad_and_output(net, p, x, y)),
    }


def measure(s: DPBench, fns: dict[str, Callable], params: Any, batch: int) -> dict[str, Any]:
    """One row: every route's compile time and XLA memory, and the timed ones' statistics."""
    x, y = jax.device_put(random_batch(s.sizes, batch, np.random.default_rng(0)))
    args = (params, x, y, jax.random.key(1))
    row, timed = {"batch": batch}, {}
    for name in ROUTES:
        compiled, compile_s, _ = compile_fn(fns[name], *args)
        mem = compiled.memory_analysis()
        row[name] = {"compile_s": compile_s, "temp_bytes": int(mem.temp_size_in_bytes),
                     "output_bytes": int(mem.output_size_in_bytes),
                     "argument_bytes": int(mem.argument_size_in_bytes)}  # fmt: skip
        if not (name == "vmap" and batch > s.vmap_max_batch):
            timed[name] = (compiled, args)
    # The light routes interleaved; the per-example-gradient route (GBs per call) in a block
    # of its own after them: interleaved, the pages it frees and the next call faults back
    # in slowed the route timed after it by up to 50x at batch 1024-2048 (measured).
    heavy = {"vmap": timed.pop("vmap")} if "vmap" in timed else {}
    timings = {}
    for group in (timed, heavy):
        if group:
            timings |= compare_fns(group, repeats=s.repeats, warmup=1,
                                   min_time_s=s.min_time_s, max_time_s=s.max_time_s)  # fmt: skip
    for name, t in timings.items():
        row[name].update({k: v for k, v in t.as_dict().items() if k != "compile_s"})
    return row


HEADER = (f"{'batch':>6} | {'norms ms':>9} {'clip ms':>9} {'dp ms':>9} {'vmap ms':>9} "
          f"{'manual ms':>9} | {'vmap/clip':>9} {'clip/man':>8} {'dp/man':>7} | "
          f"{'clip MB':>8} {'vmap MB':>9} {'man MB':>7}")  # fmt: skip


def format_row(row: dict[str, Any]) -> str:
    ms = {name: row[name].get("median_s", float("nan")) * 1e3 for name in ROUTES}
    mb = {name: row[name]["temp_bytes"] / 2**20 for name in ROUTES}
    return (
        f"{row['batch']:>6} | {ms['norms']:>9.2f} {ms['clipped']:>9.2f} {ms['dp']:>9.2f} "
        f"{ms['vmap']:>9.2f} {ms['manual']:>9.2f} | {ms['vmap'] / ms['clipped']:>9.1f} "
        f"{ms['clipped'] / ms['manual']:>8.2f} {ms['dp'] / ms['manual']:>7.2f} | "
        f"{mb['clipped']:>8.1f} {mb['vmap']:>9.1f} {mb['manual']:>7.1f}"
    )


def main(argv: Sequence[str]) -> None:
    del argv
    settings = cli.from_flags(DPBench)
    print(machine_line(settings.sizes) + ", float32")
    print(HEADER + "\n" + "-" * len(HEADER))
    params, fns, rows = init_params(jax.random.key(0), settings.sizes), route_fns(settings), []
    for batch in settings.batches:
        rows.append(measure(settings, fns, params, batch))
        print(format_row(rows[-1]), flush=True)
    write_json(settings.out, settings, rows)
    print(f"wrote {settings.out}")


if __name__ == "__main__":
    cli.run(main)
