r"""Step time of every feedback rule against bp, interleaved in one process (issue 13).

    python experiments/bench_feedback.py                 # about 1-2 minutes on 2 CPU cores
    python experiments/bench_feedback.py --batches=128 --repeats=5 --min_time_s=0.5

On ``bpjax.Config``'s network (784-500-10, ReLU, softmax cross-entropy, SGD lr
0.1) it times, at each batch size, one full training step per rule: the
``manual`` gradient under the rule (``methods.grad_fn(..., rule=...)``) and
the SGD update, ``bpjax.training.train_step`` with the state donated. fa, dfa and
sign pass their fixed feedback as an argument; kp's state holds ``(params, B)``
and updates both with ``feedback.kp_feedback_grads`` (weight decay
``--kp_decay``), as a training loop does. The rules run interleaved
(``bpjax.bench.timing.compare_fns``); the ratio is each rule's median over
bp's. It also times ``bpjax.alignment`` on one batch of that size and reports
it as a fraction of an epoch of ``--epoch_examples`` (the training loop's
once-per-epoch diagnostic). Results go to
``experiments/results/bench_feedback.json``.

The floor it checks: every rule within 1.05x of bp at every batch. This is a
benchmark, not a test: nothing here fails on a slow number.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from bpjax import cli
from bpjax.bench.report import write_json
from bpjax.bench.steps import random_batch
from bpjax.bench.timing import compare_fns, machine_line
from bpjax.config import Config, check_choices, check_positive_int, setting
from bpjax.feedback import FEEDBACK_RULES, alignment, init_feedback
from bpjax.network import init_params
from bpjax.training import TrainState, compiler_options, initial_opt_state, make_train_step

NET = Config()  # the network, activation, loss and lr of a training run
FLOOR = 1.05


@dataclasses.dataclass(frozen=True)
class FeedbackBench:
    batches: tuple[int, ...] = setting((128, 2048), "Batch sizes.")
    rules: tuple[str, ...] = setting(FEEDBACK_RULES, "Rules to time.", choices=FEEDBACK_RULES)
    repeats: int = setting(20, "Timed rounds per batch (at least).")
    min_time_s: float = setting(3.0, "Timed seconds per batch, all rules together (at least).")
    kp_decay: float = setting(1e-4, "Kolen-Pollack weight decay λ of W and B.")
    epoch_examples: int = setting(60000, "Examples per epoch, for alignment's share of one.")
    out: str = setting("experiments/results/bench_feedback.json", "JSON output ('' = none).")

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(dict.fromkeys(("bp", *self.rules))))
        check_choices("rules", self.rules, FEEDBACK_RULES)
        for batch in self.batches:
            check_positive_int("batches", batch)
        check_positive_int("repeats", self.repeats)
        check_positive_int("epoch_examples", self.epoch_examples)


cli.define_flags(FeedbackBench)


def rule_step(rule: str, decay: float, batch: int) -> Callable:
    """The training loop's own step under ``rule``, jitted, state donated.

    ``(state, x, y) -> (state, metrics)``: ``bpjax.training.train_step`` with the
    rule's gradient (``make_grad``) and plain SGD; the rule's B rides in
    ``state.feedback`` and, under kp, learns with W (``kp_decay``), as in training.
    """
    step_fn = make_train_step(Config(feedback=rule, kp_decay=decay, batch=batch))
    options = compiler_options(jax.devices()[0].platform, batch)
    key = jax.random.key(0)  # the step's key: only a rule that draws (brsf) uses it
    return jax.jit(lambda state, x, y: step_fn(state, x, y, key), donate_argnums=0,
                   compiler_options=options)  # fmt: skip


def rule_state(rule: str, params: Any, feedback: Any) -> TrainState:
    """Step 0 of the training state: the params, SGD's state (of the pair under kp), B."""
    opt_state = initial_opt_state(Config(feedback=rule), params, feedback)
    return TrainState(params, opt_state, np.zeros((), np.int32), feedback)


def bench(s: FeedbackBench) -> list[dict[str, Any]]:
    """One row per batch and rule: step timing, ratio to bp, alignment's cost."""
    sizes = NET.sizes
    net = NET.net()
    params = init_params(jax.random.key(0), net)
    feedback = {r: init_feedback(jax.random.key(1), net, r) for r in s.rules}
    key = jax.random.key(2)  # brsf's draw for the alignment
    copy = functools.partial(jax.tree.map, lambda a: a.copy())
    rows = []
    for batch in s.batches:
        x, y = jax.device_put(random_batch(sizes, batch, np.random.default_rng(batch)))
        steps = {r: (rule_step(r, s.kp_decay, batch),
                     (rule_state(r, copy(params), copy(feedback[r])), x, y))
                 for r in s.rules}  # fmt: skip
        t = compare_fns(steps, repeats=s.repeats, warmup=3, carry=True, min_time_s=s.min_time_s)
        align = {
            r: (jax.jit(functools.partial(alignment, net, rule=r, key=key)),
                (params, feedback[r], x, y))
            for r in s.rules if r != "bp"
        }  # fmt: skip
        ta = compare_fns(align, repeats=max(3, s.repeats // 4), warmup=1) if align else {}
        epoch_steps = s.epoch_examples / batch
        for r in s.rules:
            row = {"batch": batch, "rule": r, "step": t[r].as_dict(),
                   "ratio": t[r].median_s / t["bp"].median_s,
                   "cpu_ratio": t[r].cpu_median_s / t["bp"].cpu_median_s}  # fmt: skip
            if r in ta:
                row["alignment"] = ta[r].as_dict()
                row["alignment_epoch_share"] = ta[r].median_s / (epoch_steps * t[r].median_s)
            rows.append(row)
            print(_line(row), flush=True)
    return rows


HEADER = (f"{'batch':>5} {'rule':4} {'step ms':>9} {'ratio':>6} {'cpu ratio':>9} {'spread':>6} "
          f"{'repeats':>7} {'compile s':>9} {'align ms':>9} {'align/epoch':>11}")  # fmt: skip


def _line(r: dict[str, Any]) -> str:
    st = r["step"]
    align = (f"{r['alignment']['median_s'] * 1e3:9.3f} {r['alignment_epoch_share']:11.2%}"
             if "alignment" in r else f"{'-':>9} {'-':>11}")  # fmt: skip
    return (f"{r['batch']:5d} {r['rule']:4} {st['median_s'] * 1e3:9.3f} {r['ratio']:6.3f} "
            f"{r['cpu_ratio']:9.3f} {st['spread']:6.2f} {st['repeats']:7d} "
            f"{st['compile_s']:9.2f} {align}")  # fmt: skip


def main(argv: Sequence[str]) -> None:
    del argv
    settings = cli.from_flags(FeedbackBench)
    print(machine_line(NET.sizes))
    print("ratio = rule's step median / bp's (<= 1.05: within the floor)")
    print(HEADER)
    rows = bench(settings)
    worst = max(rows, key=lambda r: r["ratio"])
    met = "met" if worst["ratio"] <= FLOOR else "MISSED"
    print(f"floor every rule <= {FLOOR}x bp at every batch: {met} "
          f"(worst {worst['rule']} at batch {worst['batch']}: {worst['ratio']:.3f})")
    if settings.out:
        write_json(settings.out, settings, rows)
        print(f"wrote {settings.out}")


if __name__ == "__main__":
    cli.run(main)
