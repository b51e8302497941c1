"""The training loop: a jitted ``lax.scan`` epoch over device-resident data.

``train(config)`` is what ``launch.py`` and notebooks call. Per run it builds the
jitted epoch function once (compiled ahead of time, so compile time is measured
apart and later epochs never recompile), then per epoch: reshuffle from a key
derived from (seed, epoch), scan ``train_step`` over ``N // batch`` fixed-shape
batches, evaluate on the test set (``bpjax.evaluation``), then let the run
directory (``bpjax.rundir``) checkpoint, append the metrics and log one line.
With ``--eval_every_steps=K`` the epoch's scan runs as equal chunks of K steps
(one compiled program, the chunk's first step an argument), with an evaluation
after each: the same steps, in the same order, with the same keys, so the same
trajectory. A run stops early at ``--target_accuracy`` / ``--target_loss``.

Remainder: each epoch takes the first ``(N // batch) * batch`` samples of a
fresh permutation; the other ``N mod batch`` samples sit that epoch out. The
permutation changes every epoch, so no sample is systematically left out, and
every step has the same shape (one compilation).

Determinism: ``init_key, data_key = split(key(seed))``; the initial parameters
come from ``init_key``; epoch ``e`` uses ``epoch_key = fold_in(data_key, e)``,
split into the shuffle key and a noise key whose ``fold_in(., i)`` is step i's
DP-SGD noise. So a run resumed from the checkpoint of epoch ``e`` ends with
exactly the parameters of an uninterrupted run.

Data parallelism (``config.num_devices != 1`` or several processes; see
``bpjax.parallel``): the same epoch program over a mesh ``("data",)``. The
dataset, parameters and optimizer state are replicated; each step's batch
indices and rows are split over ``data``, so every device gathers and processes
only its own M/D rows of every batch, and the gradient's sum over samples
(second document, section 6) becomes an all-reduce. Same seed, same shuffles,
same batches: D devices follow the one-device trajectory up to the summation
order of that all-reduce. With one device in one process none of this is
built: the program is the single-device one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpjax import rundata
from bpjax.checkpoint import run_settings
from bpjax.config import Config, divisors
from bpjax.data import Dataset
from bpjax.errors import ConfigError, TrainingError, is_out_of_memory
from bpjax.evaluation import (
    Evaluator,
    check_health,
    evaluate,  # noqa: F401 - part of this module's API (bpjax.training.evaluate)
    interval_record,
    target_reached,
)
from bpjax.feedback import Feedback, init_feedback
from bpjax.network import Params, init_params
from bpjax.parallel import Placement
from bpjax.rules import optimizer_warning
from bpjax.rundir import RunDir
from bpjax.step import (  # noqa: F401 - the step's names, importable from here as before
    GradFn,
    TrainState,
    compiler_options,
    initial_opt_state,
    learning_rate,
    make_grad,
    make_optimizer,
    make_train_step,
    run_epoch,
    run_steps,
    train_step,
)

Array = jax.Array
Log = Callable[[str], None]


class TrainData(NamedTuple):
    """The arrays of a run, placed: inputs ``(N, n_0)`` and target rows ``(N, n_L)``.

    ``x_val, y_val``: the rows ``--validation_examples`` held out (None without).
    """

    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array
    x_val: Array | None = None
    y_val: Array | None = None


@dataclasses.dataclass(frozen=True)
class TrainResult:
    params: Params
    history: list[dict[str, Any]]
    workdir: str
    traces: int  # traces of the epoch function in this run: 1 means it never recompiled
    interrupted: bool = False  # stopped early on request; the last epoch run is checkpointed
    feedback: Feedback = ()  # the rule's final B matrices (fixed under fa/dfa, learned under kp)
    target: dict[str, Any] | None = None  # where --target_* was reached: epoch, step, seconds
    compile_s: float = 0.0  # compiling the epoch program (trace, lower, XLA), apart from training


def split_rows(dataset: Dataset, config: Config) -> Any:
    """The run's rows on the host (``rundata.split``: hold-out, --train_examples,
    --standardize), checked against the settings; before any file is written.
    """
    rows = rundata.split(dataset, config)
    if dataset.num_classes is None and config.loss == "softmax_cross_entropy":
        raise ConfigError(
            f"{dataset.name} has real-valued targets, which softmax cross-entropy cannot fit:"
            " use --loss=squared_error"
        )
    return rows


def prepare_data(dataset: Dataset, config: Config, place: Placement,
                 rows: Any = None) -> TrainData:  # fmt: skip
    """Targets as rows (one-hot for classification), cast, and placed (``place.put``).

    Inputs in the compute dtype (bfloat16 under mixed precision: half the memory
    and traffic), targets in the parameters' (float32 then: soft or real-valued
    targets would lose precision in bfloat16). ``rows``: ``split_rows``'s, if made.
    """
    x_dtype, y_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    rows = split_rows(dataset, config) if rows is None else rows

    def targets(y: np.ndarray) -> np.ndarray:
        if dataset.num_classes is None:
            return y.astype(y_dtype)
        return np.eye(dataset.num_classes, dtype=y_dtype)[y]

    held = rows.x_val is not None
    return place.put(TrainData(
        x_train=rows.x_train.astype(x_dtype),
        y_train=targets(rows.y_train),
        x_test=rows.x_test.astype(x_dtype),
        y_test=targets(rows.y_test),
        x_val=rows.x_val.astype(x_dtype) if held else None,
        y_val=targets(rows.y_val) if held else None,
    ))  # fmt: skip


def run_keys(config: Config) -> tuple[Array, Array]:
    """``(init_key, data_key)`` from the seed; epoch e uses ``fold_in(data_key, e)``."""
    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    return init_key, data_key


def init_state(config: Config, sizes: tuple[int, ...], place: Placement) -> TrainState:
    """Parameters and feedback matrices from the seed, a fresh optimizer state, step 0; placed.

    Glorot-uniform W, zero b (``init_params``); the rule's B (``init_feedback``,
    from the same init key, an independent stream). Under kp the optimizer
    state covers the pair (params, feedback).
    """
    init_key = run_keys(config)[0]
    dtype = jnp.dtype(config.param_dtype)
    params = init_params(init_key, sizes, dtype)
    feedback = init_feedback(init_key, sizes, config.rule, dtype)
    opt_state = initial_opt_state(config, params, feedback)
    return place.put(TrainState(params, opt_state, np.zeros((), np.int32), feedback))


def checkpoint_meta(config: Config, sizes: tuple[int, ...]) -> dict[str, Any]:
    """What a checkpoint must match to be restored into this run (``bpjax.checkpoint``)."""
    return {"sizes": list(sizes), "dtype": config.dtype, "optimizer": config.optimizer,
            "activation": config.activation, "loss": config.loss,
            "feedback": config.feedback, "settings": run_settings(config)}  # fmt: skip


class EpochProgram:
    """The epoch (or one chunk of it), jitted (state donated), compiled ahead of time.

    ``chunk_steps`` steps per call, the chunk's first step an argument, so the
    chunks of ``--eval_every_steps`` share one compiled program; ``traces``
    counts compilations. ``jitted`` and ``args`` are the program before
    compilation (``jax.export`` takes them to lower it for other platforms).
    Compiled with ``step.compiler_options`` (on a CPU at small batches: matrix
    products fused with their elementwise neighbours).
    """

    def __init__(self, config: Config, place: Placement, state: TrainState, data: TrainData,
                 classify: bool):  # fmt: skip
        self.traces = 0
        self.config, self.place, self.classify = config, place, classify
        self.steps_per_epoch = data.x_train.shape[0] // config.batch
        self.chunk_steps = config.eval_every_steps or self.steps_per_epoch
        if self.steps_per_epoch % self.chunk_steps:
            n = self.steps_per_epoch
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            raise ConfigError(
                f"--eval_every_steps={config.eval_every_steps} does not divide the"
                f" {self.steps_per_epoch} steps of an epoch into equal chunks: use one of"
                f" {', '.join(map(str, divisors))}"
            )
        self.data_key = run_keys(config)[1]
        self.net = config.net(data.x_train.shape[1], data.y_train.shape[1])
        t0 = time.perf_counter()
        rows = config.batch // (place.mesh.size if place.mesh is not None else 1)
        options = compiler_options(place.device.platform, rows)
        self.jitted = jax.jit(self._chunk, donate_argnums=0, compiler_options=options)
        args = (state, data.x_train, data.y_train, jax.random.fold_in(self.data_key, 0),
                np.zeros((), np.int32))  # fmt: skip
        self.compiled = self.jitted.lower(*args).compile()
        self.args = jax.tree.map(_abstract, args)  # shapes only: the state is donated later
        self.compile_s = time.perf_counter() - t0

    def _chunk(self, state, x, y, key, first):
        self.traces += 1  # runs at trace time only: counts compilations
        config = self.config
        step_fn = make_train_step(config, self.place.mesh, net=self.net,
                                  steps_per_epoch=self.steps_per_epoch, classify=self.classify)
        return run_steps(state, x, y, key, first, step_fn=step_fn, batch=config.batch,
                         steps=self.chunk_steps, place=self.place)  # fmt: skip

    def __call__(self, state: TrainState, data: TrainData, epoch: int, chunk: int = 0):
        key = jax.random.fold_in(self.data_key, epoch)
        first = np.asarray(chunk * self.chunk_steps, np.int32)
        return self.compiled(state, data.x_train, data.y_train, key, first)


def _abstract(a: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=getattr(a, "sharding", None))


def describe(config: Config, dataset: Dataset, data: TrainData, place: Placement,
             workdir: str) -> str:  # fmt: skip
    """The run's header line: data, network, method, update, placement."""
    n_train, n_test = data.x_train.shape[0], data.x_test.shape[0]
    sizes = (data.x_train.shape[1], *config.hidden, data.y_train.shape[1])
    val = f"{data.x_val.shape[0]} validation / " if data.x_val is not None else ""
    return (
        f"{dataset.name}: {n_train} train / {val}{n_test} test examples, network "
        f"{'-'.join(map(str, sizes))} ({config.activation}, {config.loss}), method "
        f"{config.method}, {config.optimizer} lr {config.lr}, batch {config.batch} "
        f"({n_train // config.batch} steps/epoch, {n_train % config.batch} left out per epoch), "
        f"{config.dtype} on {place.describe()}, workdir {workdir}"
    )


def train(
    config: Config,
    *,
    dataset: Dataset | None = None,
    log: Log | None = print,
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Trains the network ``config`` describes; writes config, metrics, checkpoints.

    Args:
      config: the run.
      dataset: data given in Python (``Dataset.from_arrays``); else what ``config.dataset``
        names is loaded (``bpjax.rundata``). Either way it is checked, and recorded, before
        the run directory is touched.
      log: receives one readable line per event (``print`` by default; None: silent).
      stop: polled before every epoch; once it returns True the run ends after
        the epoch under way, with that epoch checkpointed (``bpjax.interrupt``).

    Returns:
      The final params, the per-epoch metrics and the workdir, on every normal
      path, an early stop included (``interrupted``).
    """
    config, dataset = rundata.resolve(config, dataset)  # fills in config.data_shape
    data_record = rundata.record(dataset, config)
    changed = rundata.check_resumed(config, data_record)  # --resume: the recorded SHA-256
    rows = split_rows(dataset, config)  # --batch against the rows, ...: before any file
    x64 = jax.enable_x64(True) if config.dtype == "float64" else contextlib.nullcontext()
    precision = (contextlib.nullcontext() if config.matmul_precision == "default"
                 else jax.default_matmul_precision(config.matmul_precision))  # fmt: skip
    with x64, precision, _out_of_memory_as_error(config):
        place = Placement.for_config(config)
        quiet = log is None or not place.is_main  # only process 0 logs
        with RunDir.open(config, log=(lambda _: None) if quiet else log,
                         is_main=place.is_main, device=place.device) as run:  # fmt: skip
            if changed:  # --accept_data_change: the new data's hash, recorded
                run.event("data_changed", sha256=changed, data=data_record)
            return _train_epochs(config, dataset, place, run, stop or (lambda: False),
                                 data_record, rows)  # fmt: skip


def _train_epochs(config: Config, dataset: Dataset, place: Placement, run: RunDir,
                  stop: Callable[[], bool], data_record: dict[str, Any], rows: Any,
                  ) -> TrainResult:  # fmt: skip
    """The recipe: data, state (fresh or resumed), program; then epochs until done."""
    data = prepare_data(dataset, config, place, rows)
    classify = dataset.num_classes is not None
    sizes = (data.x_train.shape[1], *config.hidden, data.y_train.shape[1])
    meta = checkpoint_meta(config, sizes)
    measure = Evaluator(config, data, classify)
    initial = init_state(config, sizes, place)
    start_loss = float(measure(initial)["loss"])
    state, start = run.resume(initial, meta)
    state = place.put_restored(state) if start else state
    run.log(describe(config, dataset, data, place, run.workdir))
    program = EpochProgram(config, place, state, data, classify)
    run.start(sizes, data_record)  # config.json once every check passed: a refused run leaves none
    if warning := optimizer_warning(config.rule, config.optimizer):  # kp: SGD's identity only
        run.log(warning)
        run.event("warning", detail=warning)
    run.log(f"compiled the epoch in {program.compile_s:.2f}s")
    run.intervals_per_epoch = program.steps_per_epoch // program.chunk_steps
    target = _reached_before(config, run)
    if start >= config.epochs and not target:
        run.log(f"the run already finished its {start} epochs: pass --epochs=N to extend it"
                if start else "--epochs=0: no epoch to train; the parameters are the initial ones")
    epoch, chunk = (start, 0) if target else _resume_point(config, program, start)
    t_loop = time.perf_counter()
    try:
        while epoch < config.epochs and not stop() and target is None:
            epoch += 1
            state, target = _epoch(config, program, measure, state, data, epoch, start_loss, run,
                                   meta, chunk)  # fmt: skip
            chunk = 0
    except TrainingError:
        raise  # diverged or stopped being finite: the newest checkpoint stays the last good one
    except BaseException:
        if jax.process_count() == 1:  # a save takes every process, and only this one failed
            with contextlib.suppress(Exception):
                _save_end(run, meta)
        raise
    interrupted = target is None and epoch < config.epochs
    _save_end(run, meta)  # the end of the run, however it ended, is checkpointed
    run.event("interrupted" if interrupted else "target_reached" if target else "finished",
              **(target or {"epoch": max(epoch, start)}))  # fmt: skip
    if run.history and not interrupted:
        run.log(run.summary(time.perf_counter() - t_loop, target))
    params, feedback = jax.device_get((state.params, state.feedback))
    return TrainResult(params, run.history, run.workdir, program.traces, interrupted, feedback,
                       target, program.compile_s)  # fmt: skip


def _reached_before(config: Config, run: RunDir) -> dict[str, Any] | None:
    """Where the run reached its target, if the checkpoint it resumed from meets it.

    Then there is nothing to train (a scheduled job restarted after the end): one
    line says so. None otherwise.
    """
    last = run.history[-1] if run.resumed and run.history else None
    if last is None or last.get("epoch") != run.saved_epoch or not target_reached(config, last):
        return None
    run.log(f"the run already reached its target at epoch {last['epoch']}, step"
            f" {last.get('step')}: nothing to train (change --target_* to go on)")  # fmt: skip
    return {"epoch": last["epoch"], "step": last.get("step"),
            "train_s": last.get("train_s", 0.0), "elapsed_s": last.get("elapsed_s", 0.0)}


def _resume_point(config: Config, program: EpochProgram, start: int | float) -> tuple[int, int]:
    """``(epochs done, chunks of the next one done)`` at the resumed epoch ``start``.

    A fraction (1.5): a run that ended part-way through an epoch, continued from
    its next step, which must begin a chunk of ``--eval_every_steps``.
    """
    whole, steps = math.floor(start), program.steps_per_epoch
    done = round((start - whole) * steps)  # steps of epoch ``whole + 1`` already taken
    if done % program.chunk_steps:
        fits = ", ".join(map(str, divisors(math.gcd(done, steps))))
        raise ConfigError(
            f"the run stopped at epoch {start}, after {done} of the {steps} steps of epoch"
            f" {whole + 1}: --eval_every_steps={config.eval_every_steps} cannot continue from"
            f" there; use one of {fits}"
        )
    return whole, done // program.chunk_steps


def _save_end(run: RunDir, meta: dict[str, Any]) -> None:
    """Checkpoints the state of the last metrics record, unless that is done already.

    The end of a run, however it ended, so that the newest checkpoint and the
    records agree. A state already handed to a later interval (donated: a run
    that failed inside it) is gone, and cannot be saved.
    """
    epoch, state = run.last_recorded or (0, None)
    gone = any(isinstance(a, jax.Array) and a.is_deleted() for a in jax.tree.leaves(state))
    if epoch > run.saved_epoch and not gone:
        run.save(epoch, state, meta)


def _epoch(config: Config, program: EpochProgram, measure: Evaluator, state: TrainState,
           data: TrainData, epoch: int, start_loss: float, run: RunDir, meta: dict[str, Any],
           first: int = 0) -> tuple[TrainState, dict[str, Any] | None]:  # fmt: skip
    """One epoch in its chunks (from chunk ``first``), each evaluated, checked, recorded;
    stops at a target."""
    chunks = program.steps_per_epoch // program.chunk_steps
    for chunk in range(first, chunks):
        t0 = time.perf_counter()
        new_state, steps = program(state, data, epoch, chunk)
        steps = jax.device_get(steps)
        seconds = {"epoch_s": time.perf_counter() - t0}
        test = measure(new_state)
        at = epoch - 1 + (chunk + 1) / chunks
        check_health(config, at, new_state, steps, test, start_loss, run)
        state = new_state
        seconds |= {"train_s": run.add_train_s(seconds["epoch_s"]), "elapsed_s": run.elapsed_s()}
        record = interval_record(at, state, steps, config.batch, test, seconds)
        reached = target_reached(config, record)
        if config.target_accuracy is not None or config.target_loss is not None:
            record["target_reached"] = reached
        run.end_interval(state, record, meta, epoch_end=chunk == chunks - 1)
        if reached:
            return state, {k: record[k] for k in ("epoch", "step", "train_s", "elapsed_s")}
    return state, None

@contextlib.contextmanager
def _out_of_memory_as_error(config: Config) -> Iterator[None]:
    """An allocation that does not fit becomes one line: what, how much, what to lower."""
    try:
        yield
    except (jax.errors.JaxRuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        asked = re.search(r"allocat\w* (\d+) bytes", str(e))
        size = f" {int(asked.group(1)) / 1e9:.3g} GB" if asked else ""
        sizes = config.sizes
        n_params = sum(a * b + b for a, b in itertools.pairwise(sizes))
        raise TrainingError(
            f"out of memory: an allocation of{size or ' memory'} did not fit (network"
            f" {'-'.join(map(str, sizes))}: {n_params:,} parameters in {config.dtype}, batch"
            f" {config.batch}); lower --hidden or --batch"
        ) from None
