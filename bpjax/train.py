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
import itertools
import re
import time
from collections.abc import Callable, Iterator
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
    interrupted: bool = False  # stopped early on request; the last epoch run is checkpointed


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


def batch_metrics(outputs: Array, y: Array, loss: str, classify: bool = True) -> dict[str, Array]:
    """Summed loss and correct count of one batch (sums, so epochs average exactly).

    ``classify``: the targets are one-hot classes, whatever the loss (MNIST
    under squared error has an accuracy too); regression targets have none.
    """
    metrics = {"loss_sum": jnp.sum(get_loss(loss).per_sample(outputs, y))}
    if classify:
        hits = jnp.argmax(outputs, axis=-1) == jnp.argmax(y, axis=-1)
        metrics["correct"] = jnp.sum(hits.astype(jnp.int32))
    return metrics


def train_step(
    state: TrainState, x: Array, y: Array, key: Array, *, grad, optimizer, loss: str,
    classify: bool = True,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer step on the batch ``x: (B, n_0)``, ``y: (B, n_L)``."""
    grads, outputs = grad(state.params, x, y, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = batch_metrics(outputs, y, loss, classify)
    return TrainState(params, opt_state, state.step + 1), metrics


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


def evaluate(
    params: Params, x: Array, y: Array, *, activation: str, loss: str, classify: bool = True
) -> dict[str, Array]:
    """Mean loss and accuracy (classification only) over ``x: (N, n_0)``."""
    m = batch_metrics(predict(params, x, activation=activation), y, loss, classify)
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
    if dataset.num_classes is None and config.loss == "softmax_cross_entropy":
        raise ConfigError(
            f"{dataset.name} has real-valued targets, which softmax cross-entropy cannot fit:"
            " use --loss=squared_error"
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

    def __init__(self, config: Config, place: Placement, state: TrainState, data: TrainData,
                 classify: bool):  # fmt: skip
        self.traces = 0
        self.config, self.place, self.classify = config, place, classify
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
            loss=config.loss, classify=self.classify,
        )  # fmt: skip
        return run_epoch(state, x, y, key, step_fn=step_fn, batch=config.batch, place=self.place)

    def __call__(self, state: TrainState, data: TrainData, epoch: int):
        key = jax.random.fold_in(self.data_key, epoch)
        return self.compiled(state, data.x_train, data.y_train, key)


def all_finite(params: Params) -> Array:
    """One boolean: every parameter is finite (checked before a checkpoint is written)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))


def check_health(config: Config, epoch: int, state: TrainState, steps: dict[str, np.ndarray],
                 test: dict[str, Any], start_loss: float, run: RunDir) -> None:  # fmt: skip
    """Stops a run that broke in ``epoch`` before its state is saved or called good.

    Raises TrainingError when a step's loss is not finite; when the parameters
    (or the test loss) are not, which a blow-up in the epoch's last update
    leaves behind with every step's loss finite; or when the epoch's train or
    test loss exceeds ``config.divergence_factor`` times ``start_loss``, the
    test loss of the initial parameters (a run that diverges without ever
    reaching inf: lr far too large).
    """
    losses = steps["loss_sum"] / config.batch
    train_loss, test_loss = float(np.mean(losses)), float(test["loss"])
    factor = config.divergence_factor
    if not np.all(np.isfinite(losses)):
        bad = int(np.argmax(~np.isfinite(losses)))
        what = (f"the loss became {losses[bad]} at epoch {epoch}, step "
                f"{int(state.step) - len(losses) + bad + 1} (step {bad + 1} of the epoch)")
    elif not (test["finite"] and np.isfinite(test_loss)):
        what = (f"the parameters stopped being finite at the end of epoch {epoch} (test loss"
                f" {test_loss})")  # fmt: skip
    elif factor and max(train_loss, test_loss) > factor * start_loss:
        which, value = ("train", train_loss) if train_loss > test_loss else ("test", test_loss)
        what = (f"the {which} loss grew to {value:.4g} at epoch {epoch}, more than {factor:g}x"
                f" the loss at the start ({start_loss:.4g}; --divergence_factor={factor:g})")
    else:
        return
    last = run.last_checkpoint()
    run.event("stopped", epoch=epoch, reason=what)
    raise TrainingError(
        f"{what}; stopped. The last good checkpoint is "
        + (f"epoch {last} in {run.manager.directory}" if last else "none (no epoch finished)")
        + f". Lower --lr (now {config.lr:g}) or check the data"
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
    config: Config,
    *,
    dataset: Dataset | None = None,
    log: Log | None = print,
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Trains the network ``config`` describes; writes config, metrics, checkpoints.

    Args:
      config: the run.
      dataset: already loaded data (notebooks, tests); else ``load_dataset``.
      log: receives one readable line per event (``print`` by default; None: silent).
      stop: polled before every epoch; once it returns True the run ends after
        the epoch under way, with that epoch checkpointed (``bpjax.interrupt``).

    Returns:
      The final params, the per-epoch metrics and the workdir, on every normal
      path, an early stop included (``interrupted``).
    """
    x64 = jax.enable_x64(True) if config.dtype == "float64" else contextlib.nullcontext()
    with x64, _out_of_memory_as_error(config):
        place = Placement.for_config(config)
        quiet = log is None or not place.is_main  # only process 0 logs
        with RunDir.open(config, log=(lambda _: None) if quiet else log,
                         is_main=place.is_main) as run:  # fmt: skip
            return _train_epochs(config, dataset, place, run, stop or (lambda: False))


def _train_epochs(config: Config, dataset: Dataset | None, place: Placement, run: RunDir,
                  stop: Callable[[], bool]) -> TrainResult:  # fmt: skip
    if dataset is None:
        dataset = load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed)
    data = prepare_data(dataset, config, place)
    classify = dataset.num_classes is not None
    sizes = (data.x_train.shape[1], *config.hidden, data.y_train.shape[1])
    meta = checkpoint_meta(config, sizes)
    evaluate_fn = jax.jit(lambda params, x, y: {
        **evaluate(params, x, y, activation=config.activation, loss=config.loss,
                   classify=classify), "finite": all_finite(params)})  # fmt: skip
    initial = init_state(config, sizes, place)
    start_loss = float(evaluate_fn(initial.params, data.x_test, data.y_test)["loss"])
    state, start = run.resume(initial, meta)
    state = place.put_restored(state) if start else state
    run.start(sizes)
    run.log(describe(config, dataset, data, place, run.workdir))
    epoch_fn = EpochProgram(config, place, state, data, classify)
    run.log(f"compiled the epoch in {epoch_fn.compile_s:.2f}s")
    if start >= config.epochs:
        run.log(f"the run already finished its {start} epochs: pass --epochs=N to extend it")
    t_loop, epoch = time.perf_counter(), start
    while epoch < config.epochs and not stop():
        epoch += 1
        t_epoch = time.perf_counter()
        new_state, steps = epoch_fn(state, data, epoch)
        steps = jax.device_get(steps)
        epoch_s = time.perf_counter() - t_epoch
        test = jax.device_get(evaluate_fn(new_state.params, data.x_test, data.y_test))
        check_health(config, epoch, new_state, steps, test, start_loss, run)
        state = new_state
        record = epoch_record(epoch, state, steps, config.batch, test, epoch_s, run.elapsed_s())
        run.end_epoch(state, record, meta)
    interrupted = epoch < config.epochs
    if interrupted and epoch > run.saved_epoch:
        run.save(epoch, state, meta)  # the last completed epoch, checkpointed before leaving
    run.event("interrupted" if interrupted else "finished", epoch=epoch)
    if run.history and not interrupted:
        run.log(run.summary(time.perf_counter() - t_loop))
    params = jax.device_get(state.params)
    return TrainResult(params, run.history, run.workdir, epoch_fn.traces, interrupted)


@contextlib.contextmanager
def _out_of_memory_as_error(config: Config) -> Iterator[None]:
    """An allocation that does not fit becomes one line: what, how much, what to lower."""
    try:
        yield
    except (jax.errors.JaxRuntimeError, MemoryError) as e:
        text = str(e)
        if not isinstance(e, MemoryError) and not re.search(
            r"RESOURCE_EXHAUSTED|out of memory", text, re.IGNORECASE
        ):
            raise
        asked = re.search(r"allocat\w* (\d+) bytes", text)
        size = f" {int(asked.group(1)) / 1e9:.3g} GB" if asked else ""
        sizes = config.sizes
        n_params = sum(a * b + b for a, b in itertools.pairwise(sizes))
        raise TrainingError(
            f"out of memory: an allocation of{size or ' memory'} did not fit (network"
            f" {'-'.join(map(str, sizes))}: {n_params:,} parameters in {config.dtype}, batch"
            f" {config.batch}); lower --hidden or --batch"
        ) from None
