r"""Benchmark: DP-SGD by ghost clipping vs per-example gradients (jax.vmap(jax.grad)).

For a 784-500-10 ReLU MLP in float32 and batch sizes 64 ... 4096, times

  (a) ``norms``:   ``privacy.per_example_grad_norms``, eq. (N) of ``bpjax/privacy.py``;
  (b) ``clipped``: ``privacy.clipped_grad``, the clipped sum by ghost clipping, eq. (C);
  (n) ``dp``:      ``privacy.private_grad_fn("manual", ...)``, (b) plus Gaussian noise and ÷M;
  (c) ``vmap``:    ``privacy.private_grad_fn("autodiff", ...)`` with no noise:
                   ``jax.vmap(jax.grad(ℓ))`` per-example gradients, then norm, clip, sum, ÷M;
  (d) ``manual``:  an ordinary (unclipped) ``manual_grad`` step,

each jitted, compile timed apart, warm-up discarded, ``block_until_ready`` on the whole
output, median of repeats. Peak memory: CPU backends have no ``memory_stats``, so the
table reports XLA's compiled memory analysis, ``temp_size_in_bytes`` (the scratch a call
allocates beyond its arguments and outputs); the per-example gradients of (c) live there.
Above ``--vmap_max_batch`` (default 2048) route (c) is compiled for its memory figure but
not run: at 4096 it would need about 12 GB and half a minute per call on this machine.

Run (about 2-3 minutes on 2 CPU cores; writes experiments/results/dp_bench.json)::

    python experiments/bench_dp.py
    python experiments/bench_dp.py --batches=64,1024 --repeats=3
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bpjax import privacy
from bpjax.formulas import manual_grad_and_output
from bpjax.network import init_params

ROUTES = ("norms", "clipped", "dp", "vmap", "manual")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    sizes: tuple[int, ...] = (784, 500, 10)
    batches: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    clip: float = 1.0
    noise_multiplier: float = 1.0
    repeats: int = 5  # at least this many timed calls per route ...
    min_seconds_per_route: float = 1.0  # ... and more, up to 100, until this much time is spent
    max_seconds_per_route: float = 8.0  # stop repeating a slow route after this (>= 2 repeats)
    vmap_max_batch: int = 2048  # (c) above this is compiled for its memory only, not run
    out: str = "experiments/results/dp_bench.json"

    def __post_init__(self):
        if len(self.sizes) < 2 or min(self.sizes) < 1:
            raise ValueError(f"sizes must be at least two positive widths, got {self.sizes}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batches must be positive, got {self.batches}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")


def route_fns(config: BenchConfig) -> dict[str, Callable]:
    """The jitted functions (params, x, y, key) -> output of every route."""
    clip = config.clip
    return {
        "norms": jax.jit(lambda p, x, y, k: privacy.per_example_grad_norms(p, x, y)),
        "clipped": jax.jit(lambda p, x, y, k: privacy.clipped_grad(p, x, y, clip=clip)),
        "dp": jax.jit(
            privacy.private_grad_fn("manual", clip=clip, noise_multiplier=config.noise_multiplier)
        ),
        "vmap": jax.jit(privacy.private_grad_fn("autodiff", clip=clip, noise_multiplier=0.0)),
        "manual": jax.jit(lambda p, x, y, k: manual_grad_and_output(p, x, y)),
    }


def memory_of(compiled) -> dict:
    """XLA's compiled memory analysis: scratch (temp), output and argument bytes."""
    memory = compiled.memory_analysis()
    return {
        "temp_bytes": int(memory.temp_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
    }


def time_call(
    fn: Callable,
    args: Sequence,
    *,
    repeats: int,
    min_seconds: float,
    max_seconds: float,
    run_it: bool = True,
) -> dict:
    """Compile time, then the median and spread of warm calls, in seconds.

    At least ``repeats`` calls, more (up to 100) until ``min_seconds`` are spent, and
    no more than 2 once ``max_seconds`` are. ``run_it=False`` compiles only (memory).
    """
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    result: dict = {"compile_s": time.perf_counter() - t0, **memory_of(compiled)}
    if not run_it:
        return result
    jax.block_until_ready(compiled(*args))  # warm-up, discarded
    times: list[float] = []
    while len(times) < 100:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
        spent = sum(times)
        if (len(times) >= repeats and spent >= min_seconds) or (
            len(times) >= 2 and spent >= max_seconds
        ):
            break
    result.update(
        median_s=statistics.median(times), min_s=min(times), max_s=max(times), repeats=len(times)
    )
    return result


def make_batch(sizes: Sequence[int], batch: int, seed: int = 0):
    """Random float32 inputs ``(batch, n_0)`` and one-hot targets ``(batch, n_L)``."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, sizes[0])), jnp.float32)
    y = jnp.asarray(np.eye(sizes[-1], dtype=np.float32)[rng.integers(0, sizes[-1], batch)])
    return x, y


def run(config: BenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """One row per batch size: every route's timing and memory."""
    params = init_params(jax.random.key(0), config.sizes, jnp.float32)
    key = jax.random.key(1)
    fns = route_fns(config)
    rows = []
    for batch in config.batches:
        x, y = make_batch(config.sizes, batch)
        row: dict = {"batch": batch}
        for name in ROUTES:
            row[name] = time_call(
                fns[name],
                (params, x, y, key),
                repeats=config.repeats,
                min_seconds=config.min_seconds_per_route,
                max_seconds=config.max_seconds_per_route,
                run_it=not (name == "vmap" and batch > config.vmap_max_batch),
            )
        rows.append(row)
        log(format_row(row))
    return rows


def _ms(row: dict, name: str) -> float:
    return row[name].get("median_s", float("nan")) * 1e3


def _mb(row: dict, name: str) -> float:
    return row[name]["temp_bytes"] / 2**20


HEADER = (
    f"{'batch':>6} | {'norms ms':>9} {'clip ms':>9} {'dp ms':>9} {'vmap ms':>9} "
    f"{'manual ms':>9} | {'vmap/clip':>9} {'clip/man':>8} {'dp/man':>7} | "
    f"{'clip MB':>8} {'vmap MB':>9} {'man MB':>7}"
)


def format_row(row: dict) -> str:
    ms = {name: _ms(row, name) for name in ROUTES}
    return (
        f"{row['batch']:>6} | {ms['norms']:>9.2f} {ms['clipped']:>9.2f} {ms['dp']:>9.2f} "
        f"{ms['vmap']:>9.2f} {ms['manual']:>9.2f} | {ms['vmap'] / ms['clipped']:>9.1f} "
        f"{ms['clipped'] / ms['manual']:>8.2f} {ms['dp'] / ms['manual']:>7.2f} | "
        f"{_mb(row, 'clipped'):>8.1f} {_mb(row, 'vmap'):>9.1f} {_mb(row, 'manual'):>7.1f}"
    )


def format_table(rows: list[dict]) -> str:
    return "\n".join([HEADER, "-" * len(HEADER)] + [format_row(r) for r in rows])


def environment() -> dict:
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "load_average_1m": os.getloadavg()[0],
    }


def write_json(config: BenchConfig, rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    record = {"config": dataclasses.asdict(config), "environment": environment(), "rows": rows}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


_BATCHES = flags.DEFINE_list("batches", ["64", "128", "256", "512", "1024", "2048", "4096"],
                             "Batch sizes.")
_SIZES = flags.DEFINE_list("sizes", ["784", "500", "10"], "Layer widths n_0,...,n_L.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per route (median reported).")
_CLIP = flags.DEFINE_float("clip", 1.0, "Per-example L2 clipping norm C.")
_VMAP_MAX_BATCH = flags.DEFINE_integer(
    "vmap_max_batch", 2048,
    "Above this batch (c) is compiled for its memory analysis but not run "
    "(it holds batch x #params floats: 1.6 GB at 1024, and about 5 s per call on 2 cores).")
_OUT = flags.DEFINE_string("out", "experiments/results/dp_bench.json", "JSON output path.")


def main(argv: Sequence[str]) -> None:
    del argv
    config = BenchConfig(
        sizes=tuple(int(s) for s in _SIZES.value),
        batches=tuple(int(b) for b in _BATCHES.value),
        clip=_CLIP.value,
        repeats=_REPEATS.value,
        vmap_max_batch=_VMAP_MAX_BATCH.value,
        out=_OUT.value,
    )
    env = environment()
    print(f"device: {env['device_kind']} ({env['platform']}, {env['cpu_count']} cores, "
          f"load {env['load_average_1m']:.1f}), sizes {config.sizes}, float32")
    print(HEADER)
    print("-" * len(HEADER))
    rows = run(config)
    write_json(config, rows, config.out)
    print(f"wrote {config.out}")


if __name__ == "__main__":
    app.run(main)
