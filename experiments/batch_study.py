r"""Steps, examples and seconds to a target test accuracy against batch size (issue 14).

    python experiments/batch_study.py --quick       # 4 batches x 2 lrs, 95 %: 47 s
    nohup python experiments/batch_study.py > runs/batch_study.log 2>&1 &   # 50 trials: 9.3 min

The default study: SGD, batches 16, 32, ..., 8192, 5 learning rates each, to 97 % MNIST
test accuracy. The fastest configurations to 98 %, each against ``bpjax.Config(epochs=40)``
trained first in the same process (``--compare_default``):

    python experiments/batch_study.py --target_accuracy=0.98 --batches=32,64,128,256,512,1024 \
        --lr=0.6 --lrs_per_batch=3 --max_epochs=8 --evals_per_epoch=8 --compare_default  # 116 s
    python experiments/batch_study.py --optimizer=momentum --target_accuracy=0.98 \
        --batches=32,64,128,256,512,1024 --lr=0.24 --lrs_per_batch=3 --max_epochs=8 \
        --evals_per_epoch=8 --compare_default                                          # 109 s
    python experiments/batch_study.py --target_accuracy=0.98 --lr_schedule=warmup_cosine \
        --warmup_epochs=0.5 --max_epochs=5 --batches=32,64,128,256 --lr=1.2 \
        --lrs_per_batch=3 --evals_per_epoch=8 --compare_default                        # 59 s
    python experiments/batch_study.py --optimizer=momentum --target_accuracy=0.98 \
        --lr_schedule=warmup_cosine --warmup_epochs=0.5 --max_epochs=5 \
        --batches=32,64,128,256,512 --lr=0.12 --lrs_per_batch=3 --evals_per_epoch=8 \
        --compare_default                                                              # 72 s

Everything goes under ``runs/`` (git-ignored) by default; the committed results in
``experiments/results/batch_study/`` are rewritten only when ``--out_dir`` names that folder
(add ``--out_dir=experiments/results/batch_study`` to the commands above to regenerate them).

Wall times measured on a shared 2-core CPU at load average 1-2 (at load 8: --quick
2.6 min, the default study 13.3 min). A second invocation skips every finished trial
and only rewrites the files (3 s). Steps to target do not depend on the load (two runs
of the default study gave the same outcome in all 50 trials); seconds do.

For each batch size and each learning rate of its grid, one trial:
``bpjax.train(Config(batch, lr, target_accuracy, noise_scale=True, ...))`` until the
target or the trial's budget, in its own resumable workdir
``<runs_dir>/<tag>/<platform>/b<batch>/lr<lr>`` (``runs/`` is git-ignored), with a
``trial.json`` once it finished: reached, budget (exhausted without reaching) or
diverged (``TrainingError``: an infeasible trial, as in Shallue et al.'s data). A
finished trial is not run again; an unfinished one continues from its checkpoint, and so
does one whose ``trial.json`` is torn, incomplete or damaged (with a warning on stderr).
Definitions (steps to target, the S_min/E_min/B_crit fit, B_simple of a run) are in
``bpjax.bench.study``; per batch the best trial is the one with the fewest steps.

* grid: ``--lrs_per_batch`` rates ``--lr_factor`` apart, centred on
  ``--lr`` · s(batch/``--lr_reference_batch``), s from ``--lr_scaling``; the centre
  runs first, then outwards. Default lr: 0.3 (sgd), 0.03 (momentum, the same
  lr/(1-β)), 1e-3 (adam).
* budget: ``--max_epochs``, fewer where ``--max_steps`` comes first. With
  ``--prune`` (default; not under cosine schedules, whose lr depends on the
  epochs) a trial's budget is cut to the epochs holding the best hit so far at
  its batch: a later hit cannot lower the minimum.
* evaluation: every ``eval_every_steps`` steps, the divisor of the steps per
  epoch giving about ``--evals_per_epoch`` evaluations (``study.eval_every``).
  ``--train_examples`` defaults to 57344 = 7·8192, the first 95.6 % of MNIST's
  training images, so every power-of-two batch up to 8192 splits an epoch exactly
  (60000/64 = 937 steps is prime: one evaluation per epoch, no resolution).
* seconds: ``train_s`` at the hit (training only), compilation beside it.
  Evaluating the 10k test images takes about 0.05-0.1 s on this CPU, more than
  an epoch's training at 32 evaluations per epoch: the 98 % runs use 8.
* ``--platforms=cpu,gpu`` runs the whole grid on each platform (workdirs per
  platform): the steps should agree; the seconds are the point.
* one ``--seed`` for every trial: the same initial parameters and the same
  shuffles, so every trial sees the examples in the same order and hits line
  up with the data stream (to 97 %, batches 16, 32 and 64 all first hit after
  55552 examples, 31/32 of the first epoch); another seed moves them.
* B_simple per batch: the best run's |G|²-weighted average (``study.run_b_simple``);
  the CSV also has each run's median over evaluations (``b_simple_median``), larger,
  since B_simple grows over a run.

Output in ``--out_dir`` (``<name>`` = the tag, plus ``-quick``): ``<name>.json``
(settings, devices, the grid, every trial, the per-batch rows, the fits, the
default run), ``<name>.csv`` (one row per trial), ``<name>_steps.png`` (steps and
examples to target, log-log, perfect scaling, the fit, B_crit, B_simple),
``<name>_seconds.png`` (seconds to target per platform), ``<name>_b_simple.png``
(B_simple over training, per batch size).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import flags, logging

from bpjax import cli
from bpjax.bench import study
from bpjax.bench.report import csv_text, save_png, write_json
from bpjax.bench.timing import device_info
from bpjax.config import (
    LR_SCALINGS,
    LR_SCHEDULES,
    OPTIMIZERS,
    PLATFORMS,
    Config,
    check_choices,
    check_positive_int,
    scaled_lr,
    setting,
)
from bpjax.data import Dataset, dataset_shape, load_dataset
from bpjax.errors import ConfigError, first_line
from bpjax.evaluation import meets_target
from bpjax.files import write_atomic
from bpjax.outputs import check_out_dir, writing
from bpjax.rundir import read_metrics

DEFAULT_LR = {"sgd": 0.3, "momentum": 0.03, "adam": 1e-3}
FINISHED = ("reached", "budget", "diverged")
STUDY_EXAMPLES = 7 * 8192


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """The study; None fields take the default (or ``--quick``) value in ``__post_init__``."""

    batches: tuple[int, ...] | None = setting(None, "Batch sizes (default 16,32,...,8192;"
                                              " quick: 32,128,512,2048).")  # fmt: skip
    lr: float | None = setting(None, "Reference lr at --lr_reference_batch (default: 0.3 sgd,"
                               " 0.03 momentum, 1e-3 adam).")  # fmt: skip
    lr_reference_batch: int = setting(128, "The batch --lr is given for.")
    lr_scaling: str = setting("sqrt", "How the grid's centre follows the batch.",
                              choices=LR_SCALINGS)  # fmt: skip
    lrs_per_batch: int | None = setting(None, "Learning rates per batch (default 5; quick 2).")
    lr_factor: float = setting(2.0, "Ratio of neighbouring learning rates of a grid.")
    optimizer: str = setting("sgd", "The update rule.", choices=OPTIMIZERS)
    momentum: float = setting(0.9, "Momentum for --optimizer=momentum.")
    lr_schedule: str = setting("constant", "Schedule of every trial.", choices=LR_SCHEDULES)
    warmup_epochs: float = setting(0.0, "Warm-up epochs (warmup_* schedules).")
    target_accuracy: float | None = setting(None, "Target test accuracy (default 0.97;"
                                            " quick 0.95).")  # fmt: skip
    max_epochs: int | None = setting(None, "Budget per trial in epochs (default 60; quick 10).")
    max_steps: int | None = setting(None, "Budget per trial in steps, if it comes first"
                                    " (default 10000; quick 2000; 0: none).")  # fmt: skip
    evals_per_epoch: int = setting(32, "About this many evaluations per epoch.")
    target_split: str = setting("validation", "Where targets and best epochs are read: the"
                                " validation hold-out (new results) or test (the README's"
                                " tables).", choices=("validation", "test"))  # fmt: skip
    validation_examples: int | None = setting(None, "Training images held out for validation"
                                              " (default 10000 under --target_split=validation,"
                                              " else 0).")  # fmt: skip
    train_examples: int | None = setting(None, "Training images after the hold-out (default:"
                                         " the most multiples of 8192 up to 57344).")  # fmt: skip
    dataset: str = setting("mnist", "Training data.", choices=("mnist", "fashion_mnist"))
    data_dir: str | None = setting(None, "The four IDX files (plain or .gz); default: cache.")
    platforms: tuple[str, ...] | None = setting(None, "Platforms to run the study on (default:"
                                                " JAX's).", choices=PLATFORMS)  # fmt: skip
    seed: int = setting(0, "Seed of every trial.")
    prune: bool = setting(True, "Cut a trial's budget to the best hit so far at its batch.")
    compare_default: bool = setting(False, "First train bpjax.Config(epochs=40) to the same"
                                    " target; compare the fastest trial with it.")  # fmt: skip
    quick: bool = setting(False, "A reduced grid, a few minutes on 2 cores.")
    out_dir: str = setting(
        "runs/batch_study", "Folder of the JSON, CSV, PNGs (the committed results: only when"
        " --out_dir=experiments/results/batch_study names them)."
    )
    runs_dir: str = setting("runs/batch_study", "Folder of the trials' workdirs (git-ignored).")
    verbose: bool = setting(False, "Print every evaluation line of every trial.")

    def __post_init__(self) -> None:
        q = self.quick
        defaults = {"batches": (32, 128, 512, 2048) if q else tuple(2**k for k in range(4, 14)),
                    "lr": DEFAULT_LR[self.optimizer], "lrs_per_batch": 2 if q else 5,
                    "target_accuracy": 0.95 if q else 0.97, "max_epochs": 10 if q else 60,
                    "max_steps": 2000 if q else 10000,
                    "platforms": (jax.default_backend(),),
                    "validation_examples": 10000 if self.target_split == "validation" else 0}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.train_examples is None:
            object.__setattr__(self, "train_examples", self.default_train_examples)
        self._check()

    @property
    def default_train_examples(self) -> int:
        """7·8192 = 57344 without a hold-out; 6·8192 = 49152 after 10000 held out."""
        rest = dataset_shape(self.dataset).n_train - self.validation_examples
        return min(STUDY_EXAMPLES, max(8192 * (rest // 8192), min(rest, 8192)))

    def _check(self) -> None:
        check_choices("platforms", self.platforms, PLATFORMS)
        for name in ("lrs_per_batch", "max_epochs", "evals_per_epoch", "train_examples"):
            check_positive_int(name, getattr(self, name))
        if self.max_steps < 0:
            raise ConfigError("--max_steps must be 0 (no step budget) or a positive integer,"
                              f" got {self.max_steps}")  # fmt: skip
        if not self.batches or any(b < 2 for b in self.batches):
            raise ConfigError(f"--batches must be sizes >= 2 (B_simple needs 2): {self.batches}")
        if max(self.batches) > self.train_examples:  # an epoch of such a batch has no step
            raise ConfigError(f"--batches: {max(self.batches)} is larger than --train_examples="
                              f"{self.train_examples}: an epoch would have no step")  # fmt: skip
        if self.validation_examples < 0 or (self.target_split == "validation"
                                            and not self.validation_examples):  # fmt: skip
            raise ConfigError("--target_split=validation needs --validation_examples > 0")
        n = dataset_shape(self.dataset).n_train - self.validation_examples
        if self.train_examples > n:
            held = self.validation_examples and f" left after {self.validation_examples} held out"
            raise ConfigError(f"--train_examples={self.train_examples} is more than the {n}"
                              f" training images{held or ''} of {self.dataset}")  # fmt: skip
        if not (self.lr_factor > 1 and self.lr > 0 and 0 < self.target_accuracy <= 1):
            raise ConfigError("--lr_factor must be > 1, --lr > 0, --target_accuracy in (0, 1]")

    @property
    def tag(self) -> str:
        """The trials' folder: what changes a trial's trajectory or end, besides batch and lr."""
        parts = [self.dataset, self.optimizer, self.lr_schedule, f"t{100 * self.target_accuracy:g}"]
        parts += [f"w{self.warmup_epochs:g}"] if self.warmup_epochs else []
        parts += [f"e{self.max_epochs}"] if not self.prunable else []
        momentum = self.optimizer == "momentum" and self.momentum != 0.9
        parts += [f"m{self.momentum:g}"] if momentum else []
        held = self.validation_examples
        parts += [f"val{held}"] if held else []  # new results: targets on the hold-out
        parts += ["ontest"] if held and self.target_split == "test" else []
        n, default = self.train_examples, self.default_train_examples
        parts += [f"n{n}"] if n != default else []
        return "-".join(parts + ([f"seed{self.seed}"] if self.seed else []))

    @property
    def name(self) -> str:
        return self.tag + ("-quick" if self.quick else "")

    @property
    def prunable(self) -> bool:
        """Is a trial's trajectory independent of its epochs (so its budget may be cut)?"""
        return "cosine" not in self.lr_schedule


cli.define_flags(StudySettings)


# ------------------------------------------------------------------ trials


def trial_config(s: StudySettings, platform: str, batch: int, lr: float, epochs: int,
                 every: int, workdir: str) -> Config:  # fmt: skip
    return Config(batch=batch, lr=lr, optimizer=s.optimizer, momentum=s.momentum,
                  lr_schedule=s.lr_schedule, warmup_epochs=s.warmup_epochs, epochs=epochs,
                  dataset=s.dataset, train_examples=s.train_examples, seed=s.seed,
                  platform=platform, eval_every_steps=every, target_accuracy=s.target_accuracy,
                  noise_scale=True, workdir=workdir, resume=True, checkpoint_every=5,
                  keep_checkpoints=1, validation_examples=s.validation_examples,
                  target_split=s.target_split)  # fmt: skip


_NUM, _OPT_NUM, _OPT_INT = (int, float), (int, float, type(None)), (int, type(None))
# Every key run_trial writes, with its types: a trial.json without one of them, or with
# another type (torn by a crash, hand-edited), is no record of a finished trial.
RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "platform": (str,), "batch": (int,), "lr": _NUM, "status": (str,), "budget_epochs": (int,),
    "steps_per_epoch": (int,), "eval_every_steps": _OPT_INT, "target_step": _OPT_INT,
    "target_epoch": _OPT_NUM, "target_examples": _OPT_INT, "target_train_s": _OPT_NUM,
    "target_elapsed_s": _OPT_NUM, "compile_s": _OPT_NUM, "final_step": (int,),
    "final_epoch": _NUM, "best_test_accuracy": _OPT_NUM, "b_simple": _OPT_NUM,
    "b_simple_median": _OPT_NUM, "wall_s": _NUM, "load_average": _NUM, "reason": (str,),
    "workdir": (str,),
}  # fmt: skip


def recorded(workdir: str, **expected: Any) -> dict[str, Any] | None:
    """The ``trial.json`` of ``workdir``, or None when there is none or it is unusable.

    An unusable record (not JSON, a key missing or of another type, an unknown
    status, a hit without its step, or a trial other than ``expected``, e.g.
    ``batch=64``) gets a warning on stderr: the trial runs again, resuming its workdir.
    """
    path = os.path.join(workdir, "trial.json")
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = f"unreadable ({type(e).__name__}: {first_line(e)})"
    else:
        problem = record_problem(record, expected)
    if problem is None:
        return record
    print(f"warning: {path} is {problem}: running the trial again", file=sys.stderr, flush=True)
    return None


def record_problem(record: Any, expected: Mapping[str, Any]) -> str | None:
    """What makes ``record`` no record of a finished trial (see :func:`recorded`), or None."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    for key, types in RECORD_TYPES.items():
        if key not in record:
            return f"incomplete (no {key!r})"
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, types):
            return f"damaged ({key!r} is {value!r})"
    if record["status"] not in FINISHED:
        return f"damaged (status {record['status']!r} is not one of {', '.join(FINISHED)})"
    if record["status"] == "reached" and None in (record["target_step"], record["target_epoch"],
                                                  record["target_train_s"]):  # fmt: skip
        return "damaged (reached, but no target_step, target_epoch or target_train_s)"
    for key, value in expected.items():
        same = math.isclose(record[key], value) if key == "lr" else record[key] == value
        if not same:
            return f"another trial's record ({key} {record[key]!r}, expected {value!r})"
    return None


def finished(record: Mapping[str, Any] | None, epochs: int) -> bool:
    """Reached or diverged; or out of a budget at least as large as the one it would get now."""
    if record is None or record.get("status") not in FINISHED:
        return False
    return record["status"] != "budget" or record["budget_epochs"] >= epochs


def run_trial(config: Config, dataset: Dataset, verbose: bool, **fields: Any) -> dict[str, Any]:
    """Trains one trial (resuming its workdir), writes and returns its ``trial.json`` record.

    A trial stopped by a ``TrainingError`` (diverged, or out of memory) is infeasible.
    """
    t0 = time.perf_counter()
    log = (lambda line: print("    " + line, flush=True)) if verbose else None
    history, compile_s, error = study.train_or_stopped(config, dataset, log)
    split = config.target_split  # targets and the best epoch: on the validation hold-out
    hit = next((m for m in history if meets_target(m, config.target_accuracy, None, split)), None)
    key = "val_accuracy" if split == "validation" else "test_accuracy"
    best = max(history, key=lambda m: m.get(key) or 0.0, default={})
    status = "reached" if hit else "diverged" if error else "budget"
    last = history[-1] if history else {}
    upto = [m for m in history if hit is None or m["step"] <= hit["step"]]
    noise = study.run_b_simple(upto)
    rows = config.train_examples or dataset.x_train.shape[0] - config.validation_examples
    steps_per_epoch = rows // config.batch
    record = {
        "platform": config.platform, "batch": config.batch, "lr": config.lr, "status": status,
        **fields, "budget_epochs": config.epochs, "steps_per_epoch": steps_per_epoch,
        "eval_every_steps": config.eval_every_steps,
        "target_step": hit["step"] if hit else None,
        "target_epoch": hit["epoch"] if hit else None,
        "target_examples": hit["step"] * config.batch if hit else None,
        "target_train_s": hit["train_s"] if hit else None,
        "target_elapsed_s": hit["elapsed_s"] if hit else None,
        "compile_s": compile_s,
        "final_step": last.get("step", 0), "final_epoch": last.get("epoch", 0),
        "best_test_accuracy": max((m["test_accuracy"] for m in history), default=None),
        "target_split": split, "test_accuracy_at_target": hit["test_accuracy"] if hit else None,
        "best_epoch": best.get("epoch"), "best_accuracy": best.get(key),
        "test_accuracy_at_best": best.get("test_accuracy"),
        "b_simple": noise["ratio"], "b_simple_median": noise["median"],
        "wall_s": time.perf_counter() - t0, "load_average": os.getloadavg()[0],
        "reason": error or "", "workdir": config.workdir,
    }  # fmt: skip
    with writing("runs_dir", config.workdir):
        write_atomic(os.path.join(config.workdir, "trial.json"),
                     json.dumps(record, indent=1) + "\n")  # fmt: skip
    return record


def batch_trials(s: StudySettings, platform: str, grid: Mapping[str, Any], dataset: Dataset,
                 progress: Progress) -> list[dict[str, Any]]:  # fmt: skip
    """One batch size's trials, centre first; a hit caps the later budgets.

    ``grid``: the batch size's entry of :func:`study_grid` (lrs, cadence, full budget).
    """
    batch, spe, lrs = grid["batch"], grid["steps_per_epoch"], grid["lrs"]
    every, full = grid["eval_every_steps"], grid["budget_epochs"]
    centre = scaled_lr(s.lr, batch, s.lr_reference_batch, s.lr_scaling)  # the lrs' centre
    trials, best_step = [], None
    for i in study.trial_order(len(lrs)):
        epochs = full
        if s.prune and s.prunable and best_step is not None:
            epochs = min(full, max(math.ceil(best_step / spe), math.ceil(s.warmup_epochs)))
        workdir = os.path.join(s.runs_dir, s.tag, platform, f"b{batch}", f"lr{lrs[i]:.6g}")
        record = recorded(workdir, platform=platform, batch=batch, lr=lrs[i])
        ran = not finished(record, epochs)
        if ran:
            config = trial_config(s, platform, batch, lrs[i], epochs, every, workdir)
            record = run_trial(config, dataset, s.verbose, lr_index=i, lr_centre=centre,
                               pruned=epochs < full)  # fmt: skip
        trials.append(record)
        progress.line(record, ran, s.target_accuracy)
        if record["status"] == "reached":
            best_step = min(best_step or math.inf, record["target_step"])
    return sorted(trials, key=lambda t: t["lr"])


class Progress:
    """One line per trial: its outcome, its wall time, and the study's ETA."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.run_s, self.ran = total, 0, 0.0, 0

    def line(self, t: Mapping[str, Any], ran: bool, target: float) -> None:
        self.done += 1
        if ran:
            self.ran, self.run_s = self.ran + 1, self.run_s + t["wall_s"]
        left = self.total - self.done
        eta = f"{self.run_s / self.ran * left / 60:.1f} min" if self.ran else "?"
        if t["status"] == "reached":
            what = (f"{100 * target:g}% at step {t['target_step']} (epoch {t['target_epoch']:.3g},"
                    f" {t['target_train_s']:.2f}s training)")  # fmt: skip
        else:
            best = t["best_test_accuracy"]
            what = (f"{t['status']} after {t['final_epoch']:.3g}/{t['budget_epochs']} epochs"
                    + (f", best {100 * best:.2f}%" if best is not None else ""))  # fmt: skip
        print(f"[{self.done}/{self.total}] {t['platform']} batch {t['batch']:5d} lr {t['lr']:<9.4g}"
              f" {what}; {t['wall_s']:.1f}s{'' if ran else ' (finished before)'}; ETA {eta}",
              flush=True)  # fmt: skip


def default_run(s: StudySettings, platform: str, dataset: Dataset) -> dict[str, Any]:
    """``bpjax.Config(epochs=40)`` (batch 128, lr 0.1, sgd, all images) to the same target."""
    workdir = os.path.join(s.runs_dir, s.tag, platform, "default-config")
    record = recorded(workdir, platform=platform)
    if not finished(record, 40):
        config = Config(epochs=40, target_accuracy=s.target_accuracy, dataset=s.dataset,
                        seed=s.seed, platform=platform, workdir=workdir, resume=True,
                        validation_examples=s.validation_examples,
                        target_split=s.target_split)  # fmt: skip
        record = run_trial(config, dataset, s.verbose)
    print(f"default config (batch 128, lr 0.1, sgd, all images, evaluated per epoch): "
          f"{record['status']} at epoch {record['target_epoch']}, "
          f"{record['target_train_s'] or math.nan:.2f}s training", flush=True)  # fmt: skip
    return record


# ------------------------------------------------------------------ results


def study_grid(s: StudySettings) -> list[dict[str, Any]]:
    """Per batch size: its learning rates, steps per epoch, evaluation cadence, full budget."""
    out = []
    for batch in s.batches:
        spe = s.train_examples // batch
        out.append({"batch": batch, "steps_per_epoch": spe,
                    "eval_every_steps": study.eval_every(spe, s.evals_per_epoch),
                    "budget_epochs": study.budget_epochs(spe, s.max_epochs, s.max_steps),
                    "lrs": study.lr_grid(batch, s.lr, s.lr_reference_batch, s.lr_scaling,
                                         s.lrs_per_batch, s.lr_factor)})  # fmt: skip
    return out


def b_simple_curves(trials: Sequence[Mapping[str, Any]], platform: str) -> dict[int, list]:
    """Per batch size: the best trial's evaluation records up to its hit."""
    out = {}
    for (p, batch), best in study.best_trials(trials).items():
        if best is not None and p == platform:
            out[batch] = [m for m in read_metrics(best["workdir"])
                          if m["step"] <= best["target_step"]]  # fmt: skip
    return out


def write_outputs(s: StudySettings, trials: list[dict[str, Any]], summary: dict[str, Any],
                  extra: dict[str, Any]) -> list[str]:  # fmt: skip
    """``<name>.json``, ``<name>.csv`` and the three PNGs; returns their paths."""
    base = os.path.join(s.out_dir, s.name)
    paths = [f"{base}{end}" for end in (".json", ".csv", "_steps.png", "_seconds.png",
                                         "_b_simple.png")]  # fmt: skip
    write_json(paths[0], s, trials, batches=summary["rows"], fits=summary["fits"],
               b_simple=summary["b_simple"], **extra)  # fmt: skip
    write_atomic(paths[1], csv_text(trials))
    title = (
        f"{s.dataset}, 784-500-10 ReLU, {s.optimizer} ({s.lr_schedule}), target "
        f"{100 * s.target_accuracy:g}% {s.target_split} accuracy, {s.lrs_per_batch} lrs per batch"
        f" ({s.lr_scaling} rule, x{s.lr_factor:g} apart), {s.train_examples} images"
    )
    save_png(study.steps_figure(summary["rows"], summary["fits"], summary["b_simple"], title),
             paths[2])  # fmt: skip
    save_png(study.seconds_figure(summary["rows"], title), paths[3])
    curves = b_simple_curves(trials, s.platforms[0])
    save_png(study.b_simple_figure(curves, f"{title}; {s.platforms[0]}, best trial per batch,"
                                   " up to its hit"), paths[4])  # fmt: skip
    return paths


def main(argv: Sequence[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint at INFO
    s = cli.from_flags(StudySettings)
    check_out_dir("out_dir", s.out_dir)  # refused before any trial runs, not after them all
    check_out_dir("runs_dir", s.runs_dir)
    t0, load_before = time.perf_counter(), os.getloadavg()
    grid = study_grid(s)
    total = len(s.platforms) * sum(len(g["lrs"]) for g in grid)
    print(f"batch_study {s.name}: {len(s.batches)} batch sizes x {s.lrs_per_batch} lrs on "
          f"{','.join(s.platforms)} = {total} trials in {os.path.join(s.runs_dir, s.tag)}; load "
          f"average {load_before[0]:.2f}", flush=True)  # fmt: skip
    dataset = load_dataset(s.dataset, data_dir=s.data_dir)
    defaults = {p: default_run(s, p, dataset) for p in s.platforms} if s.compare_default else {}
    progress, trials = Progress(total), []
    for platform in s.platforms:
        for entry in grid:
            trials += batch_trials(s, platform, entry, dataset, progress)
    summary = study.summarize(trials, s.platforms)
    compare = {
        p: study.compare_with_default(trials, d, s.target_accuracy) for p, d in defaults.items()
    }
    wall_s = time.perf_counter() - t0
    extra = {"grid": grid, "comparison": compare, "wall_s": wall_s, "trials_run": progress.ran,
             "trials_wall_s": sum(t["wall_s"] for t in trials),  # when each one ran
             "load_average": {"before": load_before, "after": os.getloadavg()},
             "devices": {p: device_info(jax.devices(p)[0]) for p in s.platforms}}  # fmt: skip
    with writing("out_dir", s.out_dir):  # the trials are kept: a rerun only writes these
        paths = write_outputs(s, trials, summary, extra)
    print("\n" + study.format_report(summary, compare) + "\n")
    print(f"wrote {', '.join(paths)}")
    print(
        f"study wall time {wall_s:.1f}s; load average {load_before[0]:.2f} before,"
        f" {os.getloadavg()[0]:.2f} after"
    )


if __name__ == "__main__":
    cli.run(main)
