r"""Every feedback rule, several seeds: test accuracy and alignment over training (issue 13).

    python experiments/feedback_rules.py                          # MNIST, 5 rules x 3 seeds
    python experiments/feedback_rules.py --dataset=fashion_mnist  # the same on Fashion-MNIST
    python experiments/feedback_rules.py --quick                  # 5 rules, 1 seed, 6000 images
    mkdir -p runs && nohup python experiments/feedback_rules.py --protocol=akrout \
        > runs/feedback_rules_akrout.log 2>&1 &                   # bp, fa, kp, 400 epochs each

Wall times measured on the shared 2-core CPU while other jobs ran (load average
5 to 7): the MNIST study 328 s (15 runs of 20 epochs, 16-28 s each; about 12 s
each on a quiet machine), Fashion-MNIST 219 s, ``--quick`` 28 s,
``--protocol=akrout`` 965 s (275-376 s per rule, about 0.7 s per epoch). Run
again, a study skips every finished run and only rewrites its files (6 s).

Each run is ``bpjax.train(bpjax.Config(feedback=rule, seed=seed, ...))`` in its
own workdir, ``<runs_dir>/<tag>/<rule>-seed<seed>``, so it is an ordinary run
record (``bpjax.load_run``, ``bpjax.runs_figure``). A run whose metrics already
hold every epoch is not run again; an unfinished one continues from its last
checkpoint (``resume=True``); ``--epochs`` larger than before extends the runs.

Protocols (``--protocol``):

* ``default``: the first document's network and update, ``bpjax.Config``'s:
  784-500-10 ReLU, softmax cross-entropy, Glorot-uniform W, plain SGD lr 0.1,
  batch 128; 20 epochs, seeds 0, 1, 2, every rule; kp with ``kp_decay`` 1e-4.
* ``akrout``: Akrout et al. 2019's MNIST runs as closely as the code allows
  (``makrout/Deep-Learning-without-Weight-Transport``, ``experiments/mnist/*-V0``):
  784-500-10 sigmoid, sigmoid cross-entropy (``bpjax.losses``), plain SGD,
  batch 128, 400 epochs, lr 0.2 (bp, fa; also dfa, sign if asked), 0.3 (kp),
  kp without weight decay, rules bp, fa, kp, seed 0. What still differs is in
  ``PROTOCOL_DIFFERENCES`` below, and printed with the results.

``--quick``: 5 epochs on the first 6000 training images, seed 0 (a smoke run;
its numbers are not the study's). Any of ``--rules``, ``--seeds``, ``--epochs``,
``--train_examples``, ``--lr``, ``--kp_decay`` overrides the protocol's value.

Output, in ``--out`` (default ``experiments/results/feedback_rules``), named by
the tag (``default-mnist``, ``default-fashion_mnist``, ``akrout-mnist``,
``default-mnist-n6000`` for ``--quick``):

* ``<tag>.json``: the settings, device info and argv (``meta``), one summary row
  per rule (``rows``), the floors, every run's config and per-epoch metrics;
* ``<tag>.csv``: one row per rule x seed x epoch; ``<tag>_summary.csv``: one row
  per rule (both plain: one header line);
* ``<tag>_accuracy.png``: test accuracy per rule, mean over seeds, band min-max;
* ``<tag>_alignment.png``: per rule, the hidden layer's update angle
  ∠(dW_rule, ∇_W C), the mean per-example error-signal angle ∠(δ_rule, δ_bp),
  and (fa, kp) the angle between W^2 and B^2, all on the fixed batch of the
  first 512 training images (``bpjax.alignment``).

Floors (the default protocol on all of MNIST at 20 epochs; measured, reported,
never tuned): fa and dfa >= 97.0% mean test accuracy; kp within 0.3 points of bp.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import flags, logging

from bpjax import cli
from bpjax.bench.report import csv_text, save_png, write_json
from bpjax.bench.study import train_or_stopped
from bpjax.config import Config, check_choices, check_positive_int, setting
from bpjax.data import Dataset, load_dataset
from bpjax.errors import ConfigError
from bpjax.feedback import FEEDBACK_RULES
from bpjax.files import write_atomic
from bpjax.rundir import read_metrics

PROTOCOLS = ("default", "akrout")
DATASETS = ("mnist", "fashion_mnist")
AKROUT_LR = {"bp": 0.2, "fa": 0.2, "kp": 0.3}  # experiments/mnist/*-V0/experiment_config.txt
AKROUT_OTHER_LR = 0.2  # dfa and sign are not in Akrout's study: FA's rate
# Akrout et al.'s committed logs, epoch index 399 (research-anchors.md, Feature 1b).
AKROUT_ANCHORS = {
    "bp": {"test_accuracy": 98.5},
    "fa": {"test_accuracy": 97.8, "delta_deg": 34.9, "weight_deg": 40.0},
    "kp": {"test_accuracy": 98.45, "delta_deg": 3.15, "weight_deg": 3.62},
}
FLOOR_FA_DFA = 97.0  # % MNIST test accuracy at 20 epochs, mean over seeds
FLOOR_KP_GAP = 0.3  # points of test accuracy: bp mean - kp mean at most this
PROTOCOL_DIFFERENCES = (
    "init: Akrout draws W, b and B from sqrt(1/(fan_in+fan_out)) N(0,1) (fcnn/FCNN_BP.py,"
    " FCNN_FA.py), nonzero biases; bpjax draws W and B Glorot-uniform, variance"
    " 2/(fan_in+fan_out), twice theirs, and b = 0",
    "KP decay: their FCNN_KP.py has weight_decay=1, a multiplicative factor, i.e. none; here"
    " kp_decay={kp_decay:g} (0 is theirs)",
    "batches: theirs in the fixed dataset order every epoch (no shuffle, the first 468 x 128"
    " images); here a fresh permutation per epoch (468 batches, a different 96 images left out)",
    "bias update: theirs b -= lr/M * mean_m(delta_m), the batch size divided out twice (biases"
    " learn M = 128 times slower); here db = mean_m(delta_m), (7.4) with 1/M once",
    "precision: theirs NumPy float64; here float32",
    "data: both MNIST pixels / 255 in [0, 1] with one-hot targets (the same)",
    "loss: theirs sigmoid then -y log a - (1-y) log(1-a) with nan_to_num; here the same loss"
    " from the logits, softplus(z) - y z (equal wherever theirs is finite)",
    "delta angle: theirs on ONE training sample (the first, every epoch), against a local"
    " delta_bp = W^T delta_rule * sigma' (the true one with one hidden layer); here delta_deg"
    " is the mean over the first 512 training images of the per-example angle to the true"
    " backprop delta; the W-vs-B angle is the same quantity (angle(W^T, B))",
    "seed: theirs NumPy seed 1111; the draws here are JAX's, so no run repeats theirs",
)


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """The study; None fields take the protocol's value (resolved in ``__post_init__``)."""

    protocol: str = setting("default", "default: Config's network and SGD; akrout: Akrout et"
                           " al. 2019's MNIST setting.", choices=PROTOCOLS)  # fmt: skip
    dataset: str = setting("mnist", "Training data.", choices=DATASETS)
    rules: tuple[str, ...] | None = setting(
        None, "Rules to train (default: all; akrout: bp,fa,kp).", choices=FEEDBACK_RULES
    )
    seeds: tuple[int, ...] | None = setting(None, "Seeds (default: 0,1,2; akrout, quick: 0).")
    epochs: int | None = setting(None, "Epochs per run (default 20; akrout 400; quick 5).")
    train_examples: int | None = setting(None, "Use only the first N training images"
                                         " (default: all; quick: 6000).")  # fmt: skip
    lr: float | None = setting(None, "Learning rate of every rule (default 0.1; akrout: bp 0.2,"
                               " fa 0.2, kp 0.3, others 0.2).")  # fmt: skip
    kp_decay: float | None = setting(None, "Kolen-Pollack weight decay (default 1e-4; akrout 0).")
    quick: bool = setting(False, "A smoke run (about 30 s): 5 epochs, 6000 images, seed 0.")
    out: str = setting("experiments/results/feedback_rules", "Folder of the JSON, CSV and PNGs.")
    runs_dir: str = setting("runs/feedback_rules", "Folder of the run workdirs (git-ignored).")
    verbose: bool = setting(False, "Print every epoch's line of every run.")

    def __post_init__(self) -> None:
        akrout, quick = self.protocol == "akrout", self.quick
        defaults = {
            "rules": ("bp", "fa", "kp") if akrout else FEEDBACK_RULES,
            "seeds": (0,) if akrout or quick else (0, 1, 2),
            "epochs": 5 if quick else 400 if akrout else 20,
            "train_examples": 6000 if quick else None,
            "kp_decay": 0.0 if akrout else Config().kp_decay,
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "rules", tuple(dict.fromkeys(self.rules)))
        object.__setattr__(self, "seeds", tuple(dict.fromkeys(self.seeds)))
        check_choices("rules", self.rules, FEEDBACK_RULES)
        check_choices("protocol", (self.protocol,), PROTOCOLS)
        check_choices("dataset", (self.dataset,), DATASETS)
        if not self.seeds:
            raise ConfigError("--seeds must name at least one seed")
        check_positive_int("epochs", self.epochs)

    @property
    def tag(self) -> str:
        """The name of the study's files and run folder: protocol, data and any overrides."""
        parts = [self.protocol, self.dataset]
        if self.train_examples:
            parts.append(f"n{self.train_examples}")
        if self.lr is not None:
            parts.append(f"lr{self.lr:g}")
        if self.kp_decay != StudySettings(protocol=self.protocol).kp_decay:
            parts.append(f"kpdecay{self.kp_decay:g}")
        return "-".join(parts)

    def rule_lr(self, rule: str) -> float:
        if self.lr is not None:
            return self.lr
        return AKROUT_LR.get(rule, AKROUT_OTHER_LR) if self.protocol == "akrout" else Config().lr


cli.define_flags(StudySettings)


def study_configs(s: StudySettings) -> list[Config]:
    """One ``Config`` per (rule, seed), rules outer; each run in its own resumable workdir."""
    net = dict(activation="sigmoid", loss="sigmoid_cross_entropy") if s.protocol == "akrout" else {}
    return [
        Config(
            feedback=rule,
            seed=seed,
            lr=s.rule_lr(rule),
            kp_decay=s.kp_decay,
            epochs=s.epochs,
            dataset=s.dataset,
            train_examples=s.train_examples,
            optimizer="sgd",
            batch=128,
            hidden=(500,),
            **net,
            workdir=os.path.join(s.runs_dir, s.tag, f"{rule}-seed{seed}"),
            resume=True,
            checkpoint_every=max(1, s.epochs // 20),
        )
        for rule in s.rules
        for seed in s.seeds
    ]


def finished_history(config: Config) -> list[dict[str, Any]] | None:
    """The run's first ``config.epochs`` metrics if it already has them all, else None."""
    if not os.path.isdir(config.workdir):
        return None
    history = read_metrics(config.workdir)
    if len(history) < config.epochs or history[config.epochs - 1]["epoch"] != config.epochs:
        return None
    return history[: config.epochs]


def run_one(config: Config, dataset: Dataset, verbose: bool) -> dict[str, Any]:
    """Trains (or skips, when finished) one run: its status, history and wall time."""
    t0 = time.perf_counter()
    history, status, reason = finished_history(config), "finished before", ""
    if history is None:  # a diverged run is a result too: report it, go on
        history, _, error = train_or_stopped(config, dataset, print if verbose else None)
        status, reason = ("trained", "") if error is None else ("stopped", error)
    return {"rule": config.feedback, "seed": config.seed, "lr": config.lr,
            "workdir": config.workdir, "status": status, "reason": reason,
            "wall_s": time.perf_counter() - t0, "config": config.to_dict(),
            "history": history}  # fmt: skip


# ------------------------------------------------------------------ summaries (pure)


def spread(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, sample std (ddof=1; None for fewer than 2), min and max of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": int(v.size), "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "min": float(v.min()), "max": float(v.max())}  # fmt: skip


ANGLES = ("alignment_deg", "delta_deg", "weight_deg")


def summarize(runs: Sequence[Mapping[str, Any]], epochs: int) -> list[dict[str, Any]]:
    """One row per rule: final test accuracy (%) and final angles (°) over the seeds.

    Only runs that reached ``epochs`` count; each angle is per hidden layer
    (``_l1``, ``_l2``, ...), absent for rules that do not report it.
    """
    rows = []
    for rule in dict.fromkeys(r["rule"] for r in runs):
        done = [r for r in runs if r["rule"] == rule and len(r["history"]) >= epochs]
        last = [r["history"][epochs - 1] for r in done]
        acc = spread([100 * m["test_accuracy"] for m in last])
        row = {"rule": rule, "lr": next(r["lr"] for r in runs if r["rule"] == rule),
               "seeds": len(done), "runs_stopped": sum(r["status"] == "stopped" for r in runs
                                                       if r["rule"] == rule),
               **{f"test_accuracy_{k}": v for k, v in acc.items() if k != "n"}}  # fmt: skip
        for key in ANGLES:
            layers = len(last[0].get(key, ())) if last else 0
            for i in range(layers):
                s = spread([m[key][i] for m in last])
                row.update({f"{key}_l{i + 1}_mean": s["mean"], f"{key}_l{i + 1}_std": s["std"]})
        # A run's own time (compilation included), as recorded: the same when it is skipped.
        row["run_s_mean"] = spread([r["history"][epochs - 1]["elapsed_s"] for r in done])["mean"]
        rows.append(row)
    return rows


def floors(rows: Sequence[Mapping[str, Any]], s: StudySettings) -> dict[str, Any]:
    """The issue's floors, where they apply (the default protocol on all of MNIST, 20 epochs)."""
    applies = (s.protocol, s.dataset, s.epochs, s.train_examples) == ("default", "mnist", 20, None)
    if not applies or s.lr is not None:
        return {"applies": False}
    acc = {r["rule"]: r["test_accuracy_mean"] for r in rows}
    out: dict[str, Any] = {"applies": True}
    for rule in ("fa", "dfa"):
        if acc.get(rule) is not None:
            out[f"{rule}_at_least_{FLOOR_FA_DFA:g}"] = {
                "mean": acc[rule],
                "held": acc[rule] >= FLOOR_FA_DFA,
            }
    if acc.get("kp") is not None and acc.get("bp") is not None:
        gap = acc["bp"] - acc["kp"]
        out[f"kp_within_{FLOOR_KP_GAP:g}_of_bp"] = {"bp_minus_kp": gap, "held": gap <= FLOOR_KP_GAP}
    return out


def curves(runs: Sequence[Mapping[str, Any]], key: str, layer: int = 0) -> dict[str, np.ndarray]:
    """``{rule: (seeds, epochs)}`` of ``key`` (per-layer keys: hidden layer ``layer``).

    Runs cut short (stopped) are padded with NaN to the longest run of the rule.
    """
    out = {}
    for rule in dict.fromkeys(r["rule"] for r in runs):
        histories = [r["history"] for r in runs if r["rule"] == rule]
        if not any(m.get(key) is not None for h in histories for m in h):
            continue  # the rule does not report it (bp: no angles; dfa, sign: no W-vs-B)
        pick = lambda v: np.nan if v is None else v[layer] if isinstance(v, list) else v  # noqa: E731
        series = [[pick(m.get(key)) for m in h] for h in histories]
        width = max(len(s) for s in series)
        out[rule] = np.array([s + [np.nan] * (width - len(s)) for s in series], np.float64)
    return out


# ------------------------------------------------------------------ files


def epoch_rows(runs: Sequence[Mapping[str, Any]], s: StudySettings) -> list[dict[str, Any]]:
    """One flat row per rule x seed x epoch (per-layer angles as ``<key>_l<i>`` columns)."""
    rows = []
    for r in runs:
        for m in r["history"]:
            row = {"protocol": s.protocol, "dataset": s.dataset, "rule": r["rule"],
                   "seed": r["seed"], "lr": r["lr"]}  # fmt: skip
            for k, v in m.items():
                if isinstance(v, list):
                    row.update({f"{k}_l{i + 1}": a for i, a in enumerate(v)})
                else:
                    row[k] = v
            rows.append(row)
    return rows


def _band(ax, values: np.ndarray, rule: str, scale: float = 1.0) -> None:
    """Mean over seeds as a line, min-max over seeds as a band; one colour per rule."""
    from matplotlib.ticker import MaxNLocator

    epochs = np.arange(1, values.shape[1] + 1)
    color = f"C{FEEDBACK_RULES.index(rule)}"
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot(epochs, scale * np.nanmean(values, 0), label=rule, lw=1.5, color=color)
    if values.shape[0] > 1:
        ax.fill_between(epochs, scale * np.nanmin(values, 0), scale * np.nanmax(values, 0),
                        alpha=0.25, color=color, lw=0)  # fmt: skip


def accuracy_figure(runs: Sequence[Mapping[str, Any]], title: str):
    """Test accuracy against epoch, one line per rule, band min-max over seeds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    acc = curves(runs, "test_accuracy")
    for rule, values in acc.items():
        _band(ax, values, rule, scale=100)
    if acc:  # from the lowest mean a tenth into training up: the end of the curves readable
        width = max(v.shape[1] for v in acc.values())
        at = min(max(1, -(-width // 10)), width) - 1
        low = min(100 * np.nanmean(v[:, min(at, v.shape[1] - 1)]) for v in acc.values())
        high = max(100 * np.nanmax(v) for v in acc.values())
        ax.set_ylim(max(low - 0.5, 0), min(high + 0.3, 100))
    ax.set(xlabel="epoch", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    return fig


def alignment_figure(runs: Sequence[Mapping[str, Any]], title: str):
    """The hidden layer's angles over training: update, error signal, W vs B (fa, kp)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.5))
    panels = (("alignment_deg", "∠(dW_rule, true gradient), hidden layer"),
              ("delta_deg", "mean per-example ∠(δ_rule, δ_bp)"),
              ("weight_deg", "∠(W², B²), fa and kp"))  # fmt: skip
    for ax, (key, name) in zip(fig.subplots(1, 3), panels, strict=True):
        for rule, values in curves(runs, key).items():
            _band(ax, values, rule)
        ax.set(xlabel="epoch", ylabel="degrees", title=name, ylim=(0, None))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.suptitle(title, fontsize=9)
    return fig


def write_outputs(s: StudySettings, runs: list[dict[str, Any]], rows: list[dict[str, Any]],
                  checked: dict[str, Any], wall_s: float) -> list[str]:  # fmt: skip
    """JSON, the two CSVs and the two PNGs; returns their paths."""
    base = os.path.join(s.out, s.tag)
    paths = [f"{base}.json", f"{base}.csv", f"{base}_summary.csv", f"{base}_accuracy.png",
             f"{base}_alignment.png"]  # fmt: skip
    extra = {"floors": checked, "wall_s": wall_s, "runs": runs,
             "protocol_differences": differences(s),
             "anchors": AKROUT_ANCHORS if s.protocol == "akrout" else None}  # fmt: skip
    write_json(paths[0], s, rows, **extra)
    write_atomic(paths[1], csv_text(epoch_rows(runs, s)))
    write_atomic(paths[2], csv_text(rows))
    net = "784-500-10 sigmoid, sigmoid CE" if s.protocol == "akrout" else "784-500-10 ReLU"
    title = (f"{s.dataset}, {net}, SGD batch 128, {s.epochs} epochs, "
             f"{len(s.seeds)} seed(s) (band: min-max), protocol {s.protocol}")  # fmt: skip
    save_png(accuracy_figure(runs, title), paths[3])
    save_png(alignment_figure(runs, title), paths[4])
    return paths


def differences(s: StudySettings) -> list[str]:
    """What still differs from Akrout et al.'s protocol (akrout protocol only)."""
    if s.protocol != "akrout":
        return []
    return [d.format(kp_decay=s.kp_decay) for d in PROTOCOL_DIFFERENCES]


# ------------------------------------------------------------------ the report


def _pm(row: Mapping[str, Any], key: str, digits: int = 2) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def report(rows: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]],
           s: StudySettings) -> str:  # fmt: skip
    """The tables the script prints: final numbers per rule, then the angle over training."""
    akrout = s.protocol == "akrout"
    head = (f"{'rule':5} {'lr':>5} {'seeds':>5} {'test acc % mean ± std':>22} {'min-max':>13} "
            f"{'∠dW° (l1)':>13} {'∠δ° (l1)':>13} {'∠W,B° (l1)':>13}"
            + ("  Akrout log: acc / ∠δ° / ∠W,B°" if akrout else ""))  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        rng = ("-" if r["test_accuracy_min"] is None
               else f"{r['test_accuracy_min']:.2f}-{r['test_accuracy_max']:.2f}")  # fmt: skip
        a = AKROUT_ANCHORS.get(r["rule"], {}) if akrout else {}
        anchor = " / ".join(str(a.get(k, "-")) for k in ("test_accuracy", *ANGLES[1:]))
        lines.append(
            f"{r['rule']:5} {r['lr']:5g} {r['seeds']:5d} {_pm(r, 'test_accuracy'):>22} "
            f"{rng:>13} {_pm(r, 'alignment_deg_l1', 1):>13} {_pm(r, 'delta_deg_l1', 1):>13} "
            f"{_pm(r, 'weight_deg_l1', 1):>13}" + (f"  {anchor}" if akrout else "")
        )
    marks = sorted({1, max(1, s.epochs // 4), max(1, s.epochs // 2), s.epochs})
    lines += ["", "update angle ∠(dW_rule, true gradient), hidden layer, mean over seeds, by epoch",
              f"{'rule':5} " + " ".join(f"{'ep ' + str(e):>8}" for e in marks)]  # fmt: skip
    for rule, values in curves(runs, "alignment_deg").items():
        mean = np.nanmean(values, 0)
        lines.append(f"{rule:5} " + " ".join(
            f"{mean[e - 1]:8.1f}" if e <= mean.size else f"{'-':>8}" for e in marks))  # fmt: skip
    return "\n".join(lines)


def floor_lines(checked: Mapping[str, Any]) -> list[str]:
    if not checked.get("applies"):
        return ["floors: not checked (they apply to --protocol=default on all of MNIST, 20 epochs)"]
    out = []
    for name, f in checked.items():
        if name == "applies":
            continue
        value = f.get("mean", f.get("bp_minus_kp"))
        what = "mean test accuracy" if "mean" in f else "bp - kp (points)"
        out.append(f"floor {name}: {what} {value:.2f} -> {'held' if f['held'] else 'MISSED'}")
    return out


def run_line(r: Mapping[str, Any]) -> str:
    """One run's progress line: status, final test accuracy and update angle, wall time."""
    last = r["history"][-1] if r["history"] else {}
    acc, angle = last.get("test_accuracy"), last.get("alignment_deg")
    return (f"  {r['rule']:5} seed {r['seed']}: {r['status']:15} epochs {len(r['history'])}"
            f"  test acc {'-' if acc is None else f'{100 * acc:.2f}%'}"
            + (f"  ∠dW {angle[0]:.1f}°" if angle else "")
            + f"  {r['wall_s']:.1f}s" + (f"  {r['reason']}" if r["reason"] else ""))  # fmt: skip


def main(argv: Sequence[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint at INFO
    s = cli.from_flags(StudySettings)
    t0 = time.perf_counter()
    configs = study_configs(s)
    print(f"feedback_rules: {s.tag}, rules {','.join(s.rules)}, seeds "
          f"{','.join(map(str, s.seeds))}, {s.epochs} epochs, {len(configs)} runs in "
          f"{os.path.join(s.runs_dir, s.tag)}", flush=True)  # fmt: skip
    dataset = load_dataset(s.dataset)
    runs = []
    for config in configs:
        runs.append(run_one(config, dataset, s.verbose))
        print(run_line(runs[-1]), flush=True)
    rows = summarize(runs, s.epochs)
    checked = floors(rows, s)
    wall_s = time.perf_counter() - t0
    paths = write_outputs(s, runs, rows, checked, wall_s)
    print("\n" + report(rows, runs, s) + "\n")
    print("\n".join(floor_lines(checked)))
    if s.protocol == "akrout":
        print("still different from Akrout et al.'s protocol:")
        print("\n".join(f"  - {d}" for d in differences(s)))
    print(f"wrote {', '.join(paths)}")
    print(f"study wall time {wall_s:.1f}s")


if __name__ == "__main__":
    cli.run(main)
