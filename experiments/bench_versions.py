r"""This checkout's backward against another commit's, side by side in one process.

    git worktree add /tmp/before <commit>        # the commit to compare against
    python experiments/bench_versions.py --baseline=/tmp/before

A change to the hand-written backward (a redesign, a new layer kind, a rule plug-in)
must not slow the formulas down. Two separate benchmark runs cannot show that to a few
percent on a shared machine: their noise is larger. So this script loads the other
checkout's ``bpjax`` package too, under the name ``bpjax_baseline`` (a copy whose
``bpjax`` imports are renamed), and times the two versions *interleaved* in one process
with the timing protocol of every benchmark here (``bpjax.bench.timing.compare_fns``:
compile apart, ``block_until_ready``, random order per round, median of repeats), so
machine noise hits both alike. On ``bpjax.Config``'s network (784-500-10, ReLU, softmax
cross-entropy), at each ``--batches``:

* ``grad``: ``jit(grad_fn("manual"))``, the section-7 gradient alone;
* ``step``: the training step, gradient + SGD update, state donated
  (``bpjax.bench.steps.sgd_step``), compiled as the training loop compiles it;
* ``epoch``: ``bpjax.train`` itself, a few epochs of each version in turn
  (``--epoch_rounds`` rounds, random order), on a slice of MNIST
  (``--train_examples``); the median of the records' ``epoch_s`` (training only,
  compilation and evaluation excluded).

The ratio printed is baseline time / this checkout's time (>= 1.00: not slower).
It writes ``--out`` (JSON; nothing by default). Both versions must run on the same
JAX; the baseline needs the same third-party packages. About 3 minutes on 2 cores.

This is a benchmark, not a test: nothing here fails on a slow number.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import bpjax
from bpjax import cli
from bpjax.bench.report import write_json
from bpjax.bench.steps import random_batch
from bpjax.bench.timing import compare_fns, machine_line
from bpjax.config import Config, check_positive_int, setting
from bpjax.errors import ConfigError
from bpjax.step import compiler_options

NAME = "bpjax_baseline"


@dataclasses.dataclass(frozen=True)
class VersionsBench:
    baseline: str = setting("", "A checkout of the commit to compare against (git worktree add).")
    batches: tuple[int, ...] = setting((1, 128, 2048), "Batch sizes.")
    min_time_s: float = setting(3.0, "Timed seconds per batch and pair (at least).")
    epoch_rounds: int = setting(4, "Rounds of train() per version for the epoch time (0: none).")
    epochs: int = setting(2, "Epochs per train() call.")
    train_examples: int = setting(12800, "Training examples of the epoch runs (a slice of MNIST).")
    out: str = setting("", "JSON output ('' = none).")

    def __post_init__(self) -> None:
        if not os.path.isdir(os.path.join(self.baseline, "bpjax")):
            raise ConfigError(
                f"--baseline={self.baseline!r} holds no bpjax/ package: give a checkout of the "
                "commit to compare against (git worktree add /tmp/before <commit>)"
            )
        for batch in self.batches:
            check_positive_int("batches", batch)
        for name in ("epochs", "train_examples"):
            check_positive_int(name, getattr(self, name))


cli.define_flags(VersionsBench)


def load_baseline(checkout: str) -> Any:
    """The other checkout's ``bpjax``, imported as ``bpjax_baseline`` from a renamed copy."""
    root = tempfile.mkdtemp(prefix="bpjax-baseline-")
    target = os.path.join(root, NAME)
    shutil.copytree(os.path.join(checkout, "bpjax"), target,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    pattern = re.compile(r"(?m)^(\s*)(from|import) bpjax\b")
    for folder, _, files in os.walk(target):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    source = f.read()
                with open(path, "w") as f:
                    f.write(pattern.sub(rf"\1\2 {NAME}", source))
    sys.path.insert(0, root)
    return importlib.import_module(NAME)


def _takes_net(fn: Any) -> bool:
    return next(iter(inspect.signature(fn).parameters)) == "net"


def step_fns(pkg: Any, batch: int) -> tuple[Any, Any, Any]:
    """``(grad, step, state)`` of version ``pkg`` at ``batch``, whichever its API."""
    steps = importlib.import_module(f"{pkg.__name__}.bench.steps")
    cfg = Config()
    options = compiler_options(jax.devices()[0].platform, batch)
    if _takes_net(pkg.grad_fn):  # since the network description (issue 21)
        net = pkg.Net.mlp(cfg.sizes, cfg.activation, cfg.loss)
        params = pkg.init_params(jax.random.key(0), net)
        grad = pkg.grad_fn(net, "manual")
        step = steps.sgd_step(net, "manual", lr=cfg.lr, compiler_options=options)[0]
    else:
        params = pkg.init_params(jax.random.key(0), cfg.sizes)
        grad = pkg.grad_fn("manual", activation=cfg.activation, loss=cfg.loss)
        step = steps.sgd_step("manual", activation=cfg.activation, loss=cfg.loss, lr=cfg.lr,
                              compiler_options=options)[0]  # fmt: skip
    return jax.jit(grad, compiler_options=options), step, steps.sgd_state(params)


def time_steps(s: VersionsBench, versions: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for batch in s.batches:
        x, y = jax.device_put(random_batch(Config().sizes, batch, np.random.default_rng(batch)))
        built = {v: step_fns(pkg, batch) for v, pkg in versions.items()}
        for what in ("grad", "step"):
            if what == "grad":
                fns = {v: (g, (st.params, x, y)) for v, (g, _, st) in built.items()}
            else:
                fns = {v: (step, (jax.tree.map(lambda a: a.copy(), st), x, y))
                       for v, (_, step, st) in built.items()}  # fmt: skip
            t = compare_fns(fns, repeats=20, warmup=3, carry=what == "step",
                            min_time_s=s.min_time_s)  # fmt: skip
            rows.append(_row(what, batch, {v: t[v].median_s for v in versions}))
            print(_line(rows[-1]), flush=True)
    return rows


def time_epochs(s: VersionsBench, versions: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for batch in s.batches:
        epochs: dict[str, list[float]] = {v: [] for v in versions}
        order = list(versions)
        for r in range(s.epoch_rounds):
            random.Random(r).shuffle(order)
            for v in order:
                pkg = versions[v]
                config = pkg.Config(batch=batch, epochs=s.epochs, train_examples=s.train_examples,
                                    workdir=tempfile.mkdtemp(prefix=f"bench-{v}-"))  # fmt: skip
                result = pkg.train(config, log=None)
                epochs[v] += [m["epoch_s"] for m in result.history]
                shutil.rmtree(config.workdir, ignore_errors=True)
        rows.append(_row("epoch", batch, {v: statistics.median(e) for v, e in epochs.items()}))
        print(_line(rows[-1]), flush=True)
    return rows


def _row(what: str, batch: int, median_s: dict[str, float]) -> dict[str, Any]:
    return {"what": what, "batch": batch, **{f"{v}_s": t for v, t in median_s.items()},
            "ratio": median_s["baseline"] / median_s["this"]}  # fmt: skip


def _line(r: dict[str, Any]) -> str:
    return (f"{r['what']:5} {r['batch']:5d} {r['baseline_s'] * 1e3:12.3f} "
            f"{r['this_s'] * 1e3:12.3f} {r['ratio']:7.3f}")


def main(argv: Sequence[str]) -> None:
    del argv
    s = cli.from_flags(VersionsBench)
    versions = {"baseline": load_baseline(s.baseline), "this": bpjax}
    print(machine_line(Config().sizes))
    print(f"baseline: {s.baseline}; ratio = baseline median / this median (>= 1.00: not slower)")
    print(f"{'what':5} {'batch':>5} {'baseline ms':>12} {'this ms':>12} {'ratio':>7}")
    rows = time_steps(s, versions)
    if s.epoch_rounds:
        rows += time_epochs(s, versions)
    if s.out:
        write_json(s.out, s, rows)
        print(f"wrote {s.out}")


if __name__ == "__main__":
    cli.run(main)
