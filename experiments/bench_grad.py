r"""jit(manual_grad) against jit(jax.grad), paired in one process (issue 2).

    python experiments/bench_grad.py

times, on the 784-500-10 network at batch 1, 128, 512, 2048 and 8192, the
gradient alone (``bpjax.methods.grad_fn("manual")`` against ``"autodiff"``)
and the full training step (gradient + SGD update, params donated), the two
methods interleaved (A B A B ...) so machine noise hits both alike; compile
time apart, median of the repeats. It prints one table and writes
``experiments/results/bench_grad.json``. About 1.5 minutes on a quiet 2-core
CPU. The floor it checks: manual is never slower (ratio autodiff/manual >= 1.00
at every batch).

    --dump_hlo=/tmp/hlo   writes both methods' optimised HLO per batch size
                          (``jax.jit(f).lower(...).compile().as_text()``).

This is a benchmark, not a test: nothing here fails on a slow number.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import app, flags

from bpjax.files import write_atomic
from bpjax.methods import grad_fn
from bpjax.network import init_params
from bpjax.sweep import make_step, step_flops
from bpjax.timing import compare_fns, device_info

BATCHES = flags.DEFINE_list("batches", ["1", "128", "512", "2048", "8192"], "batch sizes")
SIZES = flags.DEFINE_list("sizes", ["784", "500", "10"], "layer widths n_0,...,n_L")
REPEATS = flags.DEFINE_integer("repeats", 20, "timed rounds per batch (at least)")
MIN_TIME_S = flags.DEFINE_float("min_time_s", 2.0, "timed seconds per batch and pair (at least)")
OUT = flags.DEFINE_string("out", "experiments/results/bench_grad.json", "JSON output ('' = none)")
DUMP_HLO = flags.DEFINE_string("dump_hlo", "", "directory for the optimised HLO of both methods")

METHODS = ("manual", "autodiff")


def bench(sizes, batches, repeats, min_time_s, dump_hlo=""):
    """Rows ``{batch, what, method: Timing dict, ratio}`` for gradient and step."""
    params = init_params(jax.random.PRNGKey(0), sizes)
    rows = []
    for batch in batches:
        rng = np.random.default_rng(batch)
        x = rng.standard_normal((batch, sizes[0])).astype(np.float32)
        y = np.eye(sizes[-1], dtype=np.float32)[rng.integers(0, sizes[-1], batch)]
        x, y = jax.device_put((x, y))
        grads = {m: (jax.jit(grad_fn(m)), (params, x, y)) for m in METHODS}
        if dump_hlo:
            os.makedirs(dump_hlo, exist_ok=True)
            for m, (f, args) in grads.items():
                with open(os.path.join(dump_hlo, f"{m}_grad_{batch}.hlo"), "w") as fh:
                    fh.write(f.lower(*args).compile().as_text())
        steps = {
            m: (make_step(m, activation="relu", loss="softmax_cross_entropy", lr=0.1)[0],
                (jax.tree.map(lambda a: a.copy(), params), x, y))
            for m in METHODS
        }  # fmt: skip
        for what, fns, carry in (("grad", grads, False), ("step", steps, True)):
            t = compare_fns(fns, repeats=repeats, warmup=3, carry=carry, min_time_s=min_time_s)
            flops = step_flops(sizes, batch)
            rows.append({
                "batch": batch, "what": what,
                **{m: t[m].as_dict() for m in METHODS},
                "ratio": t["autodiff"].median_s / t["manual"].median_s,
                "cpu_ratio": t["autodiff"].cpu_median_s / t["manual"].cpu_median_s,
                "manual_gflops": flops / t["manual"].median_s / 1e9,
            })  # fmt: skip
            print(_line(rows[-1]), flush=True)
    return rows


HEADER = (f"{'batch':>5} {'what':4} {'manual ms':>10} {'autodiff ms':>11} {'ratio':>6} "
          f"{'cpu ratio':>9} {'spread m/a':>11} {'repeats':>7} {'GFLOP/s':>8} "
          f"{'compile m/a s':>14}")  # fmt: skip


def _line(r):
    m, a = r["manual"], r["autodiff"]
    return (f"{r['batch']:5d} {r['what']:4} {m['median_s'] * 1e3:10.3f} "
            f"{a['median_s'] * 1e3:11.3f} "
            f"{r['ratio']:6.3f} {r['cpu_ratio']:9.3f} {m['spread']:5.2f}/{a['spread']:<5.2f} "
            f"{m['repeats']:7d} {r['manual_gflops']:8.1f} "
            f"{m['compile_s']:6.2f}/{a['compile_s']:<6.2f}")  # fmt: skip


def main(argv):
    del argv
    sizes = tuple(int(s) for s in SIZES.value)
    info = device_info()
    print(f"{info['device_kind']} ({info['processor']}, {info['cpu_count']} cpus, "
          f"load {info['load_average']}), jax {info['jax_version']}, sizes {sizes}")  # fmt: skip
    print("ratio = autodiff median / manual median (>= 1.00: manual not slower)")
    print(HEADER)
    rows = bench(sizes, [int(b) for b in BATCHES.value], REPEATS.value, MIN_TIME_S.value,
                 DUMP_HLO.value)  # fmt: skip
    worst = min(r["ratio"] for r in rows)
    print(f"floor manual >= 1.00x autodiff at every batch: {'met' if worst >= 1.0 else 'MISSED'} "
          f"(worst ratio {worst:.3f})")  # fmt: skip
    if OUT.value:
        record = {"meta": {**info, "sizes": sizes}, "rows": rows}
        write_atomic(OUT.value, json.dumps(record, indent=1))
        print(f"wrote {OUT.value}")


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main)
