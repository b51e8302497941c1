"""From what was measured to what is read: rows, the table, JSON, CSV and PNG.

A :class:`Measurement` is what one configuration (platform, method, batch,
device count) yielded, nothing computed from it. :func:`derive` turns the
measurements of one platform into :class:`Row` records, each built once, with
the derived columns beside the measured ones:

* ``samples_per_s`` = batch / ``median_s``; ``gflops``: useful FLOPs
  (``steps.step_flops``) / ``median_s``;
* ``roofline_s``: the GEMM-only products at this batch (one device's share),
  timed among the methods; ``frac_of_roofline`` = roofline_s / median_s;
* ``frac_of_matmul_peak``: gflops over the square matmul's GFLOP/s on the
  same device in the same run;
* ``ratio_to_autodiff``: autodiff's median / this row's (> 1: faster);
  ``paired_ratio_to_autodiff``: the median of the per-round ratios (the
  rounds are interleaved, so it cancels slow drifts of the machine's load).

Files: ``write_results`` puts ``{name}.json`` (metadata + rows), a plain
``{name}.csv`` (one header line, then rows: it opens with ``csv.DictReader``,
``pandas.read_csv``, a spreadsheet) and a ``{name}.png`` plot side by side;
``write_json`` is the small writer of the other benchmarks. Every file is
written atomically (``bpjax.files.write_atomic``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from bpjax.bench.peers import torch_available
from bpjax.bench.steps import step_flops
from bpjax.bench.timing import Timing, available_platforms, device_info
from bpjax.files import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure  # matplotlib is imported only to plot

    from bpjax.bench.sweep_config import SweepConfig


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What one configuration yielded. ``timing`` is set exactly when ``status == "ok"``.

    ``status`` is ``ok``, ``skipped`` (over a batch limit, or a batch that does
    not divide over the devices), ``oom`` or ``error``; ``reason`` says why.
    """

    platform: str
    device_kind: str
    method: str
    batch: int
    num_devices: int
    status: str
    reason: str = ""
    timing: Timing | None = None
    compile_s: float | None = None
    n_compiles: int | None = None
    n_traces: int | None = None
    xla_temp_bytes: int | None = None
    peak_memory_bytes: int | None = None
    roofline_s: float | None = None
    paired_ratio_to_autodiff: float | None = None
    matmul_precision: str | None = None  # in effect when the step was compiled

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Measurement:
        """The inverse of :meth:`to_dict` (after a trip through JSON)."""
        t = d.get("timing")
        timing = Timing(**{**t, "times_s": tuple(t["times_s"])}) if t else None
        return cls(**{**d, "timing": timing})


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the sweep's table and files: measured and derived columns, ``_s`` = seconds."""

    platform: str
    device_kind: str
    method: str
    batch: int
    num_devices: int
    status: str
    reason: str
    median_s: float | None = None
    p10_s: float | None = None
    p90_s: float | None = None
    min_s: float | None = None
    spread: float | None = None
    cpu_median_s: float | None = None
    repeats: int | None = None
    compile_s: float | None = None
    n_compiles: int | None = None
    n_traces: int | None = None
    samples_per_s: float | None = None
    flops_per_step: int | None = None
    gflops: float | None = None
    roofline_s: float | None = None
    roofline_samples_per_s: float | None = None
    frac_of_roofline: float | None = None
    matmul_peak_gflops: float | None = None
    frac_of_matmul_peak: float | None = None
    ratio_to_autodiff: float | None = None
    paired_ratio_to_autodiff: float | None = None
    peak_memory_bytes: int | None = None
    xla_temp_bytes: int | None = None
    sizes: str = ""
    dtype: str = ""
    matmul_precision: str = ""


ROW_FIELDS = tuple(f.name for f in dataclasses.fields(Row))


def derive(
    measured: Sequence[Measurement],
    *,
    sizes: Sequence[int],
    dtype: str,
    matmul_peak_gflops: float,
) -> list[Row]:
    """The rows of one platform's measurements (see the module docstring), in their order."""
    where = lambda m: (m.platform, m.batch, m.num_devices)  # noqa: E731
    autodiff_s = {where(m): m.timing.median_s
                  for m in measured if m.method == "autodiff" and m.timing}  # fmt: skip
    return [_row(m, sizes, dtype, matmul_peak_gflops, autodiff_s.get(where(m))) for m in measured]


def _row(m: Measurement, sizes: Sequence[int], dtype: str, peak_gflops: float,
         autodiff_s: float | None) -> Row:  # fmt: skip
    flops = step_flops(sizes, m.batch)
    stats = {k: v for k, v in m.timing.as_dict().items() if k != "compile_s"} if m.timing else {}
    med = stats.get("median_s")
    over_med = lambda v: None if med is None or v is None else v / med  # noqa: E731
    gflops = None if med is None else flops / med / 1e9
    return Row(
        platform=m.platform, device_kind=m.device_kind, method=m.method, batch=m.batch,
        num_devices=m.num_devices, status=m.status, reason=m.reason, **stats,
        compile_s=m.compile_s, n_compiles=m.n_compiles, n_traces=m.n_traces,
        samples_per_s=over_med(m.batch), flops_per_step=flops, gflops=gflops,
        roofline_s=m.roofline_s,
        roofline_samples_per_s=m.batch / m.roofline_s if m.roofline_s else None,
        frac_of_roofline=over_med(m.roofline_s or None),
        matmul_peak_gflops=peak_gflops,
        frac_of_matmul_peak=None if gflops is None else gflops / peak_gflops,
        ratio_to_autodiff=over_med(autodiff_s),
        paired_ratio_to_autodiff=m.paired_ratio_to_autodiff,
        peak_memory_bytes=m.peak_memory_bytes, xla_temp_bytes=m.xla_temp_bytes,
        sizes="-".join(map(str, sizes)), dtype=dtype, matmul_precision=m.matmul_precision or "",
    )  # fmt: skip


# ------------------------------------------------------------------ the table


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def format_table(rows: Iterable[Row]) -> str:
    """A fixed-width text table of the rows (what the script prints)."""
    head = (f"{'platform':8} {'method':13} {'batch':>5} {'dev':>3} {'status':7} {'step ms':>9} "
            f"{'spread':>6} "
            f"{'compile s':>9} {'samples/s':>10} {'GFLOP/s':>8} {'%roof':>6} {'%mm':>5} "
            f"{'vs auto':>7}")  # fmt: skip
    out = [head, "-" * len(head)]
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    for r in rows:
        ms = None if r.median_s is None else 1e3 * r.median_s
        out.append(
            f"{r.platform:8} {r.method:13} {r.batch:5d} {r.num_devices:3d} {r.status:7} "
            f"{_fmt(ms, '9.3f')} {_fmt(r.spread, '6.2f')} {_fmt(r.compile_s, '9.2f')} "
            f"{_fmt(r.samples_per_s, '10.0f')} {_fmt(r.gflops, '8.1f')} "
            f"{_fmt(pct(r.frac_of_roofline), '6.1f')} {_fmt(pct(r.frac_of_matmul_peak), '5.1f')} "
            f"{_fmt(r.ratio_to_autodiff, '7.3f')}"
        )
    return "\n".join(out)


# ------------------------------------------------------------------ the files


def sweep_metadata(config: SweepConfig) -> dict[str, Any]:
    """Everything needed to read the numbers later: config, devices, versions, threads.

    ``matmul_precision`` is the precision in effect for everything the sweep
    compiled (its setting; each row also says what its process saw); each device's
    ``jax_default_matmul_precision`` is the process-wide setting, overridden there.
    """
    platforms = config.platforms or available_platforms()
    meta: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "devices": {p: device_info(jax.devices(p)[0]) for p in platforms},
        "matmul_precision": config.matmul_precision,
        "argv": list(sys.argv),
    }
    if torch_available():
        import torch

        meta["torch_version"] = torch.__version__
        meta["torch_num_threads"] = torch.get_num_threads()
    return meta


def _plain(v: Any) -> Any:
    """``v`` as JSON values: records as dicts, NaN and inf as None, NumPy scalars as Python."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        v = dataclasses.asdict(v)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def _write_payload(path: str, payload: Mapping[str, Any]) -> None:
    write_atomic(path, json.dumps(_plain(payload), indent=1, default=str) + "\n")


def write_json(path: str, config: Any, rows: Sequence[Any], **extra: Any) -> None:
    """``{"meta": {config, device_info(), argv}, "rows": rows, **extra}`` at ``path``, atomically.

    ``config`` is the benchmark's settings dataclass; rows are dicts or dataclasses.
    """
    meta = {"config": dataclasses.asdict(config), "device": device_info(), "argv": list(sys.argv)}
    _write_payload(path, {"meta": meta, "rows": list(rows), **extra})


def csv_text(rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None) -> str:
    """A plain CSV: one header line, then one line per row (any tool opens it as is).

    ``fields``: the columns, in order (default: every key of any row, first seen first).
    """
    fields = list(fields or dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_results(
    rows: Sequence[Row], meta: Mapping[str, Any], out_dir: str, name: str = "batch_sweep"
) -> dict[str, str]:
    """Writes ``{name}.json`` (meta + rows), a plain ``{name}.csv`` and ``{name}.png``."""
    paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "csv", "png")}
    plain = [_plain(r) for r in rows]
    _write_payload(paths["json"], {"meta": meta, "rows": plain})
    write_atomic(paths["csv"], csv_text(plain, ROW_FIELDS))
    plot_sweep(rows, paths["png"], title=_plot_title(meta))
    return paths


# ------------------------------------------------------------------ the plot


def _plot_title(meta: Mapping[str, Any]) -> str:
    devices = meta.get("devices", {})
    kinds = ", ".join(f"{p}: {d.get('device_kind')} {d.get('processor', '')}"
                      for p, d in devices.items())  # fmt: skip
    some = next(iter(devices.values()), {})
    sizes = "-".join(map(str, meta.get("config", {}).get("sizes", ())))
    return f"one SGD step, {sizes} MLP ({kinds}; jax {some.get('jax_version', '?')})"


def sweep_figure(rows: Sequence[Row], title: str = "") -> Figure:
    """samples/s against batch, log-log: one line per (method, platform), roofline dashed.

    A bare ``matplotlib.figure.Figure`` (no pyplot): it draws without touching
    the notebook's or the user's matplotlib backend; a notebook displays it with
    ``display(fig)``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6))
    ax = fig.subplots()
    groups: dict[tuple[str, int, str], list] = {}
    for r in rows:
        if r.status == "ok":
            groups.setdefault((r.platform, r.num_devices, r.method), []).append(
                (r.batch, r.samples_per_s)
            )
    multi = len({k[1] for k in groups}) > 1
    where = lambda p, d: f"{p} x{d}" if multi else p  # noqa: E731
    for (platform, n_dev, method), pts in sorted(groups.items()):
        batches, speeds = zip(*sorted(pts), strict=True)
        ax.plot(batches, speeds, marker="o", ms=3, label=f"{method} ({where(platform, n_dev)})")
    for platform, n_dev in sorted({(r.platform, r.num_devices) for r in rows}):
        roof = sorted({(r.batch, r.roofline_samples_per_s) for r in rows
                       if (r.platform, r.num_devices) == (platform, n_dev)
                       and r.roofline_samples_per_s})  # fmt: skip
        if roof and (n_dev == 1 or multi):
            batches, speeds = zip(*roof, strict=True)
            ax.plot(batches, speeds, "--", lw=1, color="k" if n_dev == 1 else "0.6",
                    label=f"GEMM-only roofline ({where(platform, n_dev)})")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size M")
    ax.set_ylabel("samples / s (one training step)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return fig


def plot_sweep(rows: Sequence[Row], path: str, title: str = "") -> None:
    """``sweep_figure`` saved as a PNG at ``path``, atomically."""
    save_png(sweep_figure(rows, title), path, dpi=120)


def save_png(fig: Figure, path: str, *, dpi: int = 110, bbox_inches: str | None = "tight") -> None:
    """``fig`` as a PNG at ``path``, written atomically (``bpjax.files.write_atomic``).

    ``bbox_inches=None``: the figure's own size (matplotlib's default), not cropped.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches=bbox_inches)
    write_atomic(path, buf.getvalue())
