r"""Batch-size sweep of one training step, every method on every platform.

    python experiments/batch_sweep.py

runs batches 1, 2, 4, ..., 8192 of ``bpjax.Config``'s network (784-500-10) for
manual, autodiff, manual_vmap, autodiff_vmap, per_sample (up to batch 1024),
the first document's NumPy code and PyTorch autograd (when installed), on every
platform JAX finds; prints a table and the floors below, and writes
``batch_sweep.{json,csv,png}`` to ``experiments/results/``. About 4 minutes on
a quiet 2-core CPU (most of it compiling 70 executables and the big batches);
on a shared machine longer.

Scaling over devices (data parallel), here 8 simulated CPU devices (they share
the host's cores: this shows the all-reduce's cost, not a speed-up; on a
multi-GPU host or a TPU VM drop XLA_FLAGS):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/batch_sweep.py \
        --device_counts=1,2,4,8 --methods=manual,autodiff --batches=256,1024,4096 \
        --peers= --out_dir=experiments/results/scaling

A quick look (about 30 seconds):

    python experiments/batch_sweep.py --batches=1,64,4096 \
        --methods=manual,autodiff --peers=numpy --out_dir=/tmp/sweep

Every flag is a field of ``bpjax.bench.sweep.SweepConfig`` (``--help`` lists
them); the logic is ``run_sweep`` and ``bpjax.bench.report``. JAX's own flags
work too (``--jax_platforms=cpu``, ``--jax_enable_x64``, ``--jax_log_compiles``).
"""

from __future__ import annotations

from collections.abc import Sequence

from bpjax import cli
from bpjax.bench.report import Row, format_table, sweep_metadata, write_results
from bpjax.bench.sweep import SweepConfig, run_sweep

cli.define_flags(SweepConfig)


def _floor_line(platform: str, name: str, values: list[tuple[int, float]], floor: float,
                unit: str = "x") -> str:  # fmt: skip
    """``met`` or ``MISSED``, with the worst batch and every batch below the floor."""
    if not values:
        return f"[{platform}] {name}: no data"
    batch, worst = min(values, key=lambda t: t[1])
    below = [f"{b}: {v:.2f}{unit}" for b, v in values if v < floor]
    return (f"[{platform}] {name}: {'met' if worst >= floor else 'MISSED'} (worst {worst:.2f}"
            f"{unit} at batch {batch}" + (f"; below at {', '.join(below)}" if below else "") + ")")


def floor_report(rows: Sequence[Row]) -> list[str]:
    """The floors this benchmark was written to check, per platform, with the numbers."""
    lines = []
    for platform in sorted({r.platform for r in rows}):
        here = [r for r in rows if r.platform == platform and r.status == "ok"]
        ok = {(r.method, r.batch): r for r in here if r.num_devices == 1}
        manual = {b: r for (m, b), r in sorted(ok.items()) if m == "manual"}
        torch = {b: r for (m, b), r in ok.items() if m == "torch"}
        lines.append(_floor_line(platform, "manual >= 1.00x autodiff, every batch",
                                 [(b, r.ratio_to_autodiff) for b, r in manual.items()
                                  if r.ratio_to_autodiff], 1.0))  # fmt: skip
        lines.append(_floor_line(platform, "manual >= 1.00x autodiff, every batch, paired "
                                 "(median of per-round ratios)",
                                 [(b, r.paired_ratio_to_autodiff) for b, r in manual.items()
                                  if r.paired_ratio_to_autodiff], 1.0))  # fmt: skip
        if torch:
            lines.append(_floor_line(platform, "manual >= 2x torch, batch >= 8",
                                     [(b, torch[b].median_s / r.median_s) for b, r in
                                      manual.items() if b >= 8 and b in torch], 2.0))  # fmt: skip
        lines.append(_floor_line(platform, "manual >= 85% of square-matmul FLOP/s, batch >= 512",
                                 [(b, 100 * r.frac_of_matmul_peak) for b, r in manual.items()
                                  if b >= 512], 85.0, "%"))  # fmt: skip
        vmap = [(b, ok[("manual_vmap", b)].median_s / r.median_s)
                for b, r in manual.items() if ("manual_vmap", b) in ok]  # fmt: skip
        if vmap:
            lines.append(f"[{platform}] manual_vmap step time / manual: "
                         + ", ".join(f"{b}: {v:.2f}x" for b, v in vmap))  # fmt: skip
        for n_dev in sorted({r.num_devices for r in here} - {1}):
            scale = sorted((r.batch, r.samples_per_s / manual[r.batch].samples_per_s)
                           for r in here if r.method == "manual" and r.num_devices == n_dev
                           and r.batch in manual)  # fmt: skip
            lines.append(f"[{platform}] manual on {n_dev} devices, samples/s vs 1 device: "
                         + ", ".join(f"{b}: {v:.2f}x" for b, v in scale))  # fmt: skip
    return lines


def main(argv: Sequence[str]) -> None:
    del argv
    config = cli.from_flags(SweepConfig)
    rows = run_sweep(config)
    print(format_table(rows))
    print("\n".join(floor_report(rows)))
    paths = write_results(rows, sweep_metadata(config), config.out_dir)
    print("wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
    cli.run(main)
