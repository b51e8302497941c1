r"""The batch-size study's pure pieces (issue 14): grid, cadence, steps to target, fit, plots.

``experiments/batch_study.py`` trains the trials; everything here but
:func:`train_or_stopped` (one run of a study, a stopped run kept as a result) is a
function of numbers and metric records, so it is tested on synthetic data and reused
in a notebook. Figures are saved with ``bpjax.bench.report.save_png``.

Definitions, as the study uses them:

* **lr grid** at batch B: ``n`` values log-spaced by ``factor``, centred on the
  scaling rule's value lr_B = lr_ref · s(B / B_ref), s(r) = 1 (none), r (linear),
  √r (sqrt): lr_B · factor^(i - (n-1)/2), i = 0..n-1 (:func:`lr_grid`).
* **steps to target** (Shallue et al. 2019, ``google-research/batch_science``
  ``measurement_utils.compute_steps_to_result``): over all trials at one batch
  size, the first evaluated step at which the target is met, i.e. the minimum
  over trials of each trial's first hit. Infeasible (diverged) trials and trials
  that never hit count for nothing; a batch size none of whose trials hit has no
  value. Ties go to the trial with less training time (:func:`best_trials`).
* **the fit** (McCandlish et al. 2018): (S/S_min - 1)(E/E_min - 1) = 1 with
  E = B·S is the curve S(B) = S_min (1 + B_crit/B), E(B) = E_min (1 + B/B_crit),
  B_crit = E_min/S_min. Least squares in log space, on the batch sizes with a
  value: minimise Σ_i (log S_i - log S_min - log(1 + B_crit/B_i))² (the same
  residuals as in log E, since log E_i = log S_i + log B_i). For a fixed B_crit the
  best log S_min is the mean of log S_i - log(1 + B_crit/B_i), exactly, so one
  parameter is left: log B_crit, found on a grid over [log B_min - 7, log B_max + 7]
  and refined by a bounded scalar minimisation (:func:`fit_steps`). A B_crit at
  that range's edge (``at_edge``) means the points show no knee: all perfect
  scaling (B_crit beyond the largest batch) or all flat (below the smallest).
* **per batch size** (:func:`batch_rows`): the best trial's lr, steps, epochs,
  examples (steps x batch), training seconds (``train_s`` at the hit, compilation
  apart) and B_simple; per platform (:func:`summarize`) the fit and the median
  over batch sizes of the best runs' B_simple, the number set beside B_crit.
* **B_simple of a run**: the ratio of the run's averaged tr(Σ) and |G|² estimates
  (McCandlish et al.'s advice: average numerator and denominator, then divide;
  each evaluation record holds its interval's averages and the intervals are
  equal, so their mean is the run's). That ratio is the evaluations' B_simple
  weighted by their |G|², which is large early: the weighting of steps by how much
  an ideal step gains (∝ |G|²) that makes S = S_min (1 + B/B_noise) hold for a
  B_noise that changes over the run. The median of the evaluations' own B_simple,
  every evaluation weighted alike, is kept beside it (:func:`run_b_simple`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from bpjax.config import divisors, scaled_lr
from bpjax.errors import TrainingError
from bpjax.evaluation import meets_target
from bpjax.rundir import read_metrics
from bpjax.training import train

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from bpjax.config import Config
    from bpjax.data import Dataset

Record = Mapping[str, Any]
FIT_RANGE = 7.0  # the fit searches log B_crit this far beyond the batches (e^7 ≈ 1100x)


# ------------------------------------------------------------------ the grid


def lr_grid(batch: int, lr: float, reference_batch: int, scaling: str, n: int,
            factor: float) -> tuple[float, ...]:  # fmt: skip
    """``n`` learning rates, ``factor`` apart, centred (in log) on the rule's value."""
    centre = scaled_lr(lr, batch, reference_batch, scaling)  # Config.peak_lr's rule
    return tuple(float(centre * factor ** (i - (n - 1) / 2)) for i in range(n))


def trial_order(n: int) -> list[int]:
    """Grid indices from the centre outwards, the larger lr first at equal distance.

    The centre is the likeliest to hit early, and a hit caps the others' budget.
    """
    return sorted(range(n), key=lambda i: (abs(i - (n - 1) / 2), -i))


def eval_every(steps_per_epoch: int, evals_per_epoch: int, max_ratio: int = 4) -> int:
    """The divisor of ``steps_per_epoch`` nearest (in log) to ``steps_per_epoch/evals_per_epoch``.

    At most ``max_ratio * evals_per_epoch`` evaluations per epoch: a prime number
    of steps (60000 // 64 = 937) gets one evaluation per epoch, not 937.
    """
    want = steps_per_epoch / evals_per_epoch
    ok = [d for d in divisors(steps_per_epoch)
          if steps_per_epoch // d <= max_ratio * evals_per_epoch]  # fmt: skip
    return min(ok, key=lambda d: (abs(math.log(d / want)), -d))


def budget_epochs(steps_per_epoch: int, max_epochs: int, max_steps: int | None) -> int:
    """A trial's epochs: ``max_epochs``, fewer where ``max_steps`` comes first (at least 1)."""
    if not max_steps:
        return max_epochs
    return max(1, min(max_epochs, math.ceil(max_steps / steps_per_epoch)))


# ------------------------------------------------------------------ outcomes


class Trained(NamedTuple):
    """What one run of a study left: its metrics, and why it stopped early if it did."""

    history: list[dict[str, Any]]
    compile_s: float | None  # None when it stopped
    error: str | None  # the TrainingError's message; None when training returned


def train_or_stopped(config: Config, dataset: Dataset,
                     log: Callable[[str], None] | None) -> Trained:  # fmt: skip
    """``bpjax.train`` one run of a study; a run stopped by a ``TrainingError``
    (diverged, out of memory) is a result too: the metrics it recorded and the message.
    """
    try:
        result = train(config, dataset=dataset, log=log)
    except TrainingError as e:
        return Trained(read_metrics(config.workdir), None, str(e))
    return Trained(result.history, result.compile_s, None)


def first_hit(history: Sequence[Record], target_accuracy: float | None,
              target_loss: float | None = None) -> Record | None:  # fmt: skip
    """The first evaluation record that meets the target (``evaluation.meets_target``), or None."""
    return next((m for m in history if meets_target(m, target_accuracy, target_loss)), None)


def run_b_simple(history: Sequence[Record]) -> dict[str, float | None]:
    """B_simple over a run: ratio of averaged tr(Σ) and |G|² (``ratio``), and the median."""
    trace = [m["trace_sigma"] for m in history if m.get("trace_sigma") is not None]
    grad = [m["grad_sq_norm"] for m in history if m.get("grad_sq_norm") is not None]
    each = [m["b_simple"] for m in history
            if m.get("b_simple") is not None and np.isfinite(m["b_simple"])]  # fmt: skip
    mean_grad = float(np.mean(grad)) if grad else 0.0
    return {
        "ratio": float(np.mean(trace)) / mean_grad if trace and mean_grad > 0 else None,
        "median": float(np.median(each)) if each else None,
    }


def best_trials(trials: Sequence[Record]) -> dict[tuple[str, int], Record | None]:
    """Per ``(platform, batch)``: the trial with the fewest steps to target (Shallue).

    Only ``status == "reached"`` trials count; ties go to less ``target_train_s``.
    A key whose trials never reached maps to None.
    """
    out: dict[tuple[str, int], Record | None] = {}
    for t in trials:
        key = (t["platform"], t["batch"])
        out.setdefault(key, None)
        if t["status"] != "reached":
            continue
        best = out[key]
        rank = (t["target_step"], t["target_train_s"])
        if best is None or rank < (best["target_step"], best["target_train_s"]):
            out[key] = t
    return out


def batch_rows(trials: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per (platform, batch): the best trial's steps, epochs, examples, seconds."""
    rows = []
    for (platform, batch), best in best_trials(trials).items():
        here = [t for t in trials if (t["platform"], t["batch"]) == (platform, batch)]
        lrs = sorted(t["lr"] for t in here)
        row = {"platform": platform, "batch": batch, "trials": len(here),
               "reached": sum(t["status"] == "reached" for t in here),
               "diverged": sum(t["status"] == "diverged" for t in here),
               "steps_per_epoch": here[0]["steps_per_epoch"],
               "eval_every_steps": here[0]["eval_every_steps"]}  # fmt: skip
        keys = ("lr", "target_step", "target_epoch", "target_examples", "target_train_s",
                "compile_s", "b_simple", "b_simple_median")  # fmt: skip
        row |= {k: best[k] if best else None for k in keys}
        row["lr_at_grid_edge"] = bool(best) and best["lr"] in (lrs[0], lrs[-1]) and len(lrs) > 1
        rows.append(row)
    return sorted(rows, key=lambda r: (r["platform"], r["batch"]))


# ------------------------------------------------------------------ the fit


def _fit_sse(log_b_crit: float, log_b: np.ndarray, log_s: np.ndarray) -> tuple[float, float]:
    """(sum of squared residuals, best log S_min) at this B_crit."""
    shape = np.log1p(np.exp(log_b_crit - log_b))  # log(1 + B_crit / B)
    log_s_min = float(np.mean(log_s - shape))
    return float(np.sum((log_s - log_s_min - shape) ** 2)), log_s_min


def fit_steps(batches: Sequence[float], steps: Sequence[float]) -> dict[str, Any] | None:
    """S_min, E_min, B_crit from steps to target S_i at batches B_i (module docstring).

    Needs two or more points; returns None otherwise. ``rms_log``: the root-mean-
    square residual in log S (0.1 ≈ 10 %); ``at_edge``: B_crit hit the search range.
    """
    from scipy.optimize import minimize_scalar

    pts = [(b, s) for b, s in zip(batches, steps, strict=True) if s is not None and s > 0]
    if len(pts) < 2:
        return None
    log_b, log_s = (np.log(np.asarray(v, np.float64)) for v in zip(*pts, strict=True))
    lo, hi = float(log_b.min()) - FIT_RANGE, float(log_b.max()) + FIT_RANGE
    grid = np.linspace(lo, hi, 561)
    start = int(np.argmin([_fit_sse(u, log_b, log_s)[0] for u in grid]))
    bounds = (grid[max(start - 1, 0)], grid[min(start + 1, grid.size - 1)])
    found = minimize_scalar(lambda u: _fit_sse(u, log_b, log_s)[0], bounds=bounds,
                            method="bounded", options={"xatol": 1e-6})  # fmt: skip
    u = float(found.x) if found.fun <= _fit_sse(grid[start], log_b, log_s)[0] else grid[start]
    sse, log_s_min = _fit_sse(u, log_b, log_s)
    s_min, b_crit = math.exp(log_s_min), math.exp(u)
    return {"s_min": s_min, "e_min": s_min * b_crit, "b_crit": b_crit,
            "rms_log": math.sqrt(sse / len(pts)), "points": len(pts),
            "at_edge": bool(u - lo < 0.05 or hi - u < 0.05), "method": "least squares in"
            " log S of S = S_min (1 + B_crit/B), B_crit = E_min/S_min"}  # fmt: skip


def fitted_steps(fit: Mapping[str, Any], batches: Sequence[float]) -> np.ndarray:
    """The fitted curve S(B) = S_min (1 + B_crit / B)."""
    b = np.asarray(batches, np.float64)
    return fit["s_min"] * (1.0 + fit["b_crit"] / b)


# ------------------------------------------------------------------ summaries


def summarize(trials: Sequence[Mapping[str, Any]], platforms: Sequence[str]) -> dict[str, Any]:
    """Per-batch rows, and per platform the fit and the median of the batches' B_simple."""
    rows = batch_rows(trials)
    fits, b_simple = {}, {}
    for p in platforms:
        hit = [r for r in rows if r["platform"] == p and r["target_step"] is not None]
        fits[p] = fit_steps([r["batch"] for r in hit], [r["target_step"] for r in hit])
        values = [r["b_simple"] for r in hit if r["b_simple"]]
        b_simple[p] = float(np.median(values)) if values else None
    return {"rows": rows, "fits": fits, "b_simple": b_simple}


def compare_with_default(trials: Sequence[Mapping[str, Any]], default: Mapping[str, Any],
               target: float) -> dict[str, Any]:  # fmt: skip
    """The trial fastest to target (training seconds) against the default config's run."""
    hits = [t for t in trials if t["status"] == "reached" and t["platform"] == default["platform"]]
    if not hits or default["status"] != "reached":
        return {"fastest": None, "default": default}
    best = min(hits, key=lambda t: t["target_train_s"])
    ratio = default["target_train_s"] / best["target_train_s"]
    out = {"fastest": best, "default": default, "time_ratio": ratio,
           "epoch_ratio": default["target_epoch"] / best["target_epoch"]}  # fmt: skip
    if target == 0.98:  # the issue's floor: <= 5 epochs and <= 1/6 of the default's time
        out["floor_held"] = best["target_epoch"] <= 5 and ratio >= 6
    return out


def _f(v: Any, spec: str) -> str:
    """``v`` formatted by ``spec``; None as a dash of the same width."""
    width = re.match(r"\d*", spec).group()
    return format("-", f">{width}") if v is None else format(v, spec)


def format_report(summary: Mapping[str, Any], compare: Mapping[str, Any]) -> str:
    """The per-batch table, each platform's fit beside B_simple, and the default comparison."""
    head = (
        f"{'platform':8} {'batch':>5} {'best lr':>8} {'steps':>6} {'epochs':>7} "
        f"{'examples':>9} {'train s':>8} {'compile s':>9} {'B_simple':>9} {'reached':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in summary["rows"]:
        edge = "*" if r["lr_at_grid_edge"] else " "
        lines.append(
            f"{r['platform']:8} {r['batch']:5d} {_f(r['lr'], '8.4g')}{edge}"
            f"{_f(r['target_step'], '6d')}"
            f" {_f(r['target_epoch'], '7.3f')} {_f(r['target_examples'], '9d')}"
            f" {_f(r['target_train_s'], '8.2f')} {_f(r['compile_s'], '9.2f')}"
            f" {_f(r['b_simple'], '9.1f')} {r['reached']:>3}/{r['trials']:<3}")  # fmt: skip
    if any(r["lr_at_grid_edge"] for r in summary["rows"]):
        lines.append("(* best lr at the edge of its grid: the grid may not bracket the optimum)")
    for p, fit in summary["fits"].items():
        bs = _f(summary["b_simple"][p], ".1f")
        if fit is None:
            lines.append(f"{p}: fewer than 2 batch sizes reached the target: no fit")
            continue
        lines.append(
            f"{p}: S_min {fit['s_min']:.1f} steps, E_min {fit['e_min']:.0f} examples,"
            f" B_crit = E_min/S_min {fit['b_crit']:.1f} (rms {fit['rms_log']:.3f} in"
            f" log S, {fit['points']} batch sizes{', AT THE EDGE' * fit['at_edge']}"
            f"); B_simple {bs} (median over batch sizes of each best run's average)"
        )
    for p, c in compare.items():
        if c["fastest"] is None:
            lines.append(f"{p}: no comparison (the default or every trial missed the target)")
            continue
        f, d = c["fastest"], c["default"]
        held = {True: "; floor (<= 5 epochs, >= 6x) held", False: "; floor MISSED"}
        lines.append(f"{p}: fastest trial batch {f['batch']} lr {f['lr']:.4g}: epoch "
                     f"{f['target_epoch']:.3g}, {f['target_train_s']:.2f}s training; default"
                     f" config: epoch {d['target_epoch']}, {d['target_train_s']:.2f}s: "
                     f"{c['time_ratio']:.1f}x less time, {c['epoch_ratio']:.1f}x fewer epochs"
                     + held.get(c.get("floor_held"), ""))  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------ figures


def _by_platform(rows: Sequence[Record], key: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        if r.get(key) is not None:
            b, v = out.setdefault(r["platform"], ([], []))
            b.append(r["batch"])
            v.append(r[key])
    return out


def steps_figure(rows: Sequence[Record], fits: Mapping[str, Any],
                 b_simple: Mapping[str, float | None], title: str = "") -> Figure:  # fmt: skip
    """Steps and examples to target against batch (log-log), the fit, B_crit and B_simple."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5))
    ax_s, ax_e = fig.subplots(1, 2)
    for i, (platform, (b, s)) in enumerate(_by_platform(rows, "target_step").items()):
        color, b_arr, s_arr = f"C{i}", np.asarray(b, float), np.asarray(s, float)
        ax_s.plot(b_arr, s_arr, "o", color=color, label=f"measured ({platform})")
        ax_e.plot(b_arr, s_arr * b_arr, "o", color=color, label=f"measured ({platform})")
        perfect = s_arr[0] * b_arr[0] / b_arr  # S ∝ 1/B through the smallest batch
        ax_s.plot(b_arr, perfect, ":", color="0.5", label="perfect scaling (S ∝ 1/B)")
        ax_e.plot(b_arr, perfect * b_arr, ":", color="0.5", label="perfect scaling (E constant)")
        fit = fits.get(platform)
        if fit:
            dense = np.geomspace(b_arr.min(), b_arr.max(), 200)
            curve = fitted_steps(fit, dense)
            label = (f"fit: S_min {fit['s_min']:.3g}, E_min {fit['e_min']:.3g},"
                     f" B_crit {fit['b_crit']:.3g}")  # fmt: skip
            ax_s.plot(dense, curve, "-", color=color, lw=1, label=label)
            ax_e.plot(dense, curve * dense, "-", color=color, lw=1, label=label)
            ax_s.axhline(fit["s_min"], color=color, ls=(0, (1, 4)), lw=1, label="S_min")
            ax_e.axhline(fit["e_min"], color=color, ls=(0, (1, 4)), lw=1, label="E_min")
            for ax in (ax_s, ax_e):
                ax.axvline(fit["b_crit"], color=color, ls="--", lw=1, label="B_crit")
        if b_simple.get(platform):
            for ax in (ax_s, ax_e):
                ax.axvline(b_simple[platform], color=color, ls="-.", lw=1,
                           label=f"B_simple {b_simple[platform]:.3g}")  # fmt: skip
    for ax, name in ((ax_s, "steps to target"), (ax_e, "examples to target")):
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel=name)
        ax.grid(True, which="both", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        if unique:
            ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def seconds_figure(rows: Sequence[Record], title: str = "") -> Figure:
    """Training seconds to target (compilation apart) against batch, one line per platform."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for i, (platform, (b, s)) in enumerate(_by_platform(rows, "target_train_s").items()):
        ax.plot(b, s, "o-", color=f"C{i}", label=f"{platform}: training")
        comp = _by_platform(rows, "compile_s").get(platform)
        if comp:
            ax.plot(*comp, "x:", color=f"C{i}", label=f"{platform}: compilation (apart)")
    ax.set(xscale="log", yscale="log", xlabel="batch size",
           ylabel="seconds to target (best trial by steps)")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return fig


def b_simple_figure(curves: Mapping[int, Sequence[Record]], title: str = "") -> Figure:
    """Per batch size, the best trial's B_simple per evaluation, against the way to its hit.

    x is step / steps-to-target (0 to 1), so runs of every batch size line up; the
    thin line is every evaluation, the thick one a running median over 9 of them.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for i, (batch, history) in enumerate(sorted(curves.items())):
        pts = [(m["step"], m["b_simple"]) for m in history
               if m.get("b_simple") is not None and np.isfinite(m["b_simple"])]  # fmt: skip
        if not pts:
            continue
        steps, values = (np.asarray(v, np.float64) for v in zip(*pts, strict=True))
        x, color = steps / history[-1]["step"], f"C{i % 10}"
        ax.plot(x, values, lw=0.4, alpha=0.4, color=color)
        half = min(4, (len(values) - 1) // 2)
        smooth = [np.median(values[max(0, j - half) : j + half + 1]) for j in range(len(values))]
        ax.plot(x, smooth, lw=1.6, color=color, label=f"batch {batch}")
    ax.set(yscale="log", xlabel="step / steps to target (best trial)",
           ylabel="B_simple per evaluation interval")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    return fig
