r"""Every feedback rule, several seeds, on any network: accuracy and alignment (issues 13, 21).

    python experiments/feedback_rules.py --quick      # every rule, seed 0, 6000 images, 5 epochs
    python experiments/feedback_rules.py              # MNIST 784-500-10 ReLU, 3 seeds, 20 epochs
    python experiments/feedback_rules.py --hidden=256,256,256,256,256 --epochs=10 \
        --feedback_scale              # -> default-mnist-h256x5-feedback_scale-e10.json, ...
    python experiments/feedback_rules.py --hidden=240,240,240,240,240 --activation=tanh \
        --lr=0.05 --optimizer=momentum --momentum=0.5 # any flag of bpjax.Config

These write under ``runs/feedback_rules/`` (git-ignored). The committed results in
``experiments/results/feedback_rules/`` are written only when ``--out`` names that folder;
the commands that made them:

    python experiments/feedback_rules.py --out=experiments/results/feedback_rules
    python experiments/feedback_rules.py --dataset=fashion_mnist \
        --out=experiments/results/feedback_rules
    python experiments/feedback_rules.py --quick --out=experiments/results/feedback_rules
    mkdir -p runs && nohup python experiments/feedback_rules.py --protocol=akrout \
        --out=experiments/results/feedback_rules > runs/feedback_rules_akrout.log 2>&1 &

Wall times measured on the shared 2-core CPU while other jobs ran (load average
5 to 7), with the five rules of issue 13: the MNIST study 328 s (15 runs of 20
epochs, 16-28 s each; about 12 s each on a quiet machine), Fashion-MNIST 219 s,
``--quick`` 28 s, ``--protocol=akrout`` 965 s (275-376 s per rule, about 0.7 s per
epoch). Run again, a study skips every finished run and only rewrites its files (6 s).

Settings. Every flag of ``bpjax.Config`` (``python launch.py --help``) is a flag here
and sets every run: the protocol gives the base values, and a Config flag given on the
command line replaces the protocol's value (``--help`` prints Config's own defaults,
not the protocol's). The study's own flags are what one Config cannot say: ``--rules``,
``--seeds``, ``--protocol``, ``--quick``, ``--out``, ``--runs_dir``, ``--verbose``.
``--feedback``, ``--seed``, ``--workdir`` and ``--resume`` are set per run by the
study, so they are refused (use ``--rules``, ``--seeds``, ``--runs_dir``).
``--feedback_scale`` scales the rules that have a scaled form (usf, brsf, frsf) and
leaves the others as they are, so one study compares every rule scaled where it can be.
``--rules`` takes bpjax's rule names and your own as ``package.module:name``.

Each run is ``bpjax.train(config)`` in its own workdir,
``<runs_dir>/<run tag>/<rule>-seed<seed>``, so it is an ordinary run record
(``bpjax.load_run``, ``bpjax.runs_figure``). A run whose metrics already reach
``--epochs`` is not run again; an unfinished one continues from its last checkpoint
(``resume=True``); ``--epochs`` larger than before extends the runs.

Names. The tag is ``<protocol>-<dataset>``, then every Config setting given on the
command line whose value differs from the protocol's, short: ``h256x5`` (``--hidden``),
``tanh``, ``adam``, ``float64``, ``lr0.05``, ``b64`` (``--batch``), ``m0.5``
(``--momentum``), ``n6000`` (``--train_examples``), ``e10`` (``--epochs``), otherwise
``<name><value>``; e.g. ``default-mnist-h256x5-tanh``; ``--quick`` gives
``default-mnist-n6000-e5``. ``--rules`` and ``--seeds`` other than the protocol's add
``rules_bp+fa`` and ``seeds3``. So two different studies never share files. The run
tag, the folder of the runs, leaves out the rules and seeds (each run has its own
folder in it) and the settings a resumed run may change (``--epochs`` unless the
schedule is cosine, ``--eval_every_steps``, ...): a study that only adds epochs, rules
or seeds reuses the finished runs and writes files of its own.

Protocols (``--protocol``):

* ``default``: the first document's network and update: 784-500-10 ReLU, softmax
  cross-entropy, Glorot-uniform W, plain SGD lr 0.1, batch 128; 20 epochs, seeds 0, 1,
  2, every rule; kp with ``kp_decay`` 1e-4 (``bpjax.Config``'s).
* ``akrout``: Akrout et al. 2019's MNIST runs as closely as the code allows
  (``makrout/Deep-Learning-without-Weight-Transport``, ``experiments/mnist/*-V0``):
  784-500-10 sigmoid, sigmoid cross-entropy (``bpjax.losses``), plain SGD,
  batch 128, 400 epochs, lr 0.2 (bp, fa; also any other rule if asked), 0.3 (kp),
  kp without weight decay, rules bp, fa, kp, seed 0; ``--lr`` sets every rule's.
  What still differs is in ``PROTOCOL_DIFFERENCES`` below, and printed with the results.

``--quick``: 5 epochs on the first 6000 training images, seed 0 (a smoke run; its
numbers are not the study's).

Outcomes. Each run ends ``ok``, ``collapsed`` (finished at chance level: test accuracy
at most chance plus a tenth of the way to 100%, 19% on 10 classes), ``diverged``
(stopped by a non-finite or exploding loss), ``stopped`` (another ``TrainingError``,
e.g. out of memory) or ``unfinished`` (interrupted). A rule's mean ± std is over its
ok runs only; a rule with other outcomes says so in every table (``collapsed``, or
``collapsed 1/3`` beside the mean of the others), never as a number that looks like a
result.

Output, in ``--out`` (default ``runs/feedback_rules``), named by the tag:

* ``<tag>.json``: the settings, device info and argv (``meta``), the settings every
  run shares (``base_config``), one summary row per rule (``rows``), the floors, every
  run's config, outcome and metrics;
* ``<tag>.csv``: one row per rule x seed x evaluation; ``<tag>_summary.csv``: one row
  per rule (both plain: one header line, numbers and words, ``pandas.read_csv`` reads
  them as they are); ``<tag>_summary.md``: the summary as a markdown table;
* ``<tag>_accuracy.png``: test accuracy per rule, mean over seeds, band min-max;
* ``<tag>_alignment.png``: per rule, the first hidden layer's update angle
  ∠(dW_rule, ∇_W C), the mean per-example error-signal angle ∠(δ_rule, δ_bp),
  and (fa, kp) the angle between W^2 and B^2, all on the fixed batch of the
  first 512 training images (``bpjax.alignment``).

Floors (the default protocol on all of MNIST at 20 epochs, nothing else changed;
measured, reported, never tuned): fa and dfa >= 97.0% mean test accuracy; kp within
0.3 points of bp.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import flags, logging

from bpjax import FEEDBACK_RULES, cli
from bpjax.bench.report import csv_text, save_png, write_json
from bpjax.bench.study import train_or_stopped
from bpjax.config import Config, check_choices, setting
from bpjax.data import Dataset, dataset_shape, load_dataset
from bpjax.errors import ConfigError
from bpjax.files import write_atomic
from bpjax.outputs import check_out_dir, writing
from bpjax.rundir import read_metrics

PROTOCOLS = ("default", "akrout")
AKROUT_LR = {"bp": 0.2, "fa": 0.2, "kp": 0.3}  # experiments/mnist/*-V0/experiment_config.txt
AKROUT_OTHER_LR = 0.2  # the other rules are not in Akrout's study: FA's rate
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
    "precision: theirs NumPy float64; here {dtype}",
    "data: both MNIST pixels / 255 in [0, 1] with one-hot targets (the same)",
    "loss: theirs sigmoid then -y log a - (1-y) log(1-a) with nan_to_num; here the same loss"
    " from the logits, softplus(z) - y z (equal wherever theirs is finite)",
    "delta angle: theirs on ONE training sample (the first, every epoch), against a local"
    " delta_bp = W^T delta_rule * sigma' (the true one with one hidden layer); here delta_deg"
    " is the mean over the first 512 training images of the per-example angle to the true"
    " backprop delta; the W-vs-B angle is the same quantity (angle(W^T, B))",
    "seed: theirs NumPy seed 1111; the draws here are JAX's, so no run repeats theirs",
)
# Config settings the study sets per run, and the study flag that says them instead.
STUDY_OWNED = {"feedback": "the study trains every rule of --rules",
               "seed": "the study trains every seed of --seeds",
               "workdir": "each run has its folder under --runs_dir",
               "resume": "the study always resumes its unfinished runs"}  # fmt: skip
# The tag's short forms; a setting not named here is written <name><value>.
TAG_SHORT = {"hidden": "h", "batch": "b", "epochs": "e", "momentum": "m",
             "train_examples": "n", "kp_decay": "kpdecay"}  # fmt: skip
TAG_BARE = ("activation", "loss", "optimizer", "dtype")  # the value alone says which setting
# The tag's order: the network, its update, its data; then the rest in Config's order.
TAG_ORDER = ("hidden", "activation", "loss", "optimizer", "momentum", "lr", "batch",
             "kp_decay", "dtype", "train_examples")  # fmt: skip
TAG_SILENT = ("data_dir", "checkpoint_every", "keep_checkpoints", "accept_rule_change")
QUICK = {"epochs": 5, "train_examples": 6000}  # --quick: settings given for you
COLLAPSE_MARGIN = 0.1  # collapsed: test accuracy <= chance + this fraction of (1 - chance)
OUTCOMES = ("ok", "collapsed", "diverged", "stopped", "unfinished")


def known_rules() -> tuple[str, ...]:
    """bpjax's own rules (``bpjax.FEEDBACK_RULES``): the default ``--rules``."""
    return tuple(FEEDBACK_RULES)


def protocol_config(protocol: str, quick: bool) -> Config:
    """The config a protocol gives every run, before the command line's settings.

    What it does not name is ``Config``'s default; about 20 checkpoints per run.
    """
    values: dict[str, Any] = {"epochs": 20, "optimizer": "sgd", "batch": 128, "hidden": (500,)}
    if protocol == "akrout":
        values |= {"activation": "sigmoid", "loss": "sigmoid_cross_entropy", "epochs": 400,
                   "kp_decay": 0.0, "lr": AKROUT_OTHER_LR}  # fmt: skip
    if quick:
        values |= QUICK
    return Config(**values, checkpoint_every=max(1, values["epochs"] // 20))


@dataclasses.dataclass(frozen=True)
class StudyFlags:
    """The study's own flags: what one ``Config`` cannot say. None: the protocol's value."""

    protocol: str = setting("default", "default: Config's network and SGD; akrout: Akrout et"
                           " al. 2019's MNIST setting.", choices=PROTOCOLS)  # fmt: skip
    rules: tuple[str, ...] | None = setting(None, "Rules to train: names or package.module:name"
                                            " paths (default: bpjax's every rule; akrout:"
                                            " bp,fa,kp).")  # fmt: skip
    seeds: tuple[int, ...] | None = setting(None, "Seeds (default: 0,1,2; akrout, quick: 0).")
    quick: bool = setting(False, "A smoke run (about 30 s): 5 epochs, 6000 images, seed 0.")
    out: str = setting("runs/feedback_rules", "Folder of the JSON, CSVs, markdown and PNGs"
                       " (the committed results: experiments/results/feedback_rules).")  # fmt: skip
    runs_dir: str = setting("runs/feedback_rules", "Folder of the run workdirs (git-ignored).")
    verbose: bool = setting(False, "Print every evaluation line of every run.")


@dataclasses.dataclass(frozen=True)
class StudySettings(StudyFlags):
    """The study: its own flags, plus the ``Config`` settings given on the command line.

    ``overrides`` (a mapping or ``(name, value)`` pairs, e.g. ``{"hidden": (256,) * 5}``)
    replace the protocol's values in every run; stored as sorted pairs, so the
    settings stay hashable. Every run's config is built and checked here, so a bad
    combination is one ``ConfigError`` line before anything trains.
    """

    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        check_choices("protocol", (self.protocol,), PROTOCOLS)
        given = dict(self.overrides)
        fields = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(given) - fields)
        if unknown:
            raise ConfigError(f"{', '.join(unknown)}: not settings of bpjax.Config")
        for name in given:
            if name in STUDY_OWNED:
                raise ConfigError(f"--{name} is not for this study: {STUDY_OWNED[name]}")
        defaults = self.default_lists()
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "rules", tuple(dict.fromkeys(self.rules)))
        object.__setattr__(self, "seeds", tuple(dict.fromkeys(self.seeds)))
        if not self.rules or not self.seeds:
            raise ConfigError("--rules and --seeds must each name at least one")
        base = self.protocol_config().replace(**stand_in(self.rules, given), **given)
        if "checkpoint_every" not in given:  # about 20 checkpoints per run
            base = base.replace(checkpoint_every=max(1, base.epochs // 20))
        object.__setattr__(self, "_base", base)  # types checked, lists made tuples:
        object.__setattr__(self, "overrides", tuple(sorted((k, getattr(base, k)) for k in given)))
        if base.dataset not in ("mnist", "fashion_mnist"):  # dataset_shape(...).n_out classes
            raise ConfigError(f"--dataset={base.dataset}: the study compares test accuracy,"
                              " which needs classes: use mnist or fashion_mnist")  # fmt: skip
        study_configs(self)  # every run's config valid, or one line naming --rules

    def default_lists(self) -> dict[str, tuple]:
        """The protocol's rules and seeds (those of ``--quick`` under it)."""
        akrout = self.protocol == "akrout"
        return {"rules": ("bp", "fa", "kp") if akrout else known_rules(),
                "seeds": (0,) if akrout or self.quick else (0, 1, 2)}  # fmt: skip

    def protocol_config(self) -> Config:
        """The protocol's config of every run, before the command line's settings."""
        return protocol_config(self.protocol, self.quick)

    @property
    def base(self) -> Config:
        """Every run's config but its rule, seed and workdir (and, under akrout, lr).

        Its ``feedback`` stands in for the study's rules (``stand_in``).
        """
        return self._base

    def changed(self, *, resumable: bool) -> dict[str, Any]:
        """Given settings that differ from the protocol's, in tag order.

        ``--quick``'s settings count as given (a quick study is named apart).
        ``resumable=False``: only those a resumed run may not change (its folder's name).
        """
        given, base = {**(QUICK if self.quick else {}), **dict(self.overrides)}, self.base
        differ = base.differences(protocol_config(self.protocol, False), resumable=resumable)
        if "lr" in given and self.protocol == "akrout":  # its lr is per rule: any --lr differs
            differ["lr"] = (base.lr, None)
        names = [n for n in differ if n in given and n not in (*TAG_SILENT, "dataset")]
        order = {n: i for i, n in enumerate(TAG_ORDER)}
        names.sort(key=lambda n: order.get(n, len(order)))  # stable: Config's order after
        return {n: getattr(base, n) for n in names}

    @property
    def run_tag(self) -> str:
        """The folder of the runs: protocol, data, and the given settings that change a run."""
        parts = [self.protocol, self.base.dataset]
        return "-".join(parts + [tag_part(k, v) for k, v in self.changed(resumable=False).items()])

    @property
    def tag(self) -> str:
        """The name of the study's files: the run tag, the given settings a resume may
        change, and ``--rules`` / ``--seeds`` where they are not the protocol's."""
        fixed = self.changed(resumable=False)
        more = {k: v for k, v in self.changed(resumable=True).items() if k not in fixed}
        parts = [self.run_tag] + [tag_part(k, v) for k, v in more.items()]
        defaults = self.default_lists()
        if set(self.rules) != set(defaults["rules"]):
            parts.append("rules_" + "+".join(r.replace(":", ".") for r in self.rules))
        if set(self.seeds) != set(defaults["seeds"]):
            parts.append("seeds" + "+".join(map(str, self.seeds)))
        return "-".join(parts)

    def rule_lr(self, rule: str) -> float:
        if self.protocol == "akrout" and "lr" not in dict(self.overrides):
            return AKROUT_LR.get(rule, AKROUT_OTHER_LR)
        return self.base.lr


def scalable(rule: str) -> bool:
    """Has ``rule`` a scaled form (``--feedback_scale``)? One ConfigError line if unknown."""
    return Config(feedback=rule).rule.scalable


def stand_in(rules: Sequence[str], given: Mapping[str, Any]) -> dict[str, Any]:
    """The rule a study's base config carries: with ``--feedback_scale``, one that has a
    scaled form (a config of bp refuses it); else ``Config``'s default."""
    if not given.get("feedback_scale"):
        return {}
    for rule in rules:
        if scalable(rule):
            return {"feedback": rule}
    raise ConfigError(f"--feedback_scale: none of --rules={','.join(rules)} has a scaled form")


def tag_part(name: str, value: Any) -> str:
    """One setting in a tag: ``h256x5``, ``tanh``, ``lr0.05``, ``noise_scale``, ..."""
    short = TAG_SHORT.get(name, name)
    if name in TAG_BARE:
        return str(value)
    if name == "hidden":
        widths = tuple(value)
        same = len(set(widths)) == 1 and len(widths) > 1
        return "h" + (f"{widths[0]}x{len(widths)}" if same else "_".join(map(str, widths)) or "0")
    if isinstance(value, bool):
        return short if value else f"no_{short}"
    if value is None:
        return f"{short}none"
    if isinstance(value, float):
        return f"{short}{value!r}"
    if isinstance(value, tuple):
        return short + "_".join(map(str, value))
    return f"{short}{value}" if isinstance(value, int) else f"{short}_{value}"


cli.define_flags(StudyFlags)
cli.define_flags(Config)


def settings_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> StudySettings:
    """The study from parsed flags: its own, and every Config flag given on the command line."""
    own = cli.from_flags(StudyFlags, flag_values=flag_values)
    given = [f.name for f in dataclasses.fields(Config) if flag_values[f.name].present]
    for name in given:
        if name in STUDY_OWNED:
            raise ConfigError(f"--{name} is not for this study: {STUDY_OWNED[name]}")
    scale = {"feedback_scale": "feedback_scale" in given and flag_values["feedback_scale"].value}
    defaults = protocol_config(own.protocol, own.quick).replace(**stand_in(known_rules(), scale))
    config = cli.from_flags(Config, flag_values=flag_values, defaults=defaults)
    return StudySettings(**{f.name: getattr(own, f.name) for f in dataclasses.fields(own)},
                         overrides={name: getattr(config, name) for name in given})  # fmt: skip


def study_configs(s: StudySettings) -> list[Config]:
    """One ``Config`` per (rule, seed), rules outer; each run in its own resumable workdir."""
    base, configs = s.base, []
    for rule in s.rules:
        for seed in s.seeds:
            folder = f"{rule.replace(':', '.')}-seed{seed}"  # an import path: package.module.name
            try:
                scale = base.feedback_scale and scalable(rule)  # "scaled where it can be"
                config = base.replace(feedback=rule, feedback_scale=scale, seed=seed,
                                      lr=s.rule_lr(rule), resume=True,
                                      workdir=os.path.join(s.runs_dir, s.run_tag, folder))
            except ConfigError as e:
                raise ConfigError(f"--rules={','.join(s.rules)} --seeds="
                                  f"{','.join(map(str, s.seeds))}: {e}") from None  # fmt: skip
            configs.append(config)
    return configs


# ------------------------------------------------------------------ runs


def finished_history(config: Config) -> list[dict[str, Any]] | None:
    """The run's records up to ``config.epochs`` if it already reached it (or its target)."""
    if not os.path.isdir(config.workdir):
        return None
    history = upto(read_metrics(config.workdir), config.epochs)
    return history if is_finished(history, config.epochs) else None


def upto(history: Sequence[Mapping[str, Any]], epochs: int) -> list[dict[str, Any]]:
    """The records of the first ``epochs`` epochs (a longer run, cut to this study's)."""
    return [dict(m) for m in history if m["epoch"] <= epochs]


def is_finished(history: Sequence[Mapping[str, Any]], epochs: int) -> bool:
    """The records reach the last epoch, or the run's target (``--target_accuracy``)."""
    return bool(history) and (history[-1]["epoch"] == epochs or bool(
        history[-1].get("target_reached")))  # fmt: skip


def chance_accuracy(dataset: str) -> float:
    """Test accuracy of a constant guess among equally likely classes: 1 / classes."""
    return 1.0 / dataset_shape(dataset).n_out


def run_outcome(run: Mapping[str, Any], epochs: int, chance: float) -> str:
    """How a run ended: one of ``OUTCOMES`` (see the module docstring)."""
    if run["status"] == "stopped":
        return "stopped" if run["reason"].startswith("out of memory") else "diverged"
    history = run["history"]
    if not is_finished(history, epochs):
        return "unfinished"
    last = history[-1]
    if not math.isfinite(last.get("test_loss") or 0.0):
        return "diverged"
    accuracy = last.get("test_accuracy")
    if accuracy is not None and accuracy <= chance + COLLAPSE_MARGIN * (1 - chance):
        return "collapsed"
    return "ok"


def run_one(config: Config, dataset: Dataset, verbose: bool) -> dict[str, Any]:
    """Trains (or skips, when finished) one run: its status, outcome, history and wall time."""
    t0 = time.perf_counter()
    history, status, reason = finished_history(config), "finished before", ""
    if history is None:  # a diverged run is a result too: report it, go on
        history, _, error = train_or_stopped(config, dataset, print if verbose else None)
        status, reason = ("trained", "") if error is None else ("stopped", error)
    run = {"rule": config.rule.name, "scaled": config.feedback_scale, "seed": config.seed,
           "lr": config.lr,
           "workdir": config.workdir, "status": status, "reason": reason,
           "wall_s": time.perf_counter() - t0, "config": config.to_dict(),
           "history": upto(history, config.epochs)}  # fmt: skip
    run["outcome"] = run_outcome(run, config.epochs, chance_accuracy(config.dataset))
    return run


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


def outcome_label(counts: Mapping[str, int], runs: int) -> str:
    """``ok``; ``collapsed`` when every run did; else ``collapsed 1/3; diverged 1/3``."""
    bad = {k: n for k, n in counts.items() if k != "ok" and n}
    if not bad:
        return "ok"
    if len(bad) == 1 and sum(bad.values()) == runs:
        return next(iter(bad))
    return "; ".join(f"{k} {n}/{runs}" for k, n in bad.items())


def summarize(runs: Sequence[Mapping[str, Any]], epochs: int,
              chance: float) -> list[dict[str, Any]]:  # fmt: skip
    """One row per rule: its outcome, final test accuracy (%) and angles (°) over seeds.

    Only the ``ok`` runs count in the numbers (``seeds`` of them); the others are
    counted per outcome and named in ``outcome``. Each angle is per hidden layer
    (``_l1``, ``_l2``, ...), absent for rules that do not report it.
    """
    rows = []
    for rule in dict.fromkeys(r["rule"] for r in runs):
        mine = [r for r in runs if r["rule"] == rule]
        outcomes = [run_outcome(r, epochs, chance) for r in mine]
        counts = {k: outcomes.count(k) for k in OUTCOMES}
        last = [r["history"][-1] for r, o in zip(mine, outcomes, strict=True) if o == "ok"]
        acc = spread([100 * m["test_accuracy"] for m in last])
        row = {"rule": rule, "scaled": bool(mine[0].get("scaled")), "lr": mine[0]["lr"],
               "outcome": outcome_label(counts, len(mine)),
               "runs": len(mine), "seeds": len(last),
               **{k: counts[k] for k in OUTCOMES[1:]},
               **{f"test_accuracy_{k}": v for k, v in acc.items() if k != "n"}}  # fmt: skip
        for key in ANGLES:
            layers = len(last[0].get(key) or ()) if last else 0
            for i in range(layers):
                s = spread([m[key][i] for m in last])
                row.update({f"{key}_l{i + 1}_mean": s["mean"], f"{key}_l{i + 1}_std": s["std"]})
        # A run's own time (compilation included), as recorded: the same when it is skipped.
        row["run_s_mean"] = spread([m["elapsed_s"] for m in last])["mean"]
        rows.append(row)
    return rows


def floors(rows: Sequence[Mapping[str, Any]], s: StudySettings) -> dict[str, Any]:
    """The issue's floors, where they apply (the default protocol on all of MNIST, 20 epochs)."""
    if (s.protocol, s.base.dataset) != ("default", "mnist") or s.changed(resumable=True):
        return {"applies": False}  # --quick, another protocol, dataset or setting
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


def curves(runs: Sequence[Mapping[str, Any]], key: str,
           layer: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """``{rule: (epochs, values (seeds, evaluations))}`` of ``key`` (per-layer: ``layer``).

    ``epochs`` are the longest run's evaluation points; runs cut short (stopped)
    are padded with NaN to its length.
    """
    out = {}
    for rule in dict.fromkeys(r["rule"] for r in runs):
        histories = [r["history"] for r in runs if r["rule"] == rule]
        if not any(m.get(key) is not None for h in histories for m in h):
            continue  # the rule does not report it (bp: no angles; dfa, sign: no W-vs-B)
        pick = lambda v: np.nan if v is None else v[layer] if isinstance(v, list) else v  # noqa: E731
        series = [[pick(m.get(key)) for m in h] for h in histories]
        longest = max(histories, key=len)
        values = [s + [np.nan] * (len(longest) - len(s)) for s in series]
        out[rule] = (np.array([m["epoch"] for m in longest], np.float64),
                     np.array(values, np.float64))  # fmt: skip
    return out


# ------------------------------------------------------------------ files


def epoch_rows(runs: Sequence[Mapping[str, Any]], s: StudySettings) -> list[dict[str, Any]]:
    """One flat row per rule x seed x evaluation (per-layer angles as ``<key>_l<i>``)."""
    rows = []
    for r in runs:
        for m in r["history"]:
            row = {"protocol": s.protocol, "dataset": s.base.dataset, "rule": r["rule"],
                   "seed": r["seed"], "lr": r["lr"], "outcome": r["outcome"]}  # fmt: skip
            for k, v in m.items():
                if isinstance(v, list):
                    row.update({f"{k}_l{i + 1}": a for i, a in enumerate(v)})
                else:
                    row[k] = v
            rows.append(row)
    return rows


def _band(ax, epochs: np.ndarray, values: np.ndarray, rule: str, color: str,
          scale: float = 1.0) -> None:  # fmt: skip
    """Mean over seeds as a line, min-max over seeds as a band; one colour per rule."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot(epochs, scale * np.nanmean(values, 0), label=rule, lw=1.5, color=color)
    if values.shape[0] > 1:
        ax.fill_between(epochs, scale * np.nanmin(values, 0), scale * np.nanmax(values, 0),
                        alpha=0.25, color=color, lw=0)  # fmt: skip


def _colors(runs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """One colour per rule, in the study's order (the same in both figures)."""
    return {rule: f"C{i}" for i, rule in enumerate(dict.fromkeys(r["rule"] for r in runs))}


def accuracy_figure(runs: Sequence[Mapping[str, Any]], title: str):
    """Test accuracy against epoch, one line per rule, band min-max over seeds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    acc, colors = curves(runs, "test_accuracy"), _colors(runs)
    for rule, (epochs, values) in acc.items():
        _band(ax, epochs, values, rule, colors[rule], scale=100)
    if acc:  # from the lowest mean a tenth into training up: the end of the curves readable
        lows = []
        for _, values in acc.values():
            at = min(max(1, -(-values.shape[1] // 10)), values.shape[1]) - 1
            lows.append(100 * np.nanmean(values[:, at]))
        high = max(100 * np.nanmax(v) for _, v in acc.values())
        low = min(lows)
        if np.isfinite(low) and np.isfinite(high):
            ax.set_ylim(max(low - 0.5, 0), min(high + 0.3, 100))
    ax.set(xlabel="epoch", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    return fig


def alignment_figure(runs: Sequence[Mapping[str, Any]], title: str):
    """The first hidden layer's angles over training: update, error signal, W vs B."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.5))
    panels = (("alignment_deg", "∠(dW_rule, true gradient), first hidden layer"),
              ("delta_deg", "mean per-example ∠(δ_rule, δ_bp)"),
              ("weight_deg", "∠(W², B²), rules with a learned or fixed B"))  # fmt: skip
    colors = _colors(runs)
    for ax, (key, name) in zip(fig.subplots(1, 3), panels, strict=True):
        for rule, (epochs, values) in curves(runs, key).items():
            _band(ax, epochs, values, rule, colors[rule])
        ax.set(xlabel="epoch", ylabel="degrees", title=name, ylim=(0, None))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.suptitle(title, fontsize=9)
    return fig


def describe(s: StudySettings) -> str:
    """The study in one line, for the figures' titles."""
    c = s.base
    lr = "lr per rule" if s.protocol == "akrout" and "lr" not in dict(s.overrides) else (
        f"lr {c.lr:g}")  # fmt: skip
    return (f"{c.dataset}{f' (first {c.train_examples})' if c.train_examples else ''},"
            f" {'-'.join(map(str, c.sizes))} {c.activation}, {c.loss}, {c.optimizer} {lr}"
            f" batch {c.batch}, {c.dtype}{', --feedback_scale' if c.feedback_scale else ''},"
            f" {c.epochs} epochs, {len(s.seeds)} seed(s)"
            f" (band: min-max), protocol {s.protocol}")  # fmt: skip


def write_outputs(s: StudySettings, runs: list[dict[str, Any]], rows: list[dict[str, Any]],
                  checked: dict[str, Any], wall_s: float) -> list[str]:  # fmt: skip
    """JSON, the two CSVs, the markdown summary and the two PNGs; returns their paths."""
    base = os.path.join(s.out, s.tag)
    paths = [f"{base}.json", f"{base}.csv", f"{base}_summary.csv", f"{base}_summary.md",
             f"{base}_accuracy.png", f"{base}_alignment.png"]  # fmt: skip
    per_run = (*STUDY_OWNED, "lr") if s.protocol == "akrout" else STUDY_OWNED
    common = {k: v for k, v in s.base.to_dict().items() if k not in per_run}
    extra = {"base_config": common, "floors": checked, "wall_s": wall_s, "runs": runs,
             "protocol_differences": protocol_differences(s),
             "anchors": AKROUT_ANCHORS if s.protocol == "akrout" else None}  # fmt: skip
    with writing("out", s.out):
        os.makedirs(s.out, exist_ok=True)
        write_json(paths[0], s, rows, **extra)
        write_atomic(paths[1], csv_text(epoch_rows(runs, s)))
        columns = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "run_s_mean"]
        write_atomic(paths[2], csv_text(rows, [*columns, "run_s_mean"]))
        write_atomic(paths[3], markdown(rows, s))
        save_png(accuracy_figure(runs, describe(s)), paths[4])
        save_png(alignment_figure(runs, describe(s)), paths[5])
    return paths


def protocol_differences(s: StudySettings) -> list[str]:
    """What still differs from Akrout et al.'s protocol (akrout protocol only)."""
    if s.protocol != "akrout":
        return []
    return [d.format(kp_decay=s.base.kp_decay, dtype=s.base.dtype) for d in PROTOCOL_DIFFERENCES]


# ------------------------------------------------------------------ the report


def _pm(row: Mapping[str, Any], key: str, digits: int = 2) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def accuracy_cell(row: Mapping[str, Any]) -> str:
    """Mean ± std of the ok runs, with the other outcomes named; a word when none is ok."""
    if not row["seeds"]:
        return row["outcome"]
    return _pm(row, "test_accuracy") + ("" if row["outcome"] == "ok" else f" ({row['outcome']})")


SIGN_CAVEAT = ("sign is the unscaled form: its (7.2) matrix has entries ±1 against |W| of about"
               " 0.06, so its hidden-layer steps are larger than bp's, not better aligned"
               " (usf with --feedback_scale is its scaled form)")


def rule_label(row: Mapping[str, Any]) -> str:
    """The rule's name, and whether it ran in its scaled form (``--feedback_scale``)."""
    return f"{row['rule']} (scaled)" if row.get("scaled") else row["rule"]


def markdown(rows: Sequence[Mapping[str, Any]], s: StudySettings) -> str:
    """The summary as a markdown table (mean ± std over the ok seeds), for a README."""
    lines = [f"{describe(s)}; test accuracy % mean ± std over the seeds that trained", "",
             "| rule | lr | seeds | test accuracy % | ∠(dW, ∇W) l1 | ∠(δ, δ_bp) l1 | ∠(W, B) l1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        angles = [_pm(r, f"{k}_l1", 1) for k in ANGLES]
        lines.append(f"| {rule_label(r)} | {r['lr']:g} | {r['seeds']}/{r['runs']} |"
                     f" {accuracy_cell(r)} | " + " | ".join(angles) + " |")  # fmt: skip
    if "sign" in s.rules:
        lines += ["", SIGN_CAVEAT + "."]
    return "\n".join(lines) + "\n"


def report(rows: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]],
           s: StudySettings) -> str:  # fmt: skip
    """The tables the script prints: final numbers per rule, then the angle over training."""
    akrout = s.protocol == "akrout"
    head = (f"{'rule':12} {'lr':>5} {'seeds':>5} {'test acc % mean ± std':>22} {'min-max':>13} "
            f"{'∠dW° (l1)':>13} {'∠δ° (l1)':>13} {'∠W,B° (l1)':>13}"
            + ("  Akrout log: acc / ∠δ° / ∠W,B°" if akrout else ""))  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        rng = ("-" if r["test_accuracy_min"] is None
               else f"{r['test_accuracy_min']:.2f}-{r['test_accuracy_max']:.2f}")  # fmt: skip
        a = AKROUT_ANCHORS.get(r["rule"], {}) if akrout else {}
        anchor = " / ".join(str(a.get(k, "-")) for k in ("test_accuracy", *ANGLES[1:]))
        lines.append(
            f"{rule_label(r):12} {r['lr']:5g} {r['seeds']:5d} {accuracy_cell(r):>22} "
            f"{rng:>13} {_pm(r, 'alignment_deg_l1', 1):>13} {_pm(r, 'delta_deg_l1', 1):>13} "
            f"{_pm(r, 'weight_deg_l1', 1):>13}" + (f"  {anchor}" if akrout else "")
        )
    if "sign" in s.rules:
        lines.append(f"note: {SIGN_CAVEAT}")
    epochs = s.base.epochs
    marks = sorted({1, max(1, epochs // 4), max(1, epochs // 2), epochs})
    lines += ["", "update angle ∠(dW_rule, true gradient), first hidden layer, mean over seeds,"
              " by epoch", f"{'rule':5} " + " ".join(f"{'ep ' + str(e):>8}" for e in marks)]
    for rule, (at, values) in curves(runs, "alignment_deg").items():
        mean = np.nanmean(values, 0)
        cells = [mean[at == e][0] if np.any(at == e) else None for e in marks]
        lines.append(f"{rule:5} " + " ".join(
            f"{'-':>8}" if c is None else f"{c:8.1f}" for c in cells))  # fmt: skip
    return "\n".join(lines)


def floor_lines(checked: Mapping[str, Any]) -> list[str]:
    if not checked.get("applies"):
        return ["floors: not checked (they apply to the default protocol on all of MNIST,"
                " 20 epochs, no other setting changed)"]  # fmt: skip
    out = []
    for name, f in checked.items():
        if name == "applies":
            continue
        value = f.get("mean", f.get("bp_minus_kp"))
        what = "mean test accuracy" if "mean" in f else "bp - kp (points)"
        out.append(f"floor {name}: {what} {value:.2f} -> {'held' if f['held'] else 'MISSED'}")
    return out


def run_line(r: Mapping[str, Any]) -> str:
    """One run's progress line: status, outcome, final test accuracy and angle, wall time."""
    last = r["history"][-1] if r["history"] else {}
    acc, angle = last.get("test_accuracy"), last.get("alignment_deg")
    return (f"  {r['rule']:5} seed {r['seed']}: {r['status']:15} epochs {last.get('epoch', 0)}"
            f"  test acc {'-' if acc is None else f'{100 * acc:.2f}%'}"
            + (f"  ∠dW {angle[0]:.1f}°" if angle else "")
            + f"  {r['wall_s']:.1f}s" + ("" if r["outcome"] == "ok" else f"  {r['outcome']}")
            + (f": {r['reason']}" if r["reason"] else ""))  # fmt: skip


def run_study(s: StudySettings, log: Callable[[str], None] = print) -> list[str]:
    """Trains (or skips) every run of the study, writes its files, prints its tables.

    The output folders are checked first, so a bad ``--out`` costs nothing.
    Returns the paths of the files written.
    """
    check_out_dir("out", s.out)
    check_out_dir("runs_dir", s.runs_dir)
    t0 = time.perf_counter()
    configs = study_configs(s)
    log(f"feedback_rules: {s.tag}, rules {','.join(s.rules)}, seeds "
        f"{','.join(map(str, s.seeds))}, {s.base.epochs} epochs, {len(configs)} runs in "
        f"{os.path.join(s.runs_dir, s.run_tag)}")  # fmt: skip
    dataset = load_dataset(s.base.dataset, data_dir=s.base.data_dir)
    runs = []
    for config in configs:
        runs.append(run_one(config, dataset, s.verbose))
        log(run_line(runs[-1]))
    rows = summarize(runs, s.base.epochs, chance_accuracy(s.base.dataset))
    checked = floors(rows, s)
    wall_s = time.perf_counter() - t0
    paths = write_outputs(s, runs, rows, checked, wall_s)
    log("\n" + report(rows, runs, s) + "\n")
    log("\n".join(floor_lines(checked)))
    if s.protocol == "akrout":
        log("still different from Akrout et al.'s protocol:")
        log("\n".join(f"  - {d}" for d in protocol_differences(s)))
    log(f"wrote {', '.join(paths)}")
    log(f"study wall time {wall_s:.1f}s")
    return paths


def main(argv: Sequence[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint at INFO
    run_study(settings_from_flags(), log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    cli.run(main)
