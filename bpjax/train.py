"""The training loop: a jitted ``lax.scan`` epoch over device-resident data.

``train(config)`` is what ``launch.py`` and notebooks call. Per run it builds the
jitted epoch function once (compiled ahead of time, so compile time is measured
apart and later epochs never recompile), then per epoch: reshuffle from a key
derived from (seed, epoch), scan ``train_step`` over ``N // batch`` fixed-shape
batches, evaluate on the test set, then let the run directory
(``bpjax.rundir``) checkpoint, append the metrics and log one line.

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
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh

from bpjax import parallel
from bpjax.config import Config
from bpjax.data import Dataset, load_dataset
from bpjax.errors import ConfigError, TrainingError
from bpjax.losses import get_loss
from bpjax.methods import grad_fn
from bpjax.network import Params, init_params, predict
from bpjax.parallel import Placement
from bpjax.privacy import private_grad_fn
from bpjax.rundir import RunDir

Array = jax.Array
Log = Callable[[str], None]


class TrainState(NamedTuple):
    params: Params
    opt_state: optax.OptState
    step: Array  # int32 scalar: optimizer steps taken so far


class TrainData(NamedTuple):
    """The arrays of a run, placed: inputs ``(N, n_0)`` and target rows ``(N, n_L)``."""

    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array


@dataclasses.dataclass(frozen=True)
class TrainResult:
    params: Params
    history: list[dict[str, Any]]
    workdir: str
    traces: int  # traces of the epoch function in this run: 1 means it never recompiled


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """``sgd`` is the documents' update W <- W - lr * dW."""
    if config.optimizer == "sgd":
        return optax.sgd(config.lr)
    if config.optimizer == "momentum":
        return optax.sgd(config.lr, momentum=config.momentum)
    return optax.adam(config.lr)


def make_grad(
    config: Config, mesh: Mesh | None = None
) -> Callable[[Params, Array, Array, Array], tuple[Params, Array]]:
    """``(params, x, y, key) -> (grads, outputs)`` for the configured method.

    The switchboard of gradient routes: the lowest module that sees all three
    tables (``methods.grad_fn``, ``privacy.private_grad_fn``,
    ``parallel.sharded_grad_fn``). ``key`` feeds the DP-SGD noise when
    ``dp_clip`` is set and is unused otherwise. With a ``mesh`` and
    ``config.parallel == "shard_map"``, the explicit per-device program;
    otherwise the single-device function (under a mesh, XLA partitions it from
    the batch's sharding).
    """
    if mesh is not None and config.parallel == "shard_map":
        sharded = parallel.sharded_grad_fn(
            config.method, mesh, activation=config.activation, loss=config.loss
        )
        return lambda params, x, y, key: sharded(params, x, y)
    if config.dp_clip is not None:
        return private_grad_fn(
            config.method,
            clip=config.dp_clip,
            noise_multiplier=config.dp_noise,
            activation=config.activation,
            loss=config.loss,
        )
    grad = grad_fn(config.method, activation=config.activation, loss=config.loss)
    return lambda params, x, y, key: grad(params, x, y)


def batch_metrics(outputs: Array, y: Array, loss: str) -> dict[str, Array]:
    """Summed loss and correct count of one batch (sums, so epochs average exactly)."""
    metrics = {"loss_sum": jnp.sum(get_loss(loss).per_sample(outputs, y))}
    if loss == "softmax_cross_entropy":
        hits = jnp.argmax(outputs, axis=-1) == jnp.argmax(y, axis=-1)
        metrics["correct"] = jnp.sum(hits.astype(jnp.int32))
    return metrics


def train_step(
    state: TrainState, x: Array, y: Array, key: Array, *, grad, optimizer, loss: str
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer step on the batch ``x: (B, n_0)``, ``y: (B, n_L)``."""
    grads, outputs = grad(state.params, x, y, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, state.step + 1), batch_metrics(outputs, y, loss)


def run_epoch(
    state: TrainState,
    x: Array,
    y: Array,
    key: Array,
    *,
    step_fn,
    batch: int,
    place: Placement | None = None,
) -> tuple[TrainState, dict[str, Array]]:
    """Shuffles ``x: (N, n_0)``, ``y: (N, n_L)`` and scans ``step_fn`` over full batches.

    With a mesh in ``place``, each batch's indices and rows are split over its
    ``data`` axis: device d gathers rows ``[d B/D, (d+1) B/D)`` of every batch.
    Returns per-step metrics with a leading ``(N // batch,)`` axis.
    """
    shard = place.shard_rows if place is not None else (lambda a: a)
    steps = x.shape[0] // batch
    shuffle_key, noise_key = jax.random.split(key)
    order = jax.random.permutation(shuffle_key, x.shape[0])[: steps * batch]

    def body(state, i):
        idx = shard(lax.dynamic_slice_in_dim(order, i * batch, batch))
        return step_fn(state, shard(x[idx]), shard(y[idx]), jax.random.fold_in(noise_key, i))

    return lax.scan(body, state, jnp.arange(steps))


def evaluate(params: Params, x: Array, y: Array, *, activation: str, loss: str) -> dict[str, Array]:
    """Mean loss and accuracy (classification only) over ``x: (N, n_0)``."""
    m = batch_metrics(predict(params, x, activation=activation), y, loss)
    out = {"loss": m["loss_sum"] / x.shape[0]}
    if "correct" in m:
        out["accuracy"] = m["correct"] / x.shape[0]
    return out


def prepare_data(dataset: Dataset, config: Config, place: Placement) -> TrainData:
    """Targets as rows (one-hot for classification), cast, and placed (``place.put``)."""
    dtype = jnp.dtype(config.dtype)
    n = config.train_examples or dataset.x_train.shape[0]
    if n > dataset.x_train.shape[0]:
        raise ConfigError(
            f"--train_examples={n} exceeds the {dataset.x_train.shape[0]} training examples of "
            f"{dataset.name}"
        )
    if config.batch > n:
        raise ConfigError(
            f"--batch={config.batch} is larger than the training set ({n} examples of "
            f"{dataset.name}): lower --batch"
        )

    def targets(y: np.ndarray) -> np.ndarray:
        if dataset.num_classes is None:
            return y.astype(dtype)
        return np.eye(dataset.num_classes, dtype=dtype)[y]

    return place.put(TrainData(
        x_train=dataset.x_train[:n].astype(dtype),
        y_train=targets(dataset.y_train[:n]),
        x_test=dataset.x_test.astype(dtype),
        y_test=targets(dataset.y_test),
    ))  # fmt: skip


def run_keys(config: Config) -> tuple[Array, Array]:
    """``(init_key, data_key)`` from the seed; epoch e uses ``fold_in(data_key, e)``."""
    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    return init_key, data_key


def init_state(config: Config, sizes: tuple[int, ...], place: Placement) -> TrainState:
    """Glorot-uniform parameters from the seed, a fresh optimizer state, step 0; placed."""
    params = init_params(run_keys(config)[0], sizes, jnp.dtype(config.dtype))
    state = TrainState(params, make_optimizer(config).init(params), np.zeros((), np.int32))
    return place.put(state)


def checkpoint_meta(config: Config, sizes: tuple[int, ...]) -> dict[str, Any]:
    """What a checkpoint must match to be restored into this run."""
    return {"sizes": list(sizes), "dtype": config.dtype, "optimizer": config.optimizer,
            "activation": config.activation, "loss": config.loss}  # fmt: skip


class EpochProgram:
    """The epoch, jitted (state donated) and compiled ahead of time, with a trace count."""

    def __init__(self, config: Config, place: Placement, state: TrainState, data: TrainData):
        self.traces = 0
        self.config, self.place = config, place
        self.data_key = run_keys(config)[1]
        t0 = time.perf_counter()
        key = jax.random.fold_in(self.data_key, 0)
        jitted = jax.jit(self._epoch, donate_argnums=0)
        self.compiled = jitted.lower(state, data.x_train, data.y_train, key).compile()
        self.compile_s = time.perf_counter() - t0

    def _epoch(self, state, x, y, key):
        self.traces += 1  # runs at trace time only: counts compilations
        config = self.config
        step_fn = functools.partial(
            train_step, grad=make_grad(config, self.place.mesh), optimizer=make_optimizer(config),
            loss=config.loss,
        )  # fmt: skip
        return run_epoch(state, x, y, key, step_fn=step_fn, batch=config.batch, place=self.place)

    def __call__(self, state: TrainState, data: TrainData, epoch: int):
        key = jax.random.fold_in(self.data_key, epoch)
        return self.compiled(state, data.x_train, data.y_train, key)


def check_finite(steps: dict[str, np.ndarray], state: TrainState, epoch: int, run: RunDir,
                 batch: int) -> None:  # fmt: skip
    """Raises TrainingError naming the epoch, the step and the last good checkpoint."""
    step_losses = steps["loss_sum"] / batch
    if np.all(np.isfinite(step_losses)):
        return
    bad = int(np.argmax(~np.isfinite(step_losses)))
    last = run.last_checkpoint()
    raise TrainingError(
        f"the loss became {step_losses[bad]} at epoch {epoch}, step "
        f"{int(state.step) - len(step_losses) + bad + 1} (step {bad + 1} of the epoch);"
        " stopped. The last good checkpoint is "
        + (f"epoch {last} in {run.manager.directory}" if last else "none (no epoch finished)")
        + ". Lower --lr or check the data"
    )


def epoch_record(
    epoch: int, state: TrainState, steps: dict[str, np.ndarray], batch: int,
    test: dict[str, Any], epoch_s: float, elapsed_s: float,
) -> dict[str, Any]:  # fmt: skip
    """The metrics of one epoch (see ``bpjax.rundir`` for each key).

    ``steps`` holds each step's summed loss and correct count over its ``batch``
    samples: the train metrics average over the samples the epoch saw.
    """
    seen = steps["loss_sum"].shape[0] * batch
    return {
        "epoch": epoch,
        "step": int(state.step),
        "train_loss": float(np.sum(steps["loss_sum"]) / seen),
        "train_accuracy": float(np.sum(steps["correct"]) / seen) if "correct" in steps else None,
        "test_loss": float(test["loss"]),
        "test_accuracy": float(test["accuracy"]) if "accuracy" in test else None,
        "samples_per_s": seen / epoch_s,
        "epoch_s": epoch_s,
        "elapsed_s": elapsed_s,
    }


def describe(config: Config, dataset: Dataset, data: TrainData, place: Placement,
             workdir: str) -> str:  # fmt: skip
    """The run's header line: data, network, method, update, placement."""
    n_train, n_test = data.x_train.shape[0], data.x_test.shape[0]
    sizes = (data.x_train.shape[1], *config.hidden, data.y_train.shape[1])
    return (
        f"{dataset.name}: {n_train} train / {n_test} test examples, network "
        f"{'-'.join(map(str, sizes))} ({config.activation}, {config.loss}), method "
        f"{config.method}, {config.optimizer} lr {config.lr}, batch {config.batch} "
        f"({n_train // config.batch} steps/epoch, {n_train % config.batch} left out per epoch), "
        f"{config.dtype} on {place.describe()}, workdir {workdir}"
    )


def train(
    config: Config, *, dataset: Dataset | None = None, log: Log | None = print
) -> TrainResult:
    """Trains the network ``config`` describes; writes config, metrics, checkpoints.

    Args:
      config: the run.
      dataset: already loaded data (notebooks, tests); else ``load_dataset``.
      log: receives one readable line per event (``print`` by default; None: silent).

    Returns:
      The final params, the per-epoch metrics and the workdir.
    """
    x64 = jax.enable_x64(True) if config.dtype == "float64" else contextlib.nullcontext()
    with x64:
        place = Placement.for_config(config)
        quiet = log is None or not place.is_main  # only process 0 logs
        with RunDir.open(config, log=(lambda _: None) if quiet else log,
                         is_main=place.is_main) as run:  # fmt: skip
            return _train_epochs(config, dataset, place, run)


def _train_epochs(config: Config, dataset: Dataset | None, place: Placement,
                  run: RunDir) -> TrainResult:  # fmt: skip
    if dataset is None:
        dataset = load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed)
    data = prepare_data(dataset, config, place)
    sizes = (data.x_train.shape[1], *config.hidden, data.y_train.shape[1])
    meta = checkpoint_meta(config, sizes)
    state, start = run.resume(init_state(config, sizes, place), meta)
    state = place.put_restored(state) if start else state
    run.start(sizes)
    run.log(describe(config, dataset, data, place, run.workdir))
    epoch_fn = EpochProgram(config, place, state, data)
    run.log(f"compiled the epoch in {epoch_fn.compile_s:.2f}s")
    evaluate_fn = jax.jit(functools.partial(evaluate, activation=config.activation,
                                            loss=config.loss))  # fmt: skip
    t_loop = time.perf_counter()
    for epoch in range(start + 1, config.epochs + 1):
        t_epoch = time.perf_counter()
        new_state, steps = epoch_fn(state, data, epoch)
        steps = jax.device_get(steps)
        epoch_s = time.perf_counter() - t_epoch
        check_finite(steps, new_state, epoch, run, config.batch)
        state = new_state
        test = jax.device_get(evaluate_fn(state.params, data.x_test, data.y_test))
        record = epoch_record(epoch, state, steps, config.batch, test, epoch_s, run.elapsed_s())
        run.end_epoch(state, record, meta)
    if run.history:
        run.log(run.summary(time.perf_counter() - t_loop))
    return TrainResult(jax.device_get(state.params), run.history, run.workdir, epoch_fn.traces)
